"""Privacy commands of the ``ehr`` command line: KEK rotation, erasure (crypto-shredding),
audited re-identification, and the audit log.

The commands are registered on the main group by :mod:`pipelines.cli`. They work on
``WORKDIR/warehouse.duckdb`` and write to the audit log at ``WORKDIR/audit/audit.log``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import duckdb

from deid.errors import DeidError
from pipelines.workdir import Workdir
from vault.audit import AuditLog
from vault.errors import VaultError
from vault.keys import KeyProvider, default_key_file, load_key_provider

_workdir_option = click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    callback=lambda _ctx, _param, value: Workdir.of(value),
    help="work directory (default: EHR_WORKDIR or data/work)",
)
_key_file_option = click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="keyring file (default: EHR_KEY_FILE or ~/.ehr/keyring.json; EHR_KEK wins when set)",
)


def audit_log_for(workdir: Workdir | Path, provider: KeyProvider) -> AuditLog:
    """The audit log of a work directory, keyed from the provider's pseudonym key."""
    paths = workdir if isinstance(workdir, Workdir) else Workdir(Path(workdir))
    return AuditLog.for_provider(paths.audit_log, provider)


def _provider(key_file: Path | None) -> KeyProvider:
    try:
        return load_key_provider(key_file)
    except (DeidError, VaultError) as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def _warehouse(workdir: Workdir, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """An existing warehouse only: these commands never create an empty one."""
    from vault import warehouse

    path = workdir.warehouse
    if not path.exists():
        raise click.ClickException(f"no warehouse at {path}")
    con = warehouse.connect(path, read_only=read_only)
    try:
        yield con
    finally:
        con.close()


@click.command("rotate")
@_key_file_option
@_workdir_option
def keys_rotate(key_file: Path | None, workdir: Workdir) -> None:
    """New key-encryption key; every data key re-wrapped; the old key retired and dropped.

    Every warehouse using this keyring must be rotated with it: a second warehouse sharing
    the keyring keeps keys under the dropped KEK. Stop pipeline runs first.
    """
    from vault.lifecycle import rotate_kek

    path = key_file or default_key_file()
    audit = audit_log_for(workdir, _provider(path))
    try:
        with _warehouse(workdir, read_only=False) as con:
            report = rotate_kek(path, con, audit)
            con.execute("CHECKPOINT")
    except (DeidError, VaultError) as exc:
        raise click.ClickException(str(exc)) from exc
    retired = ", ".join(report.retired_kek_ids) or "none"
    click.echo(
        f"active KEK {report.new_kek_id}; {report.rewrapped} data keys re-wrapped; "
        f"retired {retired}"
    )
    if report.kept_kek_ids:
        click.echo(
            f"kept {', '.join(report.kept_kek_ids)}: data keys were added under it meanwhile; "
            "rotate again",
            err=True,
        )


@click.command("forget")
@click.argument("patient")
@click.option("--pseudonym", "is_pseudonym", is_flag=True, help="PATIENT is a pseudonym")
@click.option("--reason", required=True, help="why (written to the audit log)")
@_workdir_option
@_key_file_option
def forget(
    patient: str, is_pseudonym: bool, reason: str, workdir: Workdir, key_file: Path | None
) -> None:
    """Erase PATIENT (an original Patient id, or a pseudonym with --pseudonym): destroy its
    data key and purge it from the vault, the indexes and every table with a patient_id."""
    from vault.lifecycle import forget_patient, forget_pseudonym

    provider = _provider(key_file)
    audit = audit_log_for(workdir, provider)
    try:
        with _warehouse(workdir, read_only=False) as con:
            plan = workdir.erasure_plan()
            if is_pseudonym:
                report = forget_pseudonym(con, patient, audit, reason, plan=plan)
            else:
                report = forget_patient(con, provider, patient, audit, reason, plan=plan)
            con.execute("CHECKPOINT")  # deleted rows leave the WAL for the database file
    except (DeidError, VaultError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report.to_dict(), indent=2))
    if not report.found:
        click.echo("nothing of this patient was found (nothing to erase)", err=True)
    else:
        click.echo(
            "copies of the destroyed key may remain in free pages or backups until the KEK "
            "is rotated: run `ehr keys rotate`",
            err=True,
        )


@click.command("reidentify")
@click.argument("pseudonym")
@click.option("--reason", required=True, help="why (written to the audit log first)")
@_workdir_option
@_key_file_option
def reidentify(pseudonym: str, reason: str, workdir: Workdir, key_file: Path | None) -> None:
    """Print the original identifiers behind a patient PSEUDONYM (audited before printing)."""
    from vault.lifecycle import reidentify as run_reidentify

    provider = _provider(key_file)
    audit = audit_log_for(workdir, provider)
    try:
        with _warehouse(workdir, read_only=True) as con:
            found = run_reidentify(con, provider, pseudonym, audit, reason)
    except (DeidError, VaultError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(found, indent=2, ensure_ascii=False))


@click.group("audit")
def audit() -> None:
    """The hash-chained audit log of re-identifications, erasures and key rotations."""


@audit.command("verify")
@_workdir_option
@_key_file_option
def audit_verify(workdir: Workdir, key_file: Path | None) -> None:
    """Detect edited, removed, reordered and truncated entries."""
    result = audit_log_for(workdir, _provider(key_file)).verify()
    if not result.ok:
        click.echo(f"audit log FAILED verification ({result.entries} entries):", err=True)
        for problem in result.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    click.echo(f"audit log ok: {result.entries} entries")


@audit.command("show")
@_workdir_option
@_key_file_option
def audit_show(workdir: Workdir, key_file: Path | None) -> None:
    """Print the entries, one JSON object per line (pseudonyms, key ids and counts only)."""
    try:
        entries = audit_log_for(workdir, _provider(key_file)).entries()
    except (DeidError, VaultError) as exc:
        raise click.ClickException(str(exc)) from exc
    for entry in entries:
        click.echo(json.dumps(entry, ensure_ascii=False))


__all__ = ["audit", "audit_log_for", "forget", "keys_rotate", "reidentify"]
