"""Privacy commands of the ``ehr`` command line: KEK rotation, erasure (crypto-shredding),
audited re-identification, and the audit log.

The commands are registered on the main group by :mod:`pipelines.cli`. They work on
``WORKDIR/warehouse.duckdb`` and write to the audit log at ``WORKDIR/audit/audit.log``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import duckdb
import orjson

from deid.errors import DeidError
from pipelines.cli.options import IN_USE, existing_warehouse, workdir_option
from pipelines.workdir import Workdir
from vault.audit import AuditLog
from vault.errors import VaultError
from vault.keys import KeyProvider, default_key_file, load_key_provider

if TYPE_CHECKING:
    from deid.release import SubjectCanaries
    from vault.read import VaultRecord

_key_file_option = click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="keyring file (default: EHR_KEY_FILE or ~/.ehr/keyring.json; EHR_KEK wins when set)",
)


def audit_log_for(
    workdir: Workdir | Path, provider: KeyProvider, warehouse_id: str | None = None
) -> AuditLog:
    """The audit log of a work directory, keyed with the provider's audit key and anchored
    outside the work directory under the warehouse's id (read from the warehouse when not
    given; a work directory without a warehouse has no outside anchor)."""
    paths = workdir if isinstance(workdir, Workdir) else Workdir(Path(workdir))
    if warehouse_id is None:
        warehouse_id = _known_warehouse_id(paths, provider)
    try:
        return AuditLog.for_provider(paths.audit_log, provider, warehouse_id=warehouse_id)
    except VaultError as exc:
        raise click.ClickException(str(exc)) from exc


def _known_warehouse_id(paths: Workdir, provider: KeyProvider) -> str | None:
    """The id stored in the warehouse; else (the file locked by a running pipeline, or gone)
    the id the keyring's registry holds for that path, so the outside anchor is still found."""
    from vault import warehouse

    if paths.warehouse.exists():
        try:
            con = warehouse.connect(paths.warehouse, read_only=True)
        except duckdb.Error:
            con = None
        if con is not None:
            try:
                found = warehouse.warehouse_id(con)
            finally:
                con.close()
            if found is not None:
                return found
    location = str(paths.warehouse.resolve())
    return next((wid for wid, path in _registry(provider).items() if path == location), None)


def _provider(key_file: Path | None) -> KeyProvider:
    try:
        return load_key_provider(key_file)
    except (DeidError, VaultError) as exc:
        raise click.ClickException(str(exc)) from exc


def _warn_legacy_audit_key(provider: KeyProvider) -> None:
    if getattr(provider, "legacy_audit", False):
        click.echo(
            "this keyring has no audit key of its own (the audit key is derived from the "
            "pseudonym key every pipeline holds): run `ehr keys migrate-audit-key`",
            err=True,
        )


def _check_pseudonym_argument(value: str, hint: str) -> None:
    """A usage error in the command's own terms when ``value`` has no pseudonym's shape (the
    value is never repeated: an original id typed by mistake must not reach a log)."""
    from vault.pseudonym import PSEUDONYM_HEX_CHARS

    if not re.fullmatch(f"[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}", value):
        raise click.ClickException(
            f"a patient pseudonym is {PSEUDONYM_HEX_CHARS} lowercase hex characters; {hint}"
        )


def _registry(provider: KeyProvider) -> dict[str, str]:
    registry = getattr(provider, "warehouses", None)
    return registry() if registry is not None else {}


def _patient_versions(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, pseudonym: str
) -> list[dict[str, Any]]:
    """Every version the vault holds of the patient's Patient resource, and those of their
    Patient records the quarantine holds (:func:`vault.read.iter_quarantined_records`), to
    know what names them (a name changed since still does; never shown) and which identifiers
    keep them out once erased; none when there are none or their data key was destroyed (an
    erasure cut short). A version that does not open while the key lives (its blob names a
    data key the warehouse never held: a tampered row) is an error, not a version to pass
    over: an erasure that went on without it searched the shared records and the reason for
    none of the person's names, and left a Practitioner carrying her name readable under the
    shared key."""
    from vault.errors import KeyDestroyedError
    from vault.lifecycle import data_key_destroyed
    from vault.read import iter_every_version, iter_quarantined_records

    if data_key_destroyed(con, pseudonym):
        return []
    records = list(
        iter_every_version(con, provider, resource_type="Patient", resource_key=pseudonym)
    )
    try:
        quarantined = [
            r for _, r in iter_quarantined_records(con, provider, ["Patient"], pseudonym)
        ]
    except KeyDestroyedError:  # sealed under a key the pass that died before writing it made
        quarantined = []
    return [*(record.resource for record in records), *quarantined]


# the reason of a refusal's audit entry: the refused text is not kept
REFUSED_REASON = "(withheld: it named the patient)"


def _refuse_a_reason_naming_the_patient(
    subject: SubjectCanaries, reason: str, audit: AuditLog, action: str, pseudonym: str
) -> None:
    """Refuse a reason that names its patient. The audit log keeps every reason as written, for
    good (its chain cannot lose an entry), an erased patient's included; an erased one's ids
    (those the operator typed) are still compared. The birth date counts in every form people
    write it, with a two-digit year too (``SubjectCanaries.reason_hits``).

    The refusal is audited before it is shown (the kinds found, never the text): it confirms
    what the reason guessed about the patient, so unaudited, a log made unwritable (one byte
    without its newline) turned the check into a look-up of names, birth dates and
    identifiers that left no entry."""
    hits = subject.reason_hits(reason)
    if hits:
        try:
            audit.append(
                action, pseudonym, REFUSED_REASON, {"outcome": "reason_refused", "names": hits}
            )
        except VaultError as exc:
            raise click.ClickException(str(exc)) from exc
        raise click.ClickException(
            f"the reason names the patient ({', '.join(hits)}): the audit log keeps every reason "
            "as written, for good, an erased patient's too; give a reference instead (a ticket "
            "or request number)"
        )


# the reason of an audit entry about a patient erased already: their Patient versions went with
# their data key, so nothing is left to check a reason against, and the log would keep one that
# names them beside their pseudonym for good
ERASED_SUBJECT_REASON = "(withheld: the patient is erased; it could not be checked)"


def _reason_to_log(con: duckdb.DuckDBPyConnection, pseudonym: str, reason: str) -> str:
    """``reason`` as the audit log records it: as given, unless the patient is erased (their
    data key destroyed), when it is withheld (:data:`ERASED_SUBJECT_REASON`) and the operator
    is told why. A look-up of an erased pseudonym finds nothing, and an erasure run again
    finishes what the first one left; both are still audited, without the text."""
    from vault.lifecycle import data_key_destroyed

    if not data_key_destroyed(con, pseudonym):
        return reason
    click.echo(
        "the patient is erased: nothing names them any more to check the reason against, so "
        "the audit log records this act without it",
        err=True,
    )
    return ERASED_SUBJECT_REASON


def _unattributed_quarantine_naming(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, subject: SubjectCanaries
) -> tuple[tuple[str, int, int], ...]:
    """Quarantined records of no patient (a line that is not JSON, a resource cut short: sealed
    under the shared key, which no erasure destroys) in which the patient's identifiers or ids
    appear: they are erased with the patient. Each is searched as its exporter wrote it
    (:func:`vault.read.quarantined_text`: a name in Windows-1252 or UTF-16 is her name) and,
    where it reads as resources even cut short, with their values as written (``\\u00eb`` as
    the letter it stands for), a chunk at a time. Decrypted here, never shown. Another
    patient's record that names them (a surname they share) is erased too: an erasure errs
    toward leaving nothing."""
    from vault.read import iter_unattributed_quarantine_texts, text_resources

    if subject.empty:
        return ()
    found: list[tuple[str, int, int]] = []
    for place, text in iter_unattributed_quarantine_texts(con, provider):
        if subject.hits(text) or any(subject.hits(_as_text(r)) for r in text_resources(text)):
            found.append(place)
    return tuple(found)


def _shared_resources_naming(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, subject: SubjectCanaries
) -> tuple[str, ...]:
    """Vault resources of no patient (sealed under the shared key, which no erasure destroys:
    a Practitioner or an Organization, a record whose subject is only an identifier, an
    external URL or a reference outside the compartment) some version of which names the
    patient, by the test the quarantine search uses: their resource keys, every shared
    version of each erased with the patient. Decrypted here, never shown."""
    from vault.read import iter_every_version

    if subject.empty:
        return ()
    return _keys_of_records_naming(
        iter_every_version(con, provider, shared_only=True),
        lambda resource: _names_the_person(subject.hits(_as_text(resource))),
    )


def _records_holding_the_person(
    con: duckdb.DuckDBPyConnection, provider: KeyProvider, subject: SubjectCanaries
) -> tuple[str, ...]:
    """Vault resources, of any patient or none, holding inside them a resource that names the
    patient (her Patient contained in her child's lab result, or sent in a Parameters), by the
    test :func:`_shared_resources_naming` uses, read only among the records ingest marks as
    holding a person (``vault.warehouse.HELD_PERSON``): their resource keys, every version of
    each erased with her, and their released copies. Sealed under another patient's key, such
    a record outlived her erasure, her name and identifiers readable by that patient's key.
    Decrypted here, never shown."""
    from fhirlake.nested import held_resources
    from vault.read import iter_every_version

    if subject.empty:
        return ()
    return _keys_of_records_naming(
        iter_every_version(con, provider, holding_persons=True),
        lambda resource: any(
            _names_the_person(subject.hits(_as_text(one))) for one in held_resources(resource)
        ),
    )


def _keys_of_records_naming(
    records: Iterable[VaultRecord], names: Callable[[dict[str, Any]], bool]
) -> tuple[str, ...]:
    """The resource keys of ``records`` some version of which ``names`` the person, each once,
    in the order met; a resource found is not tested again."""
    found: dict[str, None] = {}
    for record in records:
        if record.resource_key not in found and names(record.resource):
            found[record.resource_key] = None
    return tuple(found)


def _as_text(resource: dict[str, Any]) -> str:
    """The record as JSON text, and each HumanName in it written as people write a name
    (``Zephyrine Quorvalent``, each given name with the family name): in JSON its parts stand
    apart, where they read as two name parts rather than a full name."""
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            family, given = node.get("family"), node.get("given")
            if isinstance(family, str) and isinstance(given, list):
                names.extend(f"{g} {family}" for g in given if isinstance(g, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(resource)
    return "\n".join([orjson.dumps(resource).decode(), *names])


# What names someone else as well, when found alone in a shared record: one part of her name
# (a colleague who shares her first name or her surname), her birth date (a Practitioner born
# the same day, another patient's unattributed result dated that day)
_SHARED_BY_OTHERS = {"name", "birth_date"}


def _names_the_person(kinds: list[str]) -> bool:
    """Whether the kinds a shared record holds name the person: anything beyond a name part
    and a birth date (her full name, an identifier, a phone, an email, an address, her id),
    or a name part and the birth date together."""
    found = set(kinds)
    return bool(found - _SHARED_BY_OTHERS) or _SHARED_BY_OTHERS <= found


@dataclass(frozen=True)
class _ErasureInputs:
    pseudonym: str
    # the warehouse's audit log, anchored under its id, checked writable before the patient
    # was read
    audit: AuditLog
    unattributed: tuple[tuple[str, int, int], ...]
    shared: tuple[str, ...]
    identifier_keys: tuple[str, ...]
    # the reason as the audit log records it (:func:`_reason_to_log`)
    reason: str
    # (batch key, kind) of every batch key holding an identifier of the person
    batch_key_kinds: tuple[tuple[str, str], ...] = ()


def _erasure_inputs(
    workdir: Workdir, provider: KeyProvider, patient: str, is_pseudonym: bool, reason: str
) -> _ErasureInputs:
    """What an erasure needs from the warehouse before it starts, in one connection: the
    patient's pseudonym (an original id under the warehouse's own pseudonym key only: under
    another it would name nobody, and leave a tombstone that keeps no one out), the reason
    checked against what names the person (every version of the patient's Patient resource
    and of the other Patient resources of the same person, which the erasure takes too), the
    unreadable quarantined records and the shared vault resources naming them, the keyed
    identifiers of those Patient versions (tombstoned, loose forms included), and the
    warehouse's audit log, anchored under its id (given now to one that has none, or to a copy
    of another registered warehouse) and checked writable before anything of the patient is
    read."""
    from deid.release import SubjectCanaries
    from fhirlake.references import identifier_criteria
    from vault import warehouse
    from vault.ingest import identifier_keys
    from vault.lifecycle import same_person, shared_records_about
    from vault.read import bind_pseudonym_key

    # another erasure's steps, or a run, may have it open: an erasure waits its turn
    with existing_warehouse(workdir, read_only=False, wait=True) as con:
        try:
            pseudo = bind_pseudonym_key(con, provider)
            typed: tuple[str, ...] = ()  # the original id the operator typed
            if not is_pseudonym:
                typed = (patient,)
                patient = pseudo.resource_key("Patient", patient)
            wid = warehouse.claim_id(con, _registry(provider))
            audit = audit_log_for(workdir, provider, wid)
            audit.check_appendable()  # before anything of the patient is read
            subjects = [patient, *same_person(con, patient)]
            versions = [
                version for one in subjects for version in _patient_versions(con, provider, one)
            ]
            subject = SubjectCanaries(versions, *typed)
            _refuse_a_reason_naming_the_patient(subject, reason, audit, "forget", patient)
            reason = _reason_to_log(con, patient, reason)
            unattributed = _unattributed_quarantine_naming(con, provider, subject)
            shared = tuple(
                dict.fromkeys(
                    (
                        *_shared_resources_naming(con, provider, subject),
                        *_records_holding_the_person(con, provider, subject),
                        *shared_records_about(con, subjects),
                    )
                )
            )
            batch_key_kinds = _batch_keys_naming(con, subject)
            keys = tuple(
                dict.fromkeys(
                    key
                    for version in versions
                    for key in identifier_keys(pseudo, "Patient", identifier_criteria(version))
                )
            )
        except (VaultError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        return _ErasureInputs(patient, audit, unattributed, shared, keys, reason, batch_key_kinds)


def _batch_keys_naming(
    con: duckdb.DuckDBPyConnection, subject: SubjectCanaries
) -> tuple[tuple[str, str], ...]:
    """(batch key, kind) of each identifier of the person found in a batch key: a landing
    folder named after them. The key stays in the batch tables, run_summary.json and Dagster;
    once the person is erased nothing in the vault names them, so this is the last moment the
    release's batch key check can be told."""
    from vault.catalog import has_table

    if not has_table(con, "batches"):
        return ()
    keys = [str(k) for (k,) in con.execute("SELECT batch_id FROM batches ORDER BY 1").fetchall()]
    return tuple((key, kind) for key in keys for kind in subject.batch_key_hits(key))


def _anchors_of_others_registered_here(
    workdir: Workdir, provider: KeyProvider, own_id: str | None
) -> list[str]:
    """The log checked against the outside anchor of every other warehouse id the keyring's
    registry holds at this warehouse's path: the id is read from the warehouse file, which
    the work directory's owner can change, and an anchor is found by it. A log deleted (or
    rolled back) along with a new id written into the warehouse would otherwise meet no
    anchor and verify as a new, empty log. A warehouse deleted for good and made again at
    the same path is told apart by its operator: `ehr keys forget-warehouse OLD-ID`."""
    from vault.audit import anchor_path

    location = str(workdir.warehouse.resolve())
    others = sorted(
        wid for wid, path in _registry(provider).items() if path == location and wid != own_id
    )
    problems: list[str] = []
    for other in others:
        if not anchor_path(provider, other).exists():
            continue
        shown_own = own_id or "none"
        for problem in audit_log_for(workdir, provider, other).verify().problems:
            if problem.startswith("outside anchor"):
                problems.append(
                    f"{problem}: the anchor of warehouse {other}, registered at this "
                    f"warehouse's path, which now holds id {shown_own} (if {other} was "
                    f"deleted for good, remove it: `ehr keys forget-warehouse {other}`)"
                )
    return problems


@click.command("rotate")
@_key_file_option
@workdir_option
def keys_rotate(key_file: Path | None, workdir: Workdir) -> None:
    """New key-encryption key; the data keys of every warehouse registered with the keyring
    re-wrapped; the old key retired (kept wrapped until `ehr keys purge-retired`).

    Refuses, naming them, when a registered warehouse cannot be opened. Stop pipeline runs
    first. An interrupted rotation is finished by running this again.
    """
    from vault import warehouse
    from vault.lifecycle import refuse_environment_keys, rotate_kek

    path = key_file or default_key_file()
    provider = _provider(path)
    _warn_legacy_audit_key(provider)
    try:
        refuse_environment_keys()  # before anything else asks the environment for keys
        with existing_warehouse(workdir, read_only=False) as con:
            own_id = warehouse.claim_id(con, _registry(provider))
            report = rotate_kek(path, con, audit_log_for(workdir, provider, own_id))
        _rewrite_after_rotation(workdir)
    except (DeidError, VaultError) as exc:
        raise click.ClickException(str(exc)) from exc
    retired = ", ".join(report.retired_kek_ids) or "none"
    click.echo(
        f"active KEK {report.new_kek_id}; {report.rewrapped} data keys re-wrapped in "
        f"{len(report.warehouses)} warehouse(s); retired {retired} (kept wrapped until "
        "`ehr keys purge-retired`)"
    )


def _rewrite_after_rotation(workdir: Workdir) -> None:
    """The warehouse rewritten into a fresh file, as the rotation recorded it owes
    (:func:`vault.warehouse.rewrite_if_owed`): no freed page keeps a data key wrapped under
    the KEK it retired. When another process holds the file, the rotation stands and the
    record stays, so the next writer rewrites it."""
    import duckdb

    from vault import warehouse

    try:
        warehouse.rewrite_if_owed(workdir.warehouse)
    except duckdb.IOException as exc:
        raise click.ClickException(
            f"the rotation is complete, but {workdir.warehouse} could not be rewritten ({exc}): "
            "its freed pages keep the data keys wrapped under the retired KEK until it is, "
            "which its next ingest, run or erasure does (the warehouse records that it owes it)"
        ) from exc


@click.command("purge-retired")
@_key_file_option
@workdir_option
def keys_purge_retired(key_file: Path | None, workdir: Workdir) -> None:
    """Drop the retired KEKs' material, once no registered warehouse still needs it. Backups
    taken before the last rotation can no longer be read afterwards."""
    from vault.lifecycle import purge_retired_keks

    path = key_file or default_key_file()
    provider = _provider(path)
    try:
        purged = purge_retired_keks(path, audit_log_for(workdir, provider))
    except (DeidError, VaultError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"purged {', '.join(purged)}" if purged else "no retired KEK material to purge")


@click.command("forget-warehouse")
@click.argument("warehouse_id")
@_key_file_option
def keys_forget_warehouse(warehouse_id: str, key_file: Path | None) -> None:
    """Remove a deleted warehouse (by its id, as `ehr keys rotate` names it) from the keyring's
    registry, so that rotation and purge-retired no longer wait for it. Refused while the file
    it was last seen at still holds it."""
    from vault.lifecycle import forget_warehouse

    path = key_file or default_key_file()
    _provider(path)  # a valid keyring, or its precise error
    try:
        removed = forget_warehouse(path, warehouse_id)
    except VaultError as exc:
        raise click.ClickException(str(exc)) from exc
    if not removed:
        raise click.ClickException(f"no warehouse {warehouse_id} is registered with this keyring")
    click.echo(f"removed warehouse {warehouse_id} from the keyring's registry")


@click.command("migrate-audit-key")
@_key_file_option
def keys_migrate_audit_key(key_file: Path | None) -> None:
    """Give a keyring made before audit keys existed an audit key of its own."""
    from vault.keys import migrate_audit_key

    try:
        changed = migrate_audit_key(key_file or default_key_file())
    except VaultError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("audit key added" if changed else "the keyring already has an audit key")


@click.command("forget")
@click.argument("patient")
@click.option("--pseudonym", "is_pseudonym", is_flag=True, help="PATIENT is a pseudonym")
@click.option(
    "--reason",
    required=True,
    help="why, as a reference (a ticket or request number): the audit log keeps it for good; "
    "a reason naming the patient is refused",
)
@click.option(
    "--no-release",
    "skip_release",
    is_flag=True,
    help="do not run the release after the erasure (when erasing several patients in a row: "
    "run the release after the last one, e.g. `ehr run`); until it runs, the people left in the "
    "erased patient's group stay published even when fewer than k remain",
)
@workdir_option
@_key_file_option
def forget(
    patient: str,
    is_pseudonym: bool,
    reason: str,
    skip_release: bool,
    workdir: Workdir,
    key_file: Path | None,
) -> None:
    """Erase PATIENT (an original Patient id, or a pseudonym with --pseudonym), with the other
    Patient resources sharing one of its identifiers (the same person) and the records of no
    patient that name them: a tombstone so it never comes back, its data key destroyed, purged
    from the vault, the indexes, every table with a patient_id, the released files and the
    online store; then the warehouse is rewritten into a fresh file so no freed page keeps any
    of it. Then the release runs (unless --no-release): the patient's k-anonymity group may
    now hold fewer than k people, who are withheld from every table it publishes, and the
    model trained with the patient is retrained without them. A pipeline run holding the
    warehouse is waited for, five minutes at most at each step; then the command stops and
    says so, and is run again once the warehouse is free."""
    from vault.lifecycle import forget_in_warehouse

    if is_pseudonym:
        _check_pseudonym_argument(
            patient, "without --pseudonym, PATIENT is an original Patient resource id"
        )
    provider = _provider(key_file)
    if not is_pseudonym and not patient.strip():
        raise click.ClickException("PATIENT must be a non-empty Patient resource id")
    inputs = _erasure_inputs(workdir, provider, patient, is_pseudonym, reason)
    plan = replace(
        workdir.erasure_plan(),
        unattributed_quarantine=inputs.unattributed,
        shared_resources=inputs.shared,
        identifier_keys=inputs.identifier_keys,
        batch_key_kinds=inputs.batch_key_kinds,
    )
    try:
        report = forget_in_warehouse(
            workdir.warehouse, inputs.pseudonym, inputs.audit, inputs.reason, plan=plan
        )
    except (DeidError, VaultError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    except duckdb.IOException as exc:  # announced, not done: the audit log lists it
        raise click.ClickException(IN_USE.format(path=workdir.warehouse)) from exc
    click.echo(json.dumps(report.to_dict(), indent=2))
    _warn_batch_keys_naming(inputs.batch_key_kinds)
    if not report.found:
        click.echo(
            "nothing of this patient was found; its tombstone keeps it out of later runs",
            err=True,
        )
        return
    try:
        changed = _report_release_changed(workdir)
    except click.ClickException as exc:
        raise click.ClickException(
            f"the erasure is done (the report above), but the release after it did not run: "
            f"{exc.message}; the people left in the patient's k-anonymity group stay published "
            "until a release run succeeds (ehr run)"
        ) from exc
    if changed and not skip_release:
        _release_after_erasure(workdir, key_file)


def _warn_batch_keys_naming(batch_key_kinds: tuple[tuple[str, str], ...]) -> None:
    """Say on standard error which batch keys hold an identifier of the erased person (the
    keys are the partition keys every run shows; the kinds found, never what matched)."""
    from pipelines.assets.deid import RELEASE_BATCH_KEYS_CHECK

    kinds: dict[str, list[str]] = {}
    for key, kind in batch_key_kinds:
        kinds.setdefault(key, []).append(kind)
    for key, found in kinds.items():
        click.echo(
            f"batch key {key} holds an identifier of the erased person ({', '.join(found)}): "
            "the landing folder's name, which the warehouse's batch tables, run_summary.json "
            "and Dagster's runs and partition under that key keep; every release flags it "
            f"({RELEASE_BATCH_KEYS_CHECK}): rename the folder at the source and delete those "
            "runs",
            err=True,
        )


def _release_after_erasure(workdir: Workdir, key_file: Path | None) -> None:
    """Run the release (k-anonymity, views, features, Feast, model) and say on stderr what it
    did, in counts; a failed run is an error naming its failed steps."""
    from pipelines.run import run_release
    from vault.catalog import has_table

    # standard output holds the erasure's report alone (JSON): the run's own printing (Feast's
    # materialisation says what it loads) goes to standard error with its logs
    with redirect_stdout(sys.stderr):
        record = run_release(workdir, str(key_file) if key_file else None, "ehr forget")
    if not record["success"]:
        steps = ", ".join(f"{s} ({e})" for s, e in sorted(record["failed_steps"].items()))
        raise click.ClickException(
            f"erased, but the release after it failed: {steps or 'see the run in the UI'}; the "
            "people left in the patient's k-anonymity group stay published until a release "
            "run succeeds (ehr run)"
        )
    with existing_warehouse(workdir, read_only=True, wait=True) as con:
        if not has_table(con, "released_patients"):
            return
        ((released,),) = con.execute("SELECT count(*) FROM released_patients").fetchall()
        ((withheld,),) = con.execute("SELECT count(*) FROM withheld_patients").fetchall()
    click.echo(
        f"release refreshed after the erasure: {released} patients released, {withheld} "
        "withheld below k",
        err=True,
    )


def _report_release_changed(workdir: Workdir) -> bool:
    """Tell the Dagster instance that the release input changed (a patient was erased), so
    the release (the model trained with the patient among others) shows stale and the
    release automation refreshes it; False when this warehouse never released anything."""
    from dagster import AssetMaterialization

    from deid.release import release_version
    from pipelines.assets.deid import DATA_VERSION_TAG, RELEASE_INPUT
    from pipelines.run import open_instance
    from vault.catalog import has_table

    with existing_warehouse(workdir, read_only=True, wait=True) as con:
        if not has_table(con, "deid_resources"):
            return False  # nothing was ever released from this warehouse
        version = release_version(con)
    with open_instance(workdir) as instance:
        instance.report_runless_asset_event(
            AssetMaterialization(
                RELEASE_INPUT, description="a patient was erased", tags={DATA_VERSION_TAG: version}
            )
        )
    return True


@click.command("reidentify")
@click.argument("pseudonym")
@click.option(
    "--reason",
    required=True,
    help="why, as a reference (written to the audit log first, kept for good; a reason naming "
    "the patient is refused)",
)
@workdir_option
@_key_file_option
def reidentify(pseudonym: str, reason: str, workdir: Workdir, key_file: Path | None) -> None:
    """Print the original identifiers behind a patient PSEUDONYM (audited before printing)."""
    from deid.release import SubjectCanaries
    from vault import warehouse
    from vault.lifecycle import check_pseudonym
    from vault.lifecycle import reidentify as run_reidentify

    _check_pseudonym_argument(
        pseudonym, "ehr features entities lists the released patients' pseudonyms"
    )
    provider = _provider(key_file)
    try:
        check_pseudonym(pseudonym)
        with existing_warehouse(workdir, read_only=True) as con:
            audit = audit_log_for(workdir, provider, warehouse.warehouse_id(con))
            audit.check_appendable()  # before anything of the patient is read
            subject = SubjectCanaries(_patient_versions(con, provider, pseudonym))
            _refuse_a_reason_naming_the_patient(subject, reason, audit, "reidentify", pseudonym)
            logged = _reason_to_log(con, pseudonym, reason)
            found = run_reidentify(con, provider, pseudonym, audit, logged)
    except (DeidError, VaultError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(found, indent=2, ensure_ascii=False))


@click.group("audit")
def audit() -> None:
    """The hash-chained audit log of re-identifications, erasures and key rotations."""


@audit.command("verify")
@workdir_option
@_key_file_option
def audit_verify(workdir: Workdir, key_file: Path | None) -> None:
    """Detect edited, removed, reordered and truncated entries, a deleted or rolled-back log
    (against the anchor held outside the work directory), and interrupted acts. Exits 1 on
    tampering, 2 when acts were announced but never completed."""
    provider = _provider(key_file)
    _warn_legacy_audit_key(provider)
    own_id = _known_warehouse_id(workdir, provider)
    result = audit_log_for(workdir, provider, own_id).verify()
    problems = result.problems + _anchors_of_others_registered_here(workdir, provider, own_id)
    if problems:
        click.echo(f"audit log FAILED verification ({result.entries} entries):", err=True)
        click.echo(f"  first problem: {problems[0]}", err=True)
        for problem in problems[1:]:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    if result.incomplete:
        click.echo(f"audit log intact ({result.entries} entries), but:", err=True)
        for act in result.incomplete:
            click.echo(f"  {act}", err=True)
        sys.exit(2)
    click.echo(f"audit log ok: {result.entries} entries")


@audit.command("show")
@workdir_option
@_key_file_option
def audit_show(workdir: Workdir, key_file: Path | None) -> None:
    """Print the entries, one JSON object per line (pseudonyms, key ids, counts and reasons)."""
    try:
        entries = audit_log_for(workdir, _provider(key_file)).entries()
    except (DeidError, VaultError) as exc:
        raise click.ClickException(str(exc)) from exc
    for entry in entries:
        click.echo(json.dumps(entry, ensure_ascii=False))


__all__ = [
    "audit",
    "audit_log_for",
    "forget",
    "keys_forget_warehouse",
    "keys_migrate_audit_key",
    "keys_purge_retired",
    "keys_rotate",
    "reidentify",
]
