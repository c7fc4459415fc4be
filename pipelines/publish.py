"""Publishing a table twice, as a DuckDB table and as a Parquet file, so that a reader of either
sees the old rows or the new ones and never a half-written table or file.

The DuckDB side swaps a fully built staging table in within one transaction; the Parquet side
is written to a temporary file beside the target, flushed to disk, then renamed over it (a rename
within one folder is atomic). A failure before the swap leaves the old table, the old file and
no temporary file behind; a process killed in between leaves its temporary file, with every row
of the table it was publishing, and the next publish of the same target removes it
(:func:`unfinished_temporaries`; an erasure removes them all). A folder of files that belong
together (a model with its metrics, card and plots) is published as one set through a symlink
switched by one rename (:func:`publish_folder`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import duckdb

from vault.keys import exclusive_lock, fsync_dir, fsync_file

STAGING_SUFFIX = "__staging"
# A publish's temporary Parquet file: ``.<target name>.<8 of tempfile's characters>.tmp``
TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))


def new_temporary(target: Path) -> Path:
    """A new, empty temporary file beside ``target``, under a unique hidden name: two writers
    never share it, globs for ``*.parquet`` never see it, and :func:`unfinished_temporaries`
    finds it where a kill left it. Private (0600, as tempfile makes it) or, when ``target``
    exists, with its mode: a file replaced keeps the mode it was given."""
    fd, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent
    )
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, stat.S_IMODE(target.stat().st_mode))
    finally:
        os.close(fd)
    return Path(name)


def unfinished_temporaries(folder: Path, target: str | None = None) -> list[Path]:
    """The temporary files of publishes into ``folder`` (of the target named ``target`` only,
    when given) that were never renamed into place. A publish that fails removes its own; a
    process killed between writing one and renaming it (SIGKILL, a power loss) leaves it
    there, holding every row the table had then: patients erased or withheld since included.
    Nothing reads them. Only a process that holds the warehouse open for writing may remove
    them: every publish writes its temporary file with the warehouse open, so no other
    process is writing one meanwhile."""
    if not Path(folder).is_dir():
        return []
    found = []
    for entry in sorted(Path(folder).iterdir()):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or (target is not None and match["target"] != target):
            continue
        if entry.is_file() and not entry.is_symlink():
            found.append(entry)
    return found


def _remove_unfinished_temporaries(target: Path) -> None:
    """Remove what killed publishes of ``target`` left (:func:`unfinished_temporaries`)."""
    for entry in unfinished_temporaries(target.parent, target.name):
        entry.unlink(missing_ok=True)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _stage(
    con: duckdb.DuckDBPyConnection, staging: str, source: str | duckdb.DuckDBPyRelation
) -> None:
    con.execute(f"DROP TABLE IF EXISTS {staging}")
    if isinstance(source, duckdb.DuckDBPyRelation):
        source.create(staging)
    else:
        con.execute(f"CREATE TABLE {staging} AS {source}")


def _copy_parquet(
    con: duckdb.DuckDBPyConnection, table: str, path: Path, compression: str | None
) -> None:
    """Write ``table`` to ``path`` as Parquet and flush the file to disk."""
    options = "FORMAT parquet" + (f", COMPRESSION {compression}" if compression else "")
    con.execute(f"COPY {table} TO {_sql_string(str(path))} ({options})")
    fsync_file(path)


def write_replacing(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through a temporary file beside it (``write`` writes the file it is
    given), so a reader sees the old or the new file, never half of one. A write that fails
    leaves the old file and no temporary one; a process killed before the rename leaves its
    temporary file (:func:`new_temporary`) for :func:`unfinished_temporaries` to find."""
    tmp = new_temporary(Path(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


T = TypeVar("T")


def folder_version_pattern(path: Path) -> re.Pattern[str]:
    """The names of the hidden siblings of ``path`` that :func:`publish_folder` creates: the
    versions of the folder (``.NAME-<16 hex digits>``) and, for the instant before they are
    renamed, the symlinks to them (``.NAME-<16 hex digits>.link``)."""
    return re.compile(rf"\.{re.escape(Path(path).name)}-[0-9a-f]{{16}}(\.link)?")


def _version_name(path: Path) -> Path:
    return path.with_name(f".{path.name}-{secrets.token_hex(8)}")


def _new_version(path: Path) -> Path:
    while True:
        version = _version_name(path)
        try:
            version.mkdir()  # with the umask, as the folder it replaces was made
            return version
        except FileExistsError:
            continue


def _fsync_tree(folder: Path) -> None:
    for entry in sorted(folder.rglob("*"), reverse=True):
        if entry.is_symlink():
            continue
        if entry.is_dir():
            fsync_dir(entry)
        else:
            fsync_file(entry)
    fsync_dir(folder)


def _remove_entry(entry: Path) -> None:
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """One publisher of ``path`` at a time (an flock on ``.NAME.lock`` beside it): each removes
    the versions it did not publish, which must not be another publisher's folder in the making."""
    with exclusive_lock(path.with_name(f".{path.name}.lock")):
        yield


def publish_folder(path: Path, write: Callable[[Path], T]) -> T:
    """Publish the files ``write`` writes (into the empty folder it is given) as one set at
    ``path``, so that a reader of ``path/...`` sees the files of the previous publish or of this
    one, never a mix of the two, a file half-written or a folder half-filled; returns what
    ``write`` returns.

    ``path`` is a symlink to a hidden sibling folder, one per publish (``.NAME-<random>``).
    ``write`` fills a new one; its files are flushed to disk, a symlink to it is made under a
    temporary name and renamed over ``path`` (a rename replaces a symlink atomically), and the
    previous version is removed. A ``path`` that is still a plain folder (as every publish left
    it before) is moved aside as a version first: only then is there a brief instant without
    ``path``, which a crash there leaves as no model at all, never a mix. A failure or a crash
    before the rename leaves ``path`` as it was; the folder of an unfinished publish (at most
    one) is removed by the next one. Readers keep using ``path``: one that reads several files
    and must see them from one publish resolves ``path`` once (``Path.resolve``) and reads
    from there.

    Why a symlink rather than every file renamed into place one by one: the set of files of a
    model is then replaced whole for every reader, where renamed files could only be checked
    afterwards (a digest of each in the last one written) by readers that know to. No reader
    keeps a path into a version: the model's Dagster metadata serves copies of the plots (in
    the compute-log folder), and an erasure deletes the training record through ``path``.
    The lock file ``.NAME.lock`` stays beside ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path):
        version = _new_version(path)
        try:
            result = write(version)
            _fsync_tree(version)
            link = version.with_name(f"{version.name}.link")
            os.symlink(version.name, link)  # relative: the work directory can be moved
            aside: Path | None = None
            try:
                if path.is_dir() and not path.is_symlink():
                    aside = _version_name(path)
                    os.rename(path, aside)
                os.replace(link, path)
            except BaseException:
                if aside is not None and aside.exists() and not path.exists():
                    os.rename(aside, path)
                link.unlink(missing_ok=True)
                raise
        except BaseException:
            shutil.rmtree(version, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        _remove_versions_but(path, version.name)
    return result


def _remove_versions_but(path: Path, *kept: str) -> int:
    """Remove the hidden versions of ``path`` (and symlinks about to be renamed) other than
    those named ``kept``; how many (the caller holds the folder's lock)."""
    pattern = folder_version_pattern(path)
    removed = 0
    for entry in path.parent.iterdir():
        if entry.name not in kept and pattern.fullmatch(entry.name):
            _remove_entry(entry)
            removed += 1
    return removed


def _link_chain(path: Path) -> list[str] | None:
    """The names of the entries beside ``path`` that its link leads through, to the folder it
    finally names (one, as :func:`publish_folder` makes it); None when it leads anywhere else."""
    beside, entry = path.parent.resolve(), path
    names: list[str] = []
    while entry.is_symlink() and len(names) < 40:
        entry = entry.parent / os.readlink(entry)  # an absolute target replaces the parent
        if entry.parent.resolve() != beside:
            return None
        names.append(entry.name)
    return names or None


def remove_unpublished_versions(path: Path) -> int:
    """Remove what a publish of ``path`` (:func:`publish_folder`) killed after its rename left
    beside it: the previous version, which that publish would have removed next, and the
    folder of a publish killed before it. Such a publish leaves ``path`` whole; its leftovers
    would wait for the next publish, which may be many releases away for a model that is kept.
    Returns how many were removed; nothing is removed while ``path`` is not a symlink to a
    version (a plain folder of an older publish, or none)."""
    path = Path(path)
    if not path.parent.is_dir():
        return 0
    with _folder_lock(path):
        kept = _link_chain(path)  # None for a plain folder, no folder, or a link elsewhere
        return 0 if kept is None else _remove_versions_but(path, *kept)


def _swap_in(con: duckdb.DuckDBPyConnection, staging: str, target: str) -> None:
    """Replace ``target`` with ``staging`` in one transaction: readers see one or the other."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"DROP TABLE IF EXISTS {target}")
        con.execute(f"ALTER TABLE {staging} RENAME TO {target.split('.')[-1]}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One DuckDB transaction: committed when the block ends, rolled back when it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


class CheckOutcome(Protocol):
    """What a publish check returns: anything with ``passed`` (a leak scan result, a report)."""

    @property
    def passed(self) -> bool: ...


CheckT = TypeVar("CheckT", bound=CheckOutcome)
PublishCheck = Callable[[duckdb.DuckDBPyConnection, str], CheckT]


@dataclass(frozen=True)
class PublishOutcome(Generic[CheckT]):
    """Rows staged, whether they were swapped in, and what the check said."""

    rows: int
    published: bool
    check: CheckT


@dataclass(frozen=True)
class CheckGroup:
    """The results of several checks of one staging table; passed when every one passed."""

    results: dict[str, CheckOutcome]

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results.values())


def all_checks(**checks: PublishCheck[Any]) -> PublishCheck[CheckGroup]:
    """One publish check made of named checks (e.g. a leak scan and an opted-out check), all
    run over the same staging table; each result stays readable by its name."""

    def run(con: duckdb.DuckDBPyConnection, staging: str) -> CheckGroup:
        return CheckGroup({name: check(con, staging) for name, check in checks.items()})

    return run


def publish_table(
    con: duckdb.DuckDBPyConnection,
    schema_table: str,
    parquet_path: Path,
    source: str | duckdb.DuckDBPyRelation,
    *,
    compression: str | None = None,
) -> int:
    """Replace the DuckDB table ``schema_table`` (``schema.name``) and the file ``parquet_path``
    with the rows of ``source`` (a SELECT statement or a relation of ``con``); the row count.

    ``compression`` is a DuckDB Parquet codec (``zstd``, ``snappy``...); DuckDB's default when
    None. Both names must be trusted identifiers: they are spliced into SQL.
    """
    return _publish(con, schema_table, parquet_path, source, None, compression)[0]


def publish_checked(
    con: duckdb.DuckDBPyConnection,
    schema_table: str,
    parquet_path: Path,
    source: str | duckdb.DuckDBPyRelation,
    check: PublishCheck[CheckT],
    *,
    compression: str | None = None,
) -> PublishOutcome[CheckT]:
    """Stage, check, then publish: the rows of ``source`` are written to a staging table,
    ``check(con, staging_table)`` runs over them, and only when its result has ``passed`` are
    the DuckDB table and the Parquet file replaced. A failed check drops the staging table and
    writes no file, so the previous release stays as it was and nothing of the new one is
    visible."""
    rows, result = _publish(con, schema_table, parquet_path, source, check, compression)
    if result is None:  # _publish always runs a check it is given
        raise RuntimeError("publish check returned no result")
    return PublishOutcome(rows, result.passed, result)


def _publish(
    con: duckdb.DuckDBPyConnection,
    schema_table: str,
    parquet_path: Path,
    source: str | duckdb.DuckDBPyRelation,
    check: PublishCheck[CheckT] | None,
    compression: str | None,
) -> tuple[int, CheckT | None]:
    schema, _, name = schema_table.rpartition(".")
    if not schema or not name:
        raise ValueError(f"expected schema.table, got {schema_table!r}")
    target = Path(parquet_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    staging = f"{schema}.{name}{STAGING_SUFFIX}"
    _remove_unfinished_temporaries(target)
    tmp = new_temporary(target)
    result: CheckT | None = None
    try:
        _stage(con, staging, source)
        ((rows,),) = con.execute(f"SELECT count(*) FROM {staging}").fetchall()
        if check is not None:
            result = check(con, staging)
            if not result.passed:
                # the failed rows never reach the table or a file
                con.execute(f"DROP TABLE IF EXISTS {staging}")
                tmp.unlink(missing_ok=True)
                return int(rows), result
        _copy_parquet(con, staging, tmp, compression)
        _swap_in(con, staging, schema_table)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute(f"DROP TABLE IF EXISTS {staging}")
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return int(rows), result


@dataclass(frozen=True)
class TableChange:
    """Statements that bring the published table ``table`` (``schema.name``, trusted) up to
    date in place (deletes and inserts of the rows that changed), and its Parquet file."""

    table: str
    parquet: Path
    statements: tuple[str, ...]
    compression: str | None = None
    # the Parquet file's row order (trusted SQL), for readers that depend on it
    order_by: str | None = None


def publish_in_place(
    con: duckdb.DuckDBPyConnection,
    changes: list[TableChange],
    *,
    check: Callable[[duckdb.DuckDBPyConnection], CheckT] | None = None,
    record: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
) -> CheckT | None:
    """Change published tables in place, with work in proportion to the rows that changed
    rather than a copy of every table: all in one transaction, which readers see whole or not
    at all.

    Within the transaction, after the statements: ``check(con)`` runs over the changed tables
    (through ``con`` itself: a cursor is a second connection and sees the committed rows);
    when its result has not ``passed``, everything is rolled back and no file is written.
    Otherwise ``record(con)`` writes the caller's bookkeeping, each table is copied to a
    temporary Parquet file, and the files are renamed over their targets before the commit.
    A crash before the commit leaves the tables and the bookkeeping as they were (the next
    refresh redoes the same rows); a file renamed by then already holds what that refresh
    writes again. A commit that fails (an I/O error, a conflict), as any other error, puts
    every file back as it was: the tables and their files stay alike."""
    temporaries: list[tuple[Path, Path]] = []
    previous: list[tuple[Path | None, Path]] = []
    con.execute("BEGIN TRANSACTION")
    try:
        for change in changes:
            for statement in change.statements:
                con.execute(statement)
        result = check(con) if check is not None else None
        if result is not None and not result.passed:
            con.execute("ROLLBACK")
            return result
        if record is not None:
            record(con)
        for change in changes:
            target = Path(change.parquet)
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_unfinished_temporaries(target)
            tmp = new_temporary(target)
            temporaries.append((tmp, target))
            source = change.table
            if change.order_by:
                source = f"(SELECT * FROM {change.table} ORDER BY {change.order_by})"
            _copy_parquet(con, source, tmp, change.compression)
        for tmp, target in temporaries:
            previous.append((_second_name(target), target))
            os.replace(tmp, target)
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        for tmp, _ in temporaries:
            tmp.unlink(missing_ok=True)
        _put_back(previous)
        raise
    for kept, _ in previous:
        if kept is not None:
            kept.unlink(missing_ok=True)
    for directory in {target.parent for _, target in temporaries}:
        fsync_dir(directory)
    return result


def _second_name(target: Path) -> Path | None:
    """A second name (a hard link, or a copy where the file system has none, named as a
    publish's temporary file) for the file at ``target``, to put back if the transaction its
    replacement belongs to does not commit; None when there is no file. A process killed
    before it is removed leaves it as it leaves a temporary file: the next publish of
    ``target`` removes it (:func:`unfinished_temporaries`)."""
    if not target.exists():
        return None
    kept = new_temporary(target)
    kept.unlink()
    try:
        os.link(target, kept)
    except OSError:  # a file system without hard links (FAT, some network shares): a copy
        shutil.copy2(target, kept)
    return kept


def _put_back(previous: list[tuple[Path | None, Path]]) -> None:
    """Each target as it was before its file was renamed over it (or no file, where there was
    none): the transaction the new files belong to did not commit."""
    for kept, target in previous:
        if kept is None:
            target.unlink(missing_ok=True)
        else:
            os.replace(kept, target)
