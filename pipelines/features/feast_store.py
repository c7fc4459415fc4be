"""The Feast store of the feature tables: environment, ``feast apply``, incremental
materialisation into the online store, and what each of those did (counts only).

``feature_repo/feature_store.yaml`` names its paths through environment variables, which Feast
expands with ``os.path.expandvars`` when it loads the file (an unset variable stays literal):

- ``EHR_FEAST_DATA``: registry, online store (SQLite) and offline staging folder;
- ``EHR_FEATURES_DIR``: the feature Parquet files (read by ``feature_repo/data_sources.py`` at
  apply time and stored in the registry; default ``EHR_WORKDIR/features``).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from feast import FeatureStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

from pipelines.content import feature_repo_dir
from vault.keys import shown, without_key_material

DEFAULT_REPO = feature_repo_dir()
FEAST_DATA_ENV = "EHR_FEAST_DATA"
FEATURES_DIR_ENV = "EHR_FEATURES_DIR"


class FeastCommandError(RuntimeError):
    """A feast command failed; the message holds its exit code and output tail (object names
    and paths, never feature values)."""


def resolve_repo(repo_dir: Path | str | None = None) -> Path:
    """The Feast repo folder: as given when it exists, else the one shipped with the package
    (``feature_repo``, package data)."""
    path = Path(repo_dir) if repo_dir else DEFAULT_REPO
    if not path.exists() and path.name == DEFAULT_REPO.name:
        path = DEFAULT_REPO
    return path.resolve()


def feast_env(data_dir: Path | str, features_dir: Path | str | None = None) -> dict[str, str]:
    """The variables feature_store.yaml and data_sources.py read, as absolute paths."""
    env = {FEAST_DATA_ENV: str(Path(data_dir).resolve())}
    if features_dir is not None:
        env[FEATURES_DIR_ENV] = str(Path(features_dir).resolve())
    return env


class FeastDataNotSetError(RuntimeError):
    """EHR_FEAST_DATA is missing or relative; the message says how to fix it."""


def feast_data_from_env() -> Path:
    """``EHR_FEAST_DATA`` as an absolute path, or a :class:`FeastDataNotSetError` with the fix.

    Feast leaves an unset variable literal (and creates a folder named ``${EHR_FEAST_DATA}``)
    and resolves a relative one against the repo folder, not the working directory. A value
    shaped like a key (:func:`vault.keys.shown`) is refused without being shown."""
    value = os.environ.get(FEAST_DATA_ENV, "")
    if not value:
        raise FeastDataNotSetError(
            f"{FEAST_DATA_ENV} is not set. Fix: export {FEAST_DATA_ENV}=$PWD/data/work/feast, "
            "or call feature_store(repo, data_dir, features_dir) with the folders."
        )
    # a key pasted here would be echoed by the message below, and Feast would make folders
    # named after it: refused, named by the variable alone
    if shown(value, f"the value of {FEAST_DATA_ENV}", path=True) != value:
        raise FeastDataNotSetError(
            f"{FEAST_DATA_ENV} is not a folder path and looks like key material (not shown). "
            f"Fix: export {FEAST_DATA_ENV}=$PWD/data/work/feast (an absolute path)."
        )
    if not Path(value).is_absolute():
        raise FeastDataNotSetError(
            f"{FEAST_DATA_ENV}={value!r} is relative and Feast would resolve it against the "
            f'feature repo. Fix: export {FEAST_DATA_ENV}="$(realpath {value})".'
        )
    return Path(value)


class FeastRegistryNotFoundError(FileNotFoundError):
    """The data folder given to :func:`feature_store` holds no Feast registry: the release
    never applied the repo there (a path mistyped, or relative to another folder)."""


def feature_store(
    repo_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    features_dir: Path | str | None = None,
    *,
    create: bool = False,
) -> FeatureStore:
    """A FeatureStore over ``repo_dir`` with its registry and online store in ``data_dir``
    (default: ``EHR_FEAST_DATA``, which must then be set and absolute).

    The registry must be there already (:class:`FeastRegistryNotFoundError` otherwise, naming
    the folder it looked in), unless ``create``: the platform's own steps, which apply the repo
    there. Feast would otherwise make the folder and an empty registry, and every feature
    service would read as unknown. Sets the variables in this process's environment first:
    Feast expands them when it reads feature_store.yaml (here) and again whenever it reloads
    the config."""
    env = feast_env(data_dir if data_dir is not None else feast_data_from_env(), features_dir)
    repo = resolve_repo(repo_dir)
    os.environ.update(env)
    # read only for a caller that may not create: the platform's steps open a store per step
    registry = None if create else _config_path(repo, "registry")
    if registry is not None and not registry.is_file():
        raise FeastRegistryNotFoundError(
            f"no Feast registry in {env[FEAST_DATA_ENV]}: the release has not applied the feature "
            "repo there. Fix: give the work directory's feast folder (data/work/feast after "
            "`make demo`; a relative path is read from the current directory, "
            f"{Path.cwd()}), or run the release first (ehr run, or the feast_registry asset)."
        )
    Path(env[FEAST_DATA_ENV]).mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(repo))


@dataclass
class ApplyReport:
    entities: int
    feature_views: int
    feature_services: int
    features: int
    seconds: float
    # False when the registry already held what ``feast apply`` would write (same digest)
    applied: bool = True
    reason: str = ""
    digest: str = ""


def _feast(
    args: list[str], repo_dir: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the feast CLI in a child process: ``feast apply`` imports every .py of the repo as a
    top-level module and changes directory, which must not happen inside a Dagster process."""
    command = [sys.executable, "-c", "from feast.cli.cli import cli; cli()", *args]
    done = subprocess.run(
        command,
        cwd=repo_dir,
        # Feast reads no key: the child gets none of the keys a run may hold in its variables
        env={**without_key_material(os.environ), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise FeastCommandError(f"feast {args[0]} exited {done.returncode}: " + " | ".join(tail))
    return done


# What ``feast apply`` reads besides the repo's files: the variables feature_store.yaml and
# data_sources.py expand (never key material, which is also in EHR_* variables).
APPLY_ENV = (FEAST_DATA_ENV, FEATURES_DIR_ENV, "EHR_WORKDIR")
# The record of the last successful apply, beside the registry it describes.
APPLY_RECORD_SUFFIX = ".apply.json"


def _repo_files(repo: Path) -> list[Path]:
    """Every file of the repo apply may read; bytecode is left out, since the apply itself
    writes it (importing the modules) and would change the digest of an unchanged repo."""
    return sorted(
        p
        for p in repo.rglob("*")
        if p.is_file() and "__pycache__" not in p.relative_to(repo).parts and p.suffix != ".pyc"
    )


def rendered_config(repo: Path) -> str:
    """feature_store.yaml with its variables expanded, as Feast reads it (this process's
    environment, which :func:`feature_store` and :func:`apply_repo` set)."""
    return os.path.expandvars((repo / "feature_store.yaml").read_text())


def apply_digest(repo: Path) -> str:
    """sha256 of everything ``feast apply`` reads: the feast version, the variables of
    :data:`APPLY_ENV`, the rendered feature_store.yaml and every file of the repo."""
    import feast

    digest = hashlib.sha256()
    digest.update(f"feast {feast.__version__}\0".encode())
    for name in APPLY_ENV:
        digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
    digest.update(rendered_config(repo).encode() + b"\0")
    for path in _repo_files(repo):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _config_path(repo: Path, section: str) -> Path | None:
    """The ``path`` of a section (registry, online_store) of the rendered config, absolute."""
    config = yaml.safe_load(rendered_config(repo)) or {}
    value = config.get(section)
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str):
        return None
    return Path(path) if Path(path).is_absolute() else repo / path


def apply_record_path(registry: Path) -> Path:
    return registry.with_name(registry.name + APPLY_RECORD_SUFFIX)


def read_apply_record(registry: Path | None) -> dict[str, Any]:
    """The record of the registry's last apply (digest, generation), {} when absent or
    unreadable (which makes the next apply run)."""
    if registry is None:
        return {}
    try:
        record = json.loads(apply_record_path(registry).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# What an apply decides in the registry, and the Feast class that reads each kind. A process
# that writes the registry (a materialisation) serialises its own objects again, in a form of
# its own (a view's source then names its class), so each definition is read into its class
# and serialised again before it is compared. Each object's ``meta`` (and that of a view's
# embedded source) is left out: Feast rewrites it at every materialisation (intervals, update
# times), which changes no definition.
def _definition_kinds() -> tuple[tuple[str, Any], ...]:
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    return (
        ("entities", Entity),
        ("data_sources", DataSource),
        ("feature_views", FeatureView),
        ("feature_services", FeatureService),
    )


def _without_meta(message: Any) -> Any:
    copy = type(message)()
    copy.CopyFrom(message)
    if "meta" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("meta")
    spec = getattr(copy, "spec", None)
    if spec is not None and "batch_source" in spec.DESCRIPTOR.fields_by_name:
        spec.batch_source.ClearField("meta")
    return copy


def registry_definitions(registry: Path) -> str | None:
    """sha256 of the definitions a registry file holds (entities, sources with their paths,
    views, services) and of its record of the online tables, or None when it cannot be
    read. The same after any materialisation; another after any apply that changed them."""
    proto = RegistryProto()
    try:
        proto.ParseFromString(registry.read_bytes())
    except Exception:  # absent, or cut short mid-message (protobuf's DecodeError)
        return None
    digest = hashlib.sha256()
    for kind, cls in _definition_kinds():
        # in no order Feast promises: sorted, so that a rewrite in another order is the same
        items = sorted(
            _without_meta(cls.from_proto(o).to_proto()).SerializeToString(deterministic=True)
            for o in getattr(proto, kind)
        )
        for item in items:
            digest.update(kind.encode() + b"\0" + item + b"\0")
    digest.update(proto.infra.SerializeToString(deterministic=True))
    return digest.hexdigest()


def _write_apply_record(registry: Path, digest: str) -> None:
    """Written after a successful apply only, atomically: a crash leaves the old record (or
    none), so the next run applies again. ``generation`` is new at every apply: the online
    store is reloaded in full after one (see pipelines.features.online_sync). ``definitions``
    is what the apply left in the registry, so that an apply by anything else (``feast
    apply`` from a shell, with other paths) is noticed."""
    record = {
        "digest": digest,
        "definitions": registry_definitions(registry),
        "generation": uuid.uuid4().hex,
        "applied_at": datetime.now(UTC).isoformat(),
    }
    path = apply_record_path(registry)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def _apply_reason(registry: Path | None, digest: str) -> str | None:
    """Why ``feast apply`` must run, or None when the registry already holds its result."""
    if registry is None:
        return "registry path not in feature_store.yaml"
    if not registry.exists():
        return "no registry"
    record = read_apply_record(registry)
    previous = record.get("digest")
    if previous is None:
        return "no record of the last apply"
    if previous != digest:
        return "repo, environment or feast version changed"
    if record.get("definitions") != registry_definitions(registry):
        # applied since by something else: a shell's `feast apply` with EHR_FEATURES_DIR unset
        # or another folder's points every source there, and the releases' materialisations
        # and the training sets would read those files
        return "registry changed since the last apply"
    return None


def apply_repo(
    repo_dir: Path | str, data_dir: Path | str, features_dir: Path | str, *, force: bool = False
) -> ApplyReport:
    """``feast apply`` of the repo against the registry in ``data_dir``, with the data sources
    pointing at ``features_dir``, unless the registry was applied from the same inputs (see
    :func:`apply_digest`) and ``force`` is not set; counts what the registry then holds."""
    started = time.perf_counter()
    repo = resolve_repo(repo_dir)
    env = feast_env(data_dir, features_dir)
    os.environ.update(env)  # the digest renders feature_store.yaml as the apply will
    Path(env[FEAST_DATA_ENV]).mkdir(parents=True, exist_ok=True)
    digest = apply_digest(repo)
    registry = _config_path(repo, "registry")
    reason = _apply_reason(registry, digest)
    if registry is not None and registry.exists():
        store = feature_store(repo, data_dir, features_dir, create=True)
        if not _registry_readable(store):
            # Feast's own store rewrites its registry in place (``open(path, "wb")``, then the
            # bytes): a process killed in between left it empty (or cut short), which would pass
            # for an applied repo of no feature view. The platform's store replaces it whole
            # (pipelines.features.registry_store); a registry written before that, or by
            # another Feast, may still be such a file
            registry.unlink()
            reason = "registry empty or unreadable"
        elif foreign_online_stores(store):
            # a registry copied with its work directory lists the online tables of the directory
            # it was copied from, and feast apply drops the tables its registry lists and the
            # new config does not: that directory's online store would be emptied. A new
            # registry creates this directory's tables and drops nothing.
            registry.unlink()
            reason = "registry copied from another work directory"
        elif missing_online_tables(store):
            # feast apply creates only the online tables missing from its registry's record of
            # the infrastructure: a new registry gets every table created again
            registry.unlink()
            reason = "online store tables missing"
    if reason is None and force:
        reason = "forced"
    if reason is not None:
        _feast(["apply"], repo, env)
        if registry is not None:
            _write_apply_record(registry, digest)
    store = feature_store(repo, data_dir, features_dir, create=True)
    store.refresh_registry()
    views = store.list_feature_views()
    return ApplyReport(
        entities=len(store.list_entities()),
        feature_views=len(views),
        feature_services=len(store.list_feature_services()),
        features=sum(len(v.features) for v in views),
        seconds=round(time.perf_counter() - started, 3),
        applied=reason is not None,
        reason=reason or "registry applied from the same repo, environment and feast version",
        digest=digest,
    )


def _registry_readable(store: FeatureStore) -> bool:
    """Whether the store's registry can be read and lists a feature view (the repo declares
    several: a registry of none is one whose write was cut short)."""
    try:
        return bool(store.list_feature_views())
    except Exception:  # a registry cut short mid-message: protobuf's DecodeError, or worse
        return False


def _registry_file(store: FeatureStore) -> Path:
    path = store.config.registry.path
    return Path(path) if Path(path).is_absolute() else Path(store.repo_path) / path


def registry_generation(store: FeatureStore) -> str | None:
    """The generation of the store's last apply by :func:`apply_repo` (None: unknown)."""
    generation = read_apply_record(_registry_file(store)).get("generation")
    return generation if isinstance(generation, str) else None


def registry_materialisations(store: FeatureStore) -> str:
    """sha256 of every materialisation the store's registry records (feature view, start,
    end), read from the file: Feast records each one there, whoever ran it (a release, or
    ``feast materialize`` from a shell), and writes the online store with it."""
    proto = RegistryProto()
    proto.ParseFromString(_registry_file(store).read_bytes())
    digest = hashlib.sha256()
    for view in sorted(proto.feature_views, key=lambda v: v.spec.name):
        digest.update(view.spec.name.encode() + b"\0")
        for interval in view.meta.materialization_intervals:
            digest.update(interval.SerializeToString(deterministic=True) + b"\0")
    return digest.hexdigest()


@dataclass
class MaterializeReport:
    end: datetime
    seconds: float
    entities_online: dict[str, int] = field(default_factory=dict)


def online_store_path(store: FeatureStore) -> Path:
    """The SQLite file of the store's online store."""
    path = Path(store.config.online_store.path)
    return path if path.is_absolute() else Path(store.repo_path) / path


def online_table(store: FeatureStore, view: str) -> str:
    """The SQLite table Feast keeps a feature view's online rows in."""
    return f"{store.project}_{view}"


def _sqlite_tables(path: Path) -> set[str]:
    if not path.exists():
        return set()
    db = sqlite3.connect(path)
    try:
        # one row (see pipelines.features.online_scan._pages_by_key)
        (names,) = db.execute("SELECT json_group_array(name) FROM sqlite_master").fetchone()
        return set(json.loads(names))
    finally:
        db.close()


def foreign_online_stores(store: FeatureStore) -> set[Path]:
    """Online store files the registry's record of the infrastructure lists other than the
    store's own (a registry copied or moved with its work directory).

    The paths are read from the registry's bytes: Feast's own reading (``get_infra``) makes
    each SQLite table object, which opens a connection to its file, and so failed for the
    directory a work directory was moved from (every release after an ``mv`` stopped at the
    registry), and opened the original's files from a copy."""
    registry = _registry_file(store)
    proto = RegistryProto()
    proto.ParseFromString(registry.read_bytes())
    paths = {
        Path(o.sqlite_table.path)
        for o in proto.infra.infra_objects
        if o.WhichOneof("infra_object") == "sqlite_table" and o.sqlite_table.path
    }
    own = online_store_path(store).resolve()
    return {p for p in paths if p.resolve() != own}


def missing_online_tables(store: FeatureStore) -> list[str]:
    """Feature views without their online table (``feast apply`` creates them)."""
    tables = _sqlite_tables(online_store_path(store))
    views = store.list_feature_views()
    return [v.name for v in views if online_table(store, v.name) not in tables]


def online_entity_counts(store: FeatureStore) -> dict[str, int]:
    """Entities (patients) held per feature view in the SQLite online store."""
    path = online_store_path(store)
    tables = _sqlite_tables(path)
    counts: dict[str, int] = {}
    if not tables:
        return counts
    db = sqlite3.connect(path)
    try:
        for view in store.list_feature_views():
            table = online_table(store, view.name)
            if table in tables:
                (n,) = db.execute(f'SELECT count(DISTINCT entity_key) FROM "{table}"').fetchone()
                counts[view.name] = int(n)
    finally:
        db.close()
    return counts


# Feast's DuckDB offline store runs its queries on ibis's default backend: one DuckDB connection
# per process, which refuses a second caller while it is busy. The online store and the training
# set are refreshed side by side (pipelines.assets.serving), so every read of the offline store
# (materialisation, historical retrieval) holds this lock.
OFFLINE_STORE_LOCK = threading.RLock()


def materialize_view(store: FeatureStore, name: str, start: datetime, end: datetime) -> None:
    """Load the feature view ``name``'s rows from ``start`` to ``end`` into the online store
    (Feast's materialisation, holding the offline store's lock)."""
    with OFFLINE_STORE_LOCK:
        store.materialize(start_date=start, end_date=end, feature_views=[name])


def materialize_window(
    store: FeatureStore, end: datetime | None = None, days: int | None = None
) -> MaterializeReport:
    """Reload the online store, per feature view, from ``end`` minus its TTL (or ``days``) to
    ``end``. Needed when a rebuild brought rows with event timestamps older than the last
    incremental run (a late batch on a patient's past time line), which incremental runs skip."""
    end = end or datetime.now(UTC)
    started = time.perf_counter()
    for view in store.list_feature_views():
        span = timedelta(days=days) if days is not None else view.ttl or timedelta(days=3650)
        materialize_view(store, view.name, end - span, end)
    seconds = round(time.perf_counter() - started, 3)
    return MaterializeReport(end=end, seconds=seconds, entities_online=online_entity_counts(store))


def materialize_incremental(store: FeatureStore, end: datetime | None = None) -> MaterializeReport:
    """Load the online store with every feature row newer than the last run (or than the
    view's TTL on the first run) up to ``end`` (default now)."""
    end = end or datetime.now(UTC)
    started = time.perf_counter()
    with OFFLINE_STORE_LOCK:
        store.materialize_incremental(end_date=end)
    seconds = round(time.perf_counter() - started, 3)
    return MaterializeReport(end=end, seconds=seconds, entities_online=online_entity_counts(store))


# Materialisation starts before any plausible record (birth dates of the oldest patients).
HISTORY_START = datetime(1900, 1, 1, tzinfo=UTC)


def data_end(store: FeatureStore) -> datetime | None:
    """The latest ``event_timestamp`` over the feature views' Parquet sources: the release's
    data end, since the feature tables write no row after it."""
    import duckdb

    sources = [v.batch_source for v in store.list_feature_views()]
    paths = [getattr(s, "path", None) for s in sources]
    paths = [p for p in paths if p and Path(p).exists()]
    if not paths:
        return None
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        ((end,),) = con.execute(
            "SELECT max(event_timestamp) FROM read_parquet(?, union_by_name = true)", [paths]
        ).fetchall()
    finally:
        con.close()
    return end.astimezone(UTC) if end is not None else None


def materialize_latest(store: FeatureStore, end: datetime | None = None) -> MaterializeReport:
    """Load the online store with the latest row per patient and view, however old, up to
    ``end`` (default: the release's data end, see :func:`data_end`).

    Incremental materialisation loads [now - TTL, now] only, while a de-identified release ends
    months before now and a patient's latest row can be years old: most patients would have
    nothing online. Every row of a feature table is valid until the patient's next row, so the
    latest row at or before the data end is the patient's value now (as far as the release
    knows)."""
    end = end or data_end(store) or datetime.now(UTC)
    started = time.perf_counter()
    # Feast's end bound is exclusive of nothing but its own rounding; a microsecond margin
    # keeps a row stamped exactly at the data end
    stop = end + timedelta(microseconds=1)
    for view in store.list_feature_views():
        materialize_view(store, view.name, HISTORY_START, stop)
    seconds = round(time.perf_counter() - started, 3)
    return MaterializeReport(end=end, seconds=seconds, entities_online=online_entity_counts(store))


class UnknownEntityError(KeyError):
    """Patients the online store holds no value for (never released, opted out, or erased)."""


@dataclass
class OnlineAnswer:
    """Online feature values per requested patient, and the patients the store does not know
    (whose values would otherwise come back as silent nulls)."""

    values: dict[str, list[Any]]
    unknown: list[str]


def requested_feature_names(features: Any) -> list[str]:
    """The feature names an online answer holds for ``features``: a FeatureService or a list
    of ``view:feature`` references (as ``get_online_features`` names its columns)."""
    from feast import FeatureService

    if isinstance(features, FeatureService):
        return [f.name for p in features.feature_view_projections for f in p.features]
    return [str(ref).split(":", 1)[-1] for ref in features]


def online_features(
    store: FeatureStore, features: Any, patient_ids: Iterable[str], *, strict: bool = False
) -> OnlineAnswer:
    """``get_online_features`` for ``patient_ids`` that says which patients are unknown: a
    patient is unknown when no requested feature view holds a row for them. ``strict`` raises
    :class:`UnknownEntityError` naming how many (pseudonyms are in ``.args[1]``). No patients
    give an answer of empty columns (Feast itself fails on an empty request with an
    ``IndexError``).

    ``patient_ids`` is any iterable of pseudonyms (a list, a NumPy array, a pandas Series or
    Index, a generator), read once; a single pseudonym as a plain string is refused with a
    ``TypeError`` (iterating it would ask for one patient per character)."""
    if isinstance(patient_ids, (str, bytes)):
        raise TypeError(
            "patient_ids must be a collection of pseudonyms, not one string: "
            "pass [pseudonym] for a single patient"
        )
    # read once: an array or Series has no truth value, and a generator iterated for the
    # request would be empty when the unknown patients are looked for
    patient_ids = list(patient_ids)
    if not patient_ids:
        names = ["patient_id", *requested_feature_names(features)]
        return OnlineAnswer(values={name: [] for name in names}, unknown=[])
    response = store.get_online_features(
        features=features, entity_rows=[{"patient_id": p} for p in patient_ids]
    )
    values = response.to_dict(include_event_timestamps=True)
    # a feature's "__ts" is its row's event time, 0 (or None) when the store has no row
    stamps = [k for k in values if k.endswith("__ts") and k != "patient_id__ts"]
    unknown = [pid for i, pid in enumerate(patient_ids) if not any(values[k][i] for k in stamps)]
    stamps.append("patient_id__ts")
    values = {k: v for k, v in values.items() if k not in stamps}
    if strict and unknown:
        raise UnknownEntityError(f"{len(unknown)} patient(s) unknown to the online store", unknown)
    return OnlineAnswer(values=values, unknown=unknown)


def entity_timestamps(entity_df: pd.DataFrame, column: str = "event_timestamp") -> pd.DataFrame:
    """``entity_df`` with ``column`` as UTC instants to the microsecond (``datetime64[us, UTC]``),
    the form Feast's ``get_historical_features`` takes whatever a model builder started from.

    Naive datetimes and strings without an offset are read as UTC, an aware column in any zone
    is converted, ISO strings (of any backend) may mix precisions and offsets, and a
    pyarrow-backed column is taken; Feast 0.67 refuses the last two, and a nanosecond column
    holding an instant between two microseconds (``pd.to_datetime(seconds, unit="s")`` gives
    them) with an ``ArrowInvalid`` ("would lose data"). Such an instant is floored to the
    microsecond before it: the feature tables are stamped to the microsecond, so no feature row
    lies between the two and the point-in-time answer (the latest row at or before T, within
    the TTL) is the same.

    A row without a timestamp (``None``, ``NaT``, an empty string) raises
    :class:`MissingEntityTimestampError`, naming how many and the first row labels: Feast
    answers such a row with nulls, which a training set would take for values. A column of
    numbers, or an object column with a number among its values, raises
    :class:`EntityTimestampError`: pandas would read epoch seconds as nanoseconds."""
    out = entity_df.copy()
    values = out[column]
    if _holds_numbers(values):
        # pandas reads a number as nanoseconds since 1970: epoch seconds would become instants
        # in January 1970, and every answer null
        raise EntityTimestampError(
            f"{column} holds numbers ({values.dtype}), not instants: convert them first, e.g. "
            f'pd.to_datetime(entity_df["{column}"], unit="s", utc=True) for epoch seconds.'
        )
    if isinstance(values.dtype, pd.ArrowDtype) or not pd.api.types.is_datetime64_any_dtype(values):
        # text of any backend (object, string, pyarrow) may mix precisions and offsets
        text = pd.api.types.is_string_dtype(values)
        values = pd.to_datetime(values, utc=True, format="ISO8601" if text else None)
    elif values.dt.tz is None:
        values = values.dt.tz_localize("UTC")
    else:
        values = values.dt.tz_convert("UTC")
    missing = values.isna()
    if missing.any():
        labels = ", ".join(str(label) for label in out.index[missing.to_numpy()][:5])
        raise MissingEntityTimestampError(
            f"{int(missing.sum())} entity rows have no {column} (rows {labels}"
            f"{', ...' if missing.sum() > 5 else ''}): Feast would answer them with nulls. Drop "
            "them, or give each row the instant its features are wanted at."
        )
    out[column] = values.dt.floor("us").astype("datetime64[us, UTC]")
    return out


def _holds_numbers(values: pd.Series) -> bool:
    """Whether a column holds numbers: a numeric one, or an object one with a number among its
    values (epoch seconds read from JSON, or put in a list beside instants)."""
    if pd.api.types.is_bool_dtype(values):
        return False
    if pd.api.types.is_numeric_dtype(values):
        return True
    return values.dtype == object and bool(values.map(_is_number).any())


def _is_number(value: object) -> bool:
    """A number that is not a bool and not missing (NaN is a missing timestamp)."""
    return isinstance(value, numbers.Number) and not isinstance(value, bool) and not pd.isna(value)


class EntityTimestampError(ValueError):
    """An entity frame's timestamps that :func:`entity_timestamps` cannot read as instants."""


class MissingEntityTimestampError(EntityTimestampError):
    """Entity rows without a timestamp, which Feast answers with nulls (row labels only)."""


# pandas dtypes that keep a Feast type with missing values (NumPy would give float/object)
_PANDAS_DTYPES = {"Int64": "Int64", "Int32": "Int64", "Bool": "boolean", "String": "string"}


def declared_types(store: FeatureStore) -> dict[str, str]:
    """Feature name -> Feast type name (``Int64``, ``Bool``, ...) from the registry."""
    return {f.name: str(f.dtype) for v in store.list_feature_views() for f in v.features}


def with_declared_types(store: FeatureStore, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (from ``get_historical_features``) with Int64 and Bool features as pandas'
    nullable ``Int64`` and ``boolean``: Feast returns an integer column holding a null as float
    and a boolean one as object."""
    out = frame.copy()
    for name, dtype in declared_types(store).items():
        target = _PANDAS_DTYPES.get(dtype)
        if name in out.columns and target:
            out[name] = out[name].astype(target)
    return out
