"""`ehr run` killed with SIGKILL in the middle of each stage, then run again: the result is
exactly that of a run never interrupted (row counts and content digests of every released table,
every released Parquet file and the Feast online store)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

from deid.release import SEALED_CANARIES, sealed_state, vault_state
from fhirlake.synthetic import generate
from pipelines.features.tables import FEATURE_TABLES
from pipelines.publish import unfinished_temporaries
from tests.feast_stores import stored_rows
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer
from vault.sealed_cache import SEALED_CACHE_TABLE, read_entry

pytestmark = pytest.mark.e2e

EHR = str(Path(sys.executable).parent / "ehr")
# columns holding the time a table was built, not its content
VOLATILE = {"created", "created_at", "built_at", "trained_at"}
RUN_TIMEOUT = 600


def _env(key_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "EHR_KEK")}
    # EHR_DEID_K: 30 patients cannot be 5-anonymous without withholding most of them
    env.update(EHR_KEY_FILE=str(key_file), PYTHONWARNINGS="ignore", EHR_DEID_K="1")
    return env


def _run(
    landing: Path, workdir: Path, key_file: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``ehr run`` of ``landing`` into ``workdir``, its output kept (a failure raises, unless
    ``check`` is off)."""
    return subprocess.run(
        [EHR, "run", "--input", str(landing), "--workdir", str(workdir)],
        env=_env(key_file),
        check=check,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def _run_and_kill(
    landing: Path,
    workdir: Path,
    key_file: Path,
    when: Callable[[str, Path], bool],
    delay: float,
) -> bool:
    """Start `ehr run`, SIGKILL its whole process group ``delay`` seconds after ``when`` holds
    for its log so far; True when it was killed (not finished first)."""
    log = workdir.parent / f"{workdir.name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [EHR, "run", "--input", str(landing), "--workdir", str(workdir)],
            env=_env(key_file),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + RUN_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        if when(log.read_text(errors="replace"), workdir):
            time.sleep(delay)
            if process.poll() is not None:
                return False
            os.killpg(process.pid, signal.SIGKILL)  # the run and its validation workers
            process.wait()
            return True
        time.sleep(0.2)
    return False


def _select(columns: list[tuple[str, str]]) -> str:
    """Content columns; floating-point values to 9 decimals, since DuckDB's parallel sums may
    differ in the last bits between any two runs."""
    return ", ".join(
        f'round("{c}", 9)' if t.upper() in ("DOUBLE", "FLOAT", "REAL") else f'"{c}"'
        for c, t in columns
        if c not in VOLATILE
    )


def _table_digests(warehouse: Path) -> dict[str, tuple[int, str]]:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        tables = con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema IN ('views', 'features', 'models') OR table_name IN "
            "('deid_resources', 'deid_errors', 'released_patients')"
        ).fetchall()
        digests = {}
        for schema, name in tables:
            columns = con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = ? AND table_name = ?",
                [schema, name],
            ).fetchall()
            select = _select(columns)
            count, digest = con.execute(
                f"SELECT count(*), md5(coalesce(string_agg(r, chr(10) ORDER BY r), '')) FROM "
                f'(SELECT CAST(ROW({select}) AS VARCHAR) AS r FROM "{schema}"."{name}")'
            ).fetchall()[0]
            digests[f"{schema}.{name}"] = (int(count), str(digest))
        return digests
    finally:
        con.close()


def _parquet_digests(workdir: Path) -> dict[str, tuple[int, str]]:
    con = duckdb.connect()
    digests = {}
    for path in sorted(workdir.glob("*/*.parquet")):
        described = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
        select = _select([(c, t) for (c, t, *_) in described])
        count, digest = con.execute(
            f"SELECT count(*), md5(coalesce(string_agg(r, chr(10) ORDER BY r), '')) FROM "
            f"(SELECT CAST(ROW({select}) AS VARCHAR) AS r FROM read_parquet(?))",
            [str(path)],
        ).fetchall()[0]
        digests[str(path.relative_to(workdir))] = (int(count), str(digest))
    return digests


def _online_store(workdir: Path) -> dict[str, int]:
    """Rows per feature view table of the online store (values are checked by the leak scan
    and come from the feature tables compared above)."""
    db = workdir / "feast" / "online_store.db"
    con = sqlite3.connect(db)
    try:
        names = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: int(con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0]) for n in names}
    finally:
        con.close()


def released(workdir: Path) -> dict[str, object]:
    return {
        "tables": _table_digests(workdir / "warehouse.duckdb"),
        "parquet": _parquet_digests(workdir),
        "online": _online_store(workdir),
    }


# (stage, when to kill: its log so far and its workdir, seconds after that)
KILL_POINTS: list[tuple[str, Callable[[str, Path], bool], float]] = [
    # the first run of the crashed workdir: once ingest has opened the warehouse
    ("ingest", lambda log, work: (work / "warehouse.duckdb").exists(), 2.0),
    ("deid", lambda log, work: "ingest - batch" in log, 1.0),
    ("views", lambda log, work: "released_patients - k=" in log, 1.5),
    ("features", lambda log, work: "view procedure (" in log, 0.3),
    ("feast", lambda log, work: "feast apply" in log, 1.0),
]


def test_killed_runs_then_a_rerun_equal_an_uninterrupted_run(
    tmp_path: Path, key_file: Path
) -> None:
    landing = tmp_path / "landing"
    generate(landing / "batch-a", 30, seed=21, fmt="ndjson")
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _run(landing, reference, key_file)
    killed = [
        stage
        for stage, when, delay in KILL_POINTS
        if _run_and_kill(landing, crashed, key_file, when, delay)
    ]
    assert killed, "no run could be killed before it finished"
    _run(landing, crashed, key_file)
    expected, got = released(reference), released(crashed)
    assert got["tables"] == expected["tables"], killed
    assert got["parquet"] == expected["parquet"], killed
    assert got["online"] == expected["online"], killed
    # nor a temporary file of a killed publish (every row of its table then) beside them
    left = [p for f in ("views", "features") for p in unfinished_temporaries(crashed / f)]
    assert not left, (killed, [p.name for p in left])
    print(f"killed during: {', '.join(killed)}")


# the kill points of tests/e2e/kill_points/sitecustomize.py, in the order a release reaches them
RELEASE_KILL_POINTS = ("view_parquet_replaced", "features_computed", "online_rows_written")
KILL_HOOK = Path(__file__).parent / "kill_points"


def _run_killed_at(landing: Path, workdir: Path, key_file: Path, point: str) -> str:
    """`ehr run`, killed (its process group, SIGKILL) where ``point`` is first reached; the
    point the kill landed at ("" when the run finished first)."""
    mark = workdir.parent / "killed_at"
    mark.unlink(missing_ok=True)
    env = _env(key_file)
    env.update(
        EHR_KILL_AT=point,
        EHR_KILL_MARK=str(mark),
        PYTHONPATH=os.pathsep.join([str(KILL_HOOK), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    subprocess.run(
        [EHR, "run", "--input", str(landing), "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        start_new_session=True,  # the kill takes the run's own process group, not this one
    )
    return mark.read_text() if mark.exists() else ""


def _late_batch(landing: Path, patients: int) -> None:
    """Move the ``patients`` patient files whose newest date is the oldest from ``batch-a`` to
    ``batch-b``: their batch leaves the release's data end where it was, so the release after
    it changes the feature tables in place (a later data end rebuilds them in full)."""
    files = sorted((landing / "batch-a").glob("[0-9]*.json"))
    newest = {p: max(re.findall(r'"(\d{4}-\d{2}-\d{2})', p.read_text())) for p in files}
    (landing / "batch-b").mkdir()
    for path in sorted(files, key=lambda p: newest[p])[:patients]:
        shutil.move(path, landing / "batch-b" / path.name)


def test_an_incremental_release_killed_in_each_step_then_run_again_equals_one_never_killed(
    tmp_path: Path, key_file: Path
) -> None:
    """The release after a second batch changes the views, the feature tables, the online store
    and the training set in place: killed where a view's new Parquet file is in place and its
    transaction not committed, then (in the run that follows) where the feature rows of the
    changed patients are computed and not published, then where one feature view's rows are
    in the online store and the others' and the snapshot are not, and run once more, it equals
    the same release never killed, online-store values included."""
    full = tmp_path / "landing_full"
    generate(full / "batch-a", 30, seed=21)
    _late_batch(full, 4)
    first = tmp_path / "landing_first"
    shutil.copytree(full / "batch-a", first / "batch-a")
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    for work in (reference, crashed):
        _run(first, work, key_file)
    done = _run(full, reference, key_file)
    log = done.stdout + done.stderr
    assert "features (incremental)" in log and "view observation (incremental)" in log, log[-3000:]
    killed = [_run_killed_at(full, crashed, key_file, p) for p in RELEASE_KILL_POINTS]
    assert killed == list(RELEASE_KILL_POINTS)
    _run(full, crashed, key_file)
    expected, got = released(reference), released(crashed)
    assert got["tables"] == expected["tables"]
    assert got["parquet"] == expected["parquet"]
    online = Path("feast") / "online_store.db"
    assert stored_rows(crashed / online) == stored_rows(reference / online)
    left = [p for f in ("views", "features") for p in unfinished_temporaries(crashed / f)]
    assert not left, [p.name for p in left]


def _opt_out_batch(landing: Path, batch: str) -> str:
    """A batch ``batch`` holding the Consent of the first patient of ``batch-a`` who permits
    research, sent again (same id) as a research opt-out naming the patient as ``Patient/<id>``;
    returns that patient's source id."""
    for path in sorted((landing / "batch-a").glob("[0-9]*.json")):
        resources = [e["resource"] for e in json.loads(path.read_text())["entry"]]
        (patient,) = [r for r in resources if r["resourceType"] == "Patient"]
        (consent,) = [r for r in resources if r["resourceType"] == "Consent"]
        if consent["provision"]["type"] != "permit":
            continue
        reference = {"reference": f"Patient/{patient['id']}"}
        consent.update(patient=reference, performer=[reference])
        consent.pop("organization", None)
        consent["policyRule"]["coding"][0].update(code="OPTOUT", display="opt-out")
        consent["provision"]["type"] = "deny"
        (landing / batch).mkdir()
        (landing / batch / "opt-out.ndjson").write_text(json.dumps(consent) + "\n")
        return str(patient["id"])
    raise AssertionError("no patient permits research")


def _online_patients(db: Path, pseudonyms: set[str]) -> set[str]:
    """Which of ``pseudonyms`` the online store holds a row of (the entity key holds the
    pseudonym's text)."""
    keys = {key for rows in stored_rows(db).values() for (key, *_) in rows}
    return {p for p in pseudonyms if any(p.encode() in key for key in keys)}


def test_a_run_killed_while_feast_writes_its_registry_then_run_again_equals_one_never_killed(
    tmp_path: Path, key_file: Path
) -> None:
    """Feast writes its file registry each time a materialisation records its interval, as the
    first release's full load of the online store does; Feast's own store rewrote it in place
    (``open(path, "wb")``, then the bytes), so a run killed between the two left an empty
    registry, which Feast reads as one of no feature view: a model builder's retrieval failed
    until the next run. The platform's store writes a temporary file and renames it over the
    registry: killed with the new bytes written and not renamed, the registry is still the one
    applied, whole; run again, the release equals one never killed, and a later research
    opt-out must leave the online store."""
    landing = tmp_path / "landing"
    generate(landing / "batch-a", 30, seed=21)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _run(landing, reference, key_file)
    point = "registry_temporary_written"
    assert _run_killed_at(landing, crashed, key_file, point) == point
    registry = RegistryProto()
    registry.ParseFromString((crashed / "feast" / "registry.db").read_bytes())
    assert len(registry.feature_views) == len(FEATURE_TABLES)
    again = _run(landing, crashed, key_file, check=False)
    assert again.returncode == 0, (again.stdout + again.stderr)[-1500:]
    expected, got = released(reference), released(crashed)
    assert got["tables"] == expected["tables"]
    assert got["parquet"] == expected["parquet"]
    online = Path("feast") / "online_store.db"
    assert stored_rows(crashed / online) == stored_rows(reference / online)

    # a later batch opts one patient out of research: no online row of theirs stays served
    source_id = _opt_out_batch(landing, "batch-b")
    pseudonyms = Pseudonymizer(FileKeyProvider.load(key_file).pseudonym_key())
    opted_out = {pseudonyms.resource_key("Patient", source_id)}
    assert _online_patients(crashed / online, opted_out) == opted_out
    _run(landing, crashed, key_file)
    assert _online_patients(crashed / online, opted_out) == set()


def test_a_run_killed_once_it_sealed_its_canaries_then_run_again_equals_one_never_killed(
    tmp_path: Path, key_file: Path
) -> None:
    """Killed just after the batch's de-identification sealed the canaries (its scan not run,
    nothing published), the run again takes that sealed set, for the same vault state, and
    its release equals an uninterrupted run's."""
    landing, reference, crashed = _killed_beside_a_reference(
        tmp_path, key_file, "sealed_canaries_written"
    )
    sealed = _sealed_parts(crashed)
    assert sealed
    again = _run(landing, crashed, key_file, check=False)
    assert again.returncode == 0, (again.stdout + again.stderr)[-1500:]
    # the set the killed run sealed was taken, not made again (a new seal has a new nonce)
    assert _sealed_parts(crashed) == sealed
    expected, got = released(reference), released(crashed)
    assert got["tables"] == expected["tables"]
    assert got["parquet"] == expected["parquet"]
    assert got["online"] == expected["online"]


def _killed_beside_a_reference(
    tmp_path: Path, key_file: Path, point: str
) -> tuple[Path, Path, Path]:
    """A generated batch run to its end in one work directory (the reference) and killed at
    ``point`` in another (the kill checked to have landed there): the landing folder and the
    two work directories."""
    landing = tmp_path / "landing"
    generate(landing / "batch-a", 30, seed=21)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _run(landing, reference, key_file)
    assert _run_killed_at(landing, crashed, key_file, point) == point
    return landing, reference, crashed


def _sealed_parts(workdir: Path) -> list[tuple[str, int, bytes]]:
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT state, part, sealed FROM sealed_cache ORDER BY part").fetchall()
    finally:
        con.close()
    return [(str(state), int(part), bytes(blob)) for state, part, blob in rows]


def test_a_run_killed_before_its_sealed_canaries_commit_then_run_again_equals_one_never_killed(
    tmp_path: Path, key_file: Path
) -> None:
    """Killed inside the transaction that seals the canaries (the entry's parts deleted and
    inserted, not committed), the warehouse holds no part of that entry, and the run again
    seals a whole one and releases what an uninterrupted run does."""
    landing, reference, crashed = _killed_beside_a_reference(
        tmp_path, key_file, "sealed_canaries_uncommitted"
    )
    # the first write of the entry was not committed: nothing of it is there
    assert not _holds_sealed_canaries(crashed, key_file)
    assert _sealed_parts(crashed) == []
    again = _run(landing, crashed, key_file, check=False)
    assert again.returncode == 0, (again.stdout + again.stderr)[-1500:]
    assert _holds_sealed_canaries(crashed, key_file)  # sealed whole by the run again
    expected, got = released(reference), released(crashed)
    assert got["tables"] == expected["tables"]
    assert got["parquet"] == expected["parquet"]
    assert got["online"] == expected["online"]


def _holds_sealed_canaries(workdir: Path, key_file: Path) -> bool:
    """Whether the warehouse holds the sealed canaries of its vault state, opened whole
    (:func:`read_entry` raises for a part changed, missing or moved); every entry's parts are
    numbered 0 to n-1, none missing, in one state. The canaries are not returned: an assertion
    that failed on them would print PHI."""
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        rows = con.execute(
            f"SELECT name, list(DISTINCT state), list(part ORDER BY part) "
            f"FROM {SEALED_CACHE_TABLE} GROUP BY name"
        ).fetchall()
        for name, states, parts in rows:
            assert len(states) == 1 and parts == list(range(len(parts))), (name, states, parts)
        provider = FileKeyProvider.load(key_file)
        state = vault_state(con, provider)
        assert state is not None
        return read_entry(con, provider, SEALED_CANARIES, sealed_state(state)) is not None
    finally:
        con.close()
