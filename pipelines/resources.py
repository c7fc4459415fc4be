"""Dagster resources: every external system behind a ConfigurableResource with a local default."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from deid.kanon import DEFAULT_K
from deid.policy import shipped_date_rule, shipped_parameters
from pipelines import workdir as workdir_paths
from pipelines.workdir import DEFAULT_LANDING, DEFAULT_WORKDIR, Workdir
from vault import warehouse
from vault.keys import (
    ENV_KEK,
    ENV_PSEUDONYM_KEY,
    KeyMaterialError,
    KeyProvider,
    default_key_file,
    environment_keys_given,
    load_key_provider,
    shown_key_file,
)


def default_workdir() -> str:
    """``EHR_WORKDIR`` or data/work, as a resource's string field."""
    return str(workdir_paths.default_workdir())


def default_landing() -> str:
    """``EHR_LANDING`` or data/landing, as a resource's string field."""
    return str(workdir_paths.default_landing())


# seconds a thread runs Python before another waiting for the interpreter lock gets it, during
# a run (WarehouseResource)
RUN_SWITCH_INTERVAL = 0.001


class WarehouseResource(ConfigurableResource):
    """The DuckDB warehouse file and the folder that holds released files.

    Within a run, the first connection opened for writing is held until the run ends, and every
    later ``connect`` is a cursor of it (a connection to the same open database). DuckDB opens
    the file, reads its catalog and, when its last connection closes, checkpoints the
    write-ahead log into the file: once per run instead of once per step. Every commit is in the
    write-ahead log either way, so a run killed between steps loses nothing (the next open
    replays it). Outside a run (sensors, tests, the CLI), each ``connect`` opens the file.

    For the length of a run, the objects alive when it starts (the code location, Dagster,
    Feast, pandas: over a hundred thousand) are left out of Python's cycle collector
    (``gc.freeze``): each full collection during the run would otherwise walk them all again,
    about 0.1 s of a release run after a small batch. They are handed back when the run ends
    (``gc.unfreeze``), so garbage left from before is still collected.

    For the length of a run, too, a thread waiting for Python's interpreter lock asks for it
    after :data:`RUN_SWITCH_INTERVAL` instead of Python's 5 ms (``sys.setswitchinterval``). A
    release step runs two pieces side by side: one often in Python (the FHIRPath runner, the
    leak scan, Feast), the other issuing many short DuckDB statements, each of which waits for
    the lock when it returns. With 5 ms, that thread queued behind the other at every
    statement; the views after a 1 % batch took 0.80 s (median of 6) and with 1 ms 0.72 s.
    The interval in force before the run is put back when it ends."""

    workdir: str = str(DEFAULT_WORKDIR)
    _in_run: bool = PrivateAttr(default=False)
    _held: duckdb.DuckDBPyConnection | None = PrivateAttr(default=None)
    _switch_interval: float | None = PrivateAttr(default=None)

    @property
    def paths(self) -> Workdir:
        """Every path of this work directory."""
        return Workdir(Path(self.workdir))

    @property
    def path(self) -> Path:
        return self.paths.warehouse

    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """A connection the caller closes. While the run holds the file open, a cursor of it,
        also for ``read_only`` (DuckDB refuses a read-only connection beside a writable one in
        one process): then in a read-only transaction, which refuses every write and reads
        the database as it was when the connection was made."""
        if self._held is not None:
            return _read_only_cursor(self._held) if read_only else self._held.cursor()
        if self._in_run and not read_only:
            # another process (an erasure's step, a CLI command) may have the file open for a
            # moment: the run waits its turn rather than failing its first step
            self._held = warehouse.connect_when_free(self.path)
            return self._held.cursor()
        if self._in_run:  # a step that only reads waits its turn the same way
            return warehouse.connect_when_free(self.path, read_only=True)
        return warehouse.connect(self.path, read_only=read_only)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # opened lazily: a run that only reads (or a sensor) never takes the writer's lock
        self._in_run = True
        gc.freeze()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(RUN_SWITCH_INTERVAL)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        self._in_run = False
        held, self._held = self._held, None
        try:
            if held is not None:
                # an erasure, an ingest's refusal of an erased person or a key rotation,
                # killed before its rewrite, left the file owing one (warehouse.owe_rewrite):
                # done here, once
                # the run's connection is closed
                owed = warehouse.rewrite_owed(held)
                held.close()
                if owed:
                    _rewrite_owed(self.path, context)
        finally:
            gc.unfreeze()
            if self._switch_interval is not None:
                sys.setswitchinterval(self._switch_interval)
                self._switch_interval = None


def _rewrite_owed(path: Path, context: InitResourceContext) -> None:
    """The rewrite the warehouse owes (:func:`vault.warehouse.rewrite_if_owed`); when another
    process keeps the file open for the whole wait, a warning: the record stays, and the next
    writer does it."""
    try:
        warehouse.rewrite_if_owed(path)
    except duckdb.IOException as exc:
        if context.log is not None:
            context.log.warning(
                f"the warehouse owes a rewrite (an erasure's freed pages) that could not be "
                f"done now ({type(exc).__name__}); the next ingest, run or erasure does it"
            )


def _read_only_cursor(held: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    cursor = held.cursor()
    cursor.execute("BEGIN TRANSACTION READ ONLY")
    return cursor


class LandingResource(ConfigurableResource):
    """The folder FHIR exports are dropped into, and when a dropped folder counts as complete:
    it holds the marker file ``ready_marker`` (written last by the exporter), or none of its
    files has changed for ``quiet_seconds``. A copy still in progress is never ingested half."""

    path: str = str(DEFAULT_LANDING)
    ready_marker: str = "_READY"
    quiet_seconds: int = 60
    # failed batch runs are retried this many times, waiting retry_backoff_seconds, doubling
    max_retries: int = 3
    retry_backoff_seconds: int = 60


class KeyProviderResource(ConfigurableResource):
    """Key material: ``EHR_KEK``/``EHR_PSEUDONYM_KEY`` when set, else a key file (``key_file``,
    ``EHR_KEY_FILE``, or ``~/.ehr/keyring.json``). A KMS provider plugs in here."""

    key_file: str | None = None
    # the leak scan's canaries kept between runs, compiled and sealed under the vault's shared
    # data key (docs/privacy.md, "The canaries kept between runs"); False: each run process
    # decrypts the vault for them and keeps nothing
    seal_canaries: bool = True

    def provider(self) -> KeyProvider:
        with self.naming_source():
            return load_key_provider(self.key_file)

    @contextmanager
    def naming_source(self) -> Iterator[None]:
        """A key error raised inside (keys missing, or not the warehouse's own) says where the
        keys were taken from: a path or variable names, never material. Same error class."""
        try:
            yield
        except KeyMaterialError as exc:
            raise type(exc)(f"{exc} [looked in: {self.looked_in()}]") from exc

    def looked_in(self) -> str:
        """Where ``provider`` takes the key material from, as an operator would check it."""
        if environment_keys_given():
            return f"environment variables {ENV_KEK} and {ENV_PSEUDONYM_KEY}"
        return f"key file {shown_key_file(self.key_file or default_key_file())}"


class IngestSettings(ConfigurableResource):
    """Tuning for the ingest pass: worker processes for validation (0 = one per core)."""

    workers: int = 0
    # the quarantine_rate check warns when a batch quarantines more than this share of records
    max_quarantine_rate: float = 0.05

    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


class DeidSettings(ConfigurableResource):
    """The de-identification profile (``research`` or ``safe_harbor``), the k of the
    released patient table, and the largest share of patients the k-anonymity step may
    withhold before its check fails (the release is then not published). ``EHR_DEID_K`` and
    ``EHR_MAX_WITHHELD_SHARE`` override the last two at run time."""

    profile: str = "research"
    k: int = DEFAULT_K
    max_withheld_share: float = 0.05

    def date_shift_days(self) -> int:
        """The most the profile shifts a date, either way."""
        return shipped_parameters(self.profile).date_shift_days

    def time_line_shift_days(self) -> int:
        """The most the profile moves a patient's dates on their released time line, either
        way: its shift range when it shifts dates, 0 when it keeps years as they are."""
        if shipped_date_rule(self.profile) != "shift":
            return 0
        return self.date_shift_days()
