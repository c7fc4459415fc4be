"""A view refreshed after changes equals the view built from scratch over the same release.

The oracle is a full build (``run_view_over_release``) over a copy of the release in a second
warehouse, never the refresh's own bookkeeping; and, independently of the view runner, the set
of row ids equals the released resources of the view's type (withheld patients left out)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest

import pipelines.views.refresh as refresh_module
from deid.leakscan import CanarySet
from deid.release import DEID_DDL
from fhirlake.viewdef import load_view
from pipelines.views.refresh import DEFINITIONS, SOURCES, refresh_view, refresh_views
from pipelines.views.tables import VIEWS_DIR, VIEWS_SCHEMA, run_view_over_release
from vault.catalog import has_table

OBSERVATION = load_view(VIEWS_DIR / "observation.json")
PATIENT = load_view(VIEWS_DIR / "patient.json")


def _observation(rid: str, patient: str, value: float, components: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "subject": {"reference": f"Patient/{patient}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "effectiveDateTime": "2021-03-04T05:06:07Z",
        "valueQuantity": {"value": value, "unit": "mmHg"},
        "component": [
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": f"84{i}0-6"}]},
                "valueQuantity": {"value": value + i, "unit": "mmHg"},
            }
            for i in range(components)
        ],
    }


def _patient(pid: str, gender: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": "1970"}


def _put(con: duckdb.DuckDBPyConnection, resource: dict[str, Any], patient: str) -> None:
    con.execute(
        "DELETE FROM deid_resources WHERE resource_type = ? AND id = ?",
        [resource["resourceType"], resource["id"]],
    )
    con.execute(
        "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
        "VALUES (?, ?, ?, 'b', ?)",
        [resource["resourceType"], resource["id"], patient, orjson.dumps(resource).decode()],
    )


def _full_build(con: duckdb.DuckDBPyConnection, tmp: Path, view: Any) -> list[tuple[Any, ...]]:
    """The view built from scratch over a copy of the release, in its own warehouse."""
    other = tmp / "oracle"
    other.mkdir(exist_ok=True)
    (other / "w.duckdb").unlink(missing_ok=True)
    oracle = duckdb.connect(str(other / "w.duckdb"))
    oracle.execute(DEID_DDL)
    for table in ("deid_resources", "withheld_patients", "released_patients"):
        if table == "released_patients" and not has_table(con, table):
            continue
        rows = con.execute(
            f"SELECT * FROM {table}"
            if table != "withheld_patients"
            else "SELECT * FROM withheld_patients WHERE EXISTS (SELECT 1 FROM duckdb_tables() "
            "WHERE table_name = 'withheld_patients')"
        ).fetchall()
        if table == "withheld_patients":
            oracle.execute("CREATE TABLE withheld_patients (patient_id VARCHAR, reason VARCHAR)")
        if table == "released_patients":
            oracle.execute("CREATE TABLE released_patients (patient_id VARCHAR)")
        if rows:
            marks = ", ".join("?" * len(rows[0]))
            oracle.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    run_view_over_release(oracle, view, other)
    rows = oracle.execute(f"SELECT * FROM views.{view.name}").fetchall()
    oracle.close()
    return sorted(rows, key=repr)


def _released_ids(con: duckdb.DuckDBPyConnection, resource_type: str) -> set[str]:
    return {
        rid
        for (rid,) in con.execute(
            "SELECT id FROM deid_resources WHERE resource_type = ? AND patient_id NOT IN "
            "(SELECT patient_id FROM withheld_patients)",
            [resource_type],
        ).fetchall()
    }


def _assert_equal_to_full_build(
    con: duckdb.DuckDBPyConnection, tmp: Path, view: Any, resource_type: str
) -> None:
    rows = sorted(con.execute(f"SELECT * FROM views.{view.name}").fetchall(), key=repr)
    assert rows == _full_build(con, tmp, view)
    assert {r[0] for r in rows} == _released_ids(con, resource_type)
    parquet = pq.read_table(tmp / "views" / f"{view.name}.parquet").to_pylist()
    assert len(parquet) == len(rows)
    assert {r["id"] for r in parquet} == {r[0] for r in rows}


def _warehouse(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute(DEID_DDL)
    con.execute("CREATE TABLE withheld_patients (patient_id VARCHAR, reason VARCHAR)")
    return con


def test_random_changes_refresh_to_the_full_build(tmp_path: Path) -> None:
    rng = random.Random(5)
    con = _warehouse(tmp_path)
    canaries = CanarySet()
    modes = []
    for step in range(12):
        # a batch: new observations, new versions of some, a patient withheld or released
        for _ in range(rng.randint(1, 6)):
            rid = f"o{rng.randint(0, 40)}"
            patient = f"p{rng.randint(0, 7)}"
            _put(con, _observation(rid, patient, rng.uniform(50, 150), rng.randint(0, 3)), patient)
        if step % 3 == 1:
            con.execute("DELETE FROM withheld_patients")
            con.execute("INSERT INTO withheld_patients VALUES (?, 'k')", [f"p{rng.randint(0, 7)}"])
        if step % 4 == 3:
            con.execute("DELETE FROM deid_resources WHERE id = ?", [f"o{rng.randint(0, 40)}"])
        refresh = refresh_view(con, OBSERVATION, tmp_path, canaries)
        assert refresh.result.published and refresh.result.check.passed
        modes.append(refresh.mode)
        _assert_equal_to_full_build(con, tmp_path, OBSERVATION, "Observation")
    assert modes[0] == "full" and "incremental" in modes
    again = refresh_view(con, OBSERVATION, tmp_path, canaries)
    assert again.mode == "unchanged" and again.resources_changed == 0


def test_a_patient_with_no_patient_resource_is_left_out_until_it_arrives(tmp_path: Path) -> None:
    """Observations of a patient whose Patient resource had not arrived (in no k-anonymity
    group, so in neither ``released_patients`` nor ``withheld_patients``) stayed in the view
    and its Parquet file, where the features and the label leave her out. A view holds the
    rows of released patients and of no patient only, and takes a patient's rows in, or out,
    as the release lists her; the expected ids are the test's own record of what it put."""
    con = _warehouse(tmp_path)
    con.execute("CREATE TABLE released_patients (patient_id VARCHAR)")
    owners = {f"o{i}": f"p{i % 4}" for i in range(12)}
    for rid, patient in owners.items():
        _put(con, _observation(rid, patient, 100.0 + len(rid), 1), patient)
    no_subject = _observation("o-shared", "p0", 90.0, 0)
    del no_subject["subject"]
    _put(con, no_subject, None)  # type: ignore[arg-type]
    released: set[str] = set()

    def release(patients: set[str]) -> None:
        released.clear()
        released.update(patients)
        con.execute("DELETE FROM released_patients")
        for patient in sorted(patients):
            con.execute("INSERT INTO released_patients VALUES (?)", [patient])

    def view_ids() -> set[str]:
        return {rid for (rid,) in con.execute("SELECT id FROM views.observation").fetchall()}

    def expected() -> set[str]:
        return {rid for rid, patient in owners.items() if patient in released} | {"o-shared"}

    canaries = CanarySet()
    for patients, mode in (
        ({"p0", "p1"}, "full"),  # p2 and p3 sent encounters and observations, no Patient yet
        ({"p0", "p1", "p2"}, "incremental"),  # p2's Patient arrives
        ({"p0", "p2"}, "incremental"),  # p1 leaves the release (withheld, erased)
    ):
        release(patients)
        refresh = refresh_view(con, OBSERVATION, tmp_path, canaries)
        assert refresh.mode == mode and refresh.result.published
        assert view_ids() == expected()
        rows = sorted(con.execute("SELECT * FROM views.observation").fetchall(), key=repr)
        assert rows == _full_build(con, tmp_path, OBSERVATION)
        parquet = pq.read_table(tmp_path / "views" / "observation.parquet").to_pylist()
        assert {r["id"] for r in parquet} == expected()


def test_only_changed_resources_are_rebuilt(tmp_path: Path) -> None:
    con = _warehouse(tmp_path)
    for i in range(20):
        _put(con, _patient(f"p{i}", "female"), f"p{i}")
    first = refresh_view(con, PATIENT, tmp_path, CanarySet())
    assert (first.mode, first.resources_changed) == ("full", 20)
    # the k-anonymity step rewrites one Patient, another patient arrives, one is withheld
    _put(con, _patient("p3", "male"), "p3")
    _put(con, _patient("p20", "other"), "p20")
    con.execute("INSERT INTO withheld_patients VALUES ('p7', 'k')")
    second = refresh_view(con, PATIENT, tmp_path, CanarySet())
    assert (second.mode, second.resources_changed, second.resources_removed) == (
        "incremental",
        2,
        1,
    )
    _assert_equal_to_full_build(con, tmp_path, PATIENT, "Patient")


def test_a_crash_before_the_bookkeeping_only_redoes_the_same_rows(tmp_path: Path) -> None:
    con = _warehouse(tmp_path)
    for i in range(5):
        _put(con, _patient(f"p{i}", "female"), f"p{i}")
    refresh_view(con, PATIENT, tmp_path, CanarySet())
    before = con.execute(f"SELECT * FROM {SOURCES}").fetchall()
    _put(con, _patient("p5", "male"), "p5")
    refresh_view(con, PATIENT, tmp_path, CanarySet())
    # as if killed after the view was published and before its sources were recorded
    con.execute(f"DELETE FROM {SOURCES}")
    con.executemany(f"INSERT INTO {SOURCES} VALUES (?, ?, ?, ?)", before)
    redo = refresh_view(con, PATIENT, tmp_path, CanarySet())
    assert (redo.mode, redo.resources_changed) == ("incremental", 1)
    _assert_equal_to_full_build(con, tmp_path, PATIENT, "Patient")


def test_a_release_and_bookkeeping_written_before_the_stored_digests_rebuild_nothing(
    tmp_path: Path,
) -> None:
    """A warehouse whose ``deid_resources`` has no digest column and whose bookkeeping holds
    the digests as text (as written before): the next refresh fills the column, reads the
    bookkeeping as numbers, rebuilds nothing and still finds a resource changed after it."""
    con = _warehouse(tmp_path)
    for i in range(6):
        _put(con, _patient(f"p{i}", "female"), f"p{i}")
    assert refresh_view(con, PATIENT, tmp_path, CanarySet()).mode == "full"
    con.execute("ALTER TABLE deid_resources DROP COLUMN digest")
    con.execute(f"ALTER TABLE {SOURCES} ALTER digest SET DATA TYPE VARCHAR")
    again = refresh_view(con, PATIENT, tmp_path, CanarySet())
    assert (again.mode, again.resources_changed) == ("unchanged", 0)
    # the column as the views now read it: each row's digest is the hash of its text
    ((stale,),) = con.execute(
        "SELECT count(*) FROM deid_resources WHERE digest IS DISTINCT FROM hash(resource)"
    ).fetchall()
    assert stale == 0
    _put(con, _patient("p2", "male"), "p2")
    third = refresh_view(con, PATIENT, tmp_path, CanarySet())
    assert (third.mode, third.resources_changed) == ("incremental", 1)
    _assert_equal_to_full_build(con, tmp_path, PATIENT, "Patient")


def test_a_new_patients_name_in_a_kept_row_withdraws_the_view(tmp_path: Path) -> None:
    con = _warehouse(tmp_path)
    odd = _patient("p1", "female")
    odd["gender"] = "Quillfeather"  # an older row holding text a later patient's name matches
    _put(con, odd, "p1")
    assert refresh_view(con, PATIENT, tmp_path, CanarySet()).result.published
    _put(con, _patient("p2", "male"), "p2")
    canaries = CanarySet()
    canaries.add_patient({"name": [{"family": "Quillfeather", "given": ["Marisol"]}]}, "p2")
    refresh = refresh_view(con, PATIENT, tmp_path, canaries)
    assert not refresh.result.published and refresh.result.check.by_kind() == {"name": 1}
    # the name is in a row the published view holds: the view is taken down, table and file
    assert refresh.withdrawn
    assert not has_table(con, "patient", VIEWS_SCHEMA)
    assert not (tmp_path / "views" / "patient.parquet").exists()
    # the next refresh builds it in full and refuses it while the leak is there
    again = refresh_view(con, PATIENT, tmp_path, canaries)
    assert again.mode == "full" and not again.result.published
    assert not (tmp_path / "views" / "patient.parquet").exists()


def test_a_leak_in_the_new_rows_only_keeps_the_published_view(tmp_path: Path) -> None:
    con = _warehouse(tmp_path)
    _put(con, _patient("p1", "female"), "p1")
    assert refresh_view(con, PATIENT, tmp_path, CanarySet()).result.published
    published = (tmp_path / "views" / "patient.parquet").read_bytes()
    leaky = _patient("p2", "male")
    leaky["gender"] = "Quillfeather"  # the new row holds a patient's name
    _put(con, leaky, "p2")
    canaries = CanarySet()
    canaries.add_patient({"name": [{"family": "Quillfeather", "given": ["Marisol"]}]}, "p3")
    refresh = refresh_view(con, PATIENT, tmp_path, canaries)
    assert not refresh.result.published and not refresh.withdrawn
    # the rows published before were clean: they stay, and the refused rows are not there
    assert con.execute("SELECT id FROM views.patient").fetchall() == [("p1",)]
    assert (tmp_path / "views" / "patient.parquet").read_bytes() == published
    assert refresh_view(con, PATIENT, tmp_path, canaries).resources_changed == 1


def test_a_changed_definition_rebuilds_in_full(tmp_path: Path) -> None:
    con = _warehouse(tmp_path)
    _put(con, _patient("p1", "female"), "p1")
    refresh_view(con, PATIENT, tmp_path, CanarySet())
    changed = load_view(VIEWS_DIR / "patient.json")
    changed.document = {**changed.document, "description": "another revision"}
    assert refresh_view(con, changed, tmp_path, CanarySet()).mode == "full"
    (tmp_path / "views" / "patient.parquet").unlink()
    assert refresh_view(con, changed, tmp_path, CanarySet()).mode == "full"


def test_views_refreshed_side_by_side_equal_their_full_builds(tmp_path: Path) -> None:
    rng = random.Random(11)
    con = _warehouse(tmp_path)
    canaries = CanarySet()
    modes: list[tuple[str, str]] = []
    for step in range(8):
        # a batch: patients arrive or are rewritten, observations arrive or change
        for _ in range(rng.randint(1, 4)):
            pid = f"p{rng.randint(0, 9)}"
            _put(con, _patient(pid, rng.choice(["female", "male", "other"])), pid)
        for _ in range(rng.randint(1, 6)):
            patient = f"p{rng.randint(0, 9)}"
            rid = f"o{rng.randint(0, 30)}"
            _put(con, _observation(rid, patient, rng.uniform(50, 150), rng.randint(0, 3)), patient)
        if step == 4:  # one view built again in full while the other is refreshed in place
            con.execute(f"DELETE FROM {DEFINITIONS} WHERE view = ?", [PATIENT.name])
        refreshed = list(refresh_views(con, [PATIENT, OBSERVATION], tmp_path, canaries))
        assert [view.name for view, _ in refreshed] == [PATIENT.name, OBSERVATION.name]
        assert all(r.result.published for _, r in refreshed)
        modes += [(view.name, r.mode) for view, r in refreshed]
        _assert_equal_to_full_build(con, tmp_path, PATIENT, "Patient")
        _assert_equal_to_full_build(con, tmp_path, OBSERVATION, "Observation")
    assert (PATIENT.name, "full") in modes[2:] and (OBSERVATION.name, "incremental") in modes


def test_a_failing_view_leaves_the_others_refreshed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    con = _warehouse(tmp_path)
    _put(con, _patient("p1", "female"), "p1")
    _put(con, _observation("o1", "p1", 90.0, 1), "p1")
    real = refresh_module._refresh_prepared

    def failing_patient_view(c: Any, view: Any, *args: Any) -> Any:
        if view.name == PATIENT.name:
            raise RuntimeError("the patient view failed")
        return real(c, view, *args)

    monkeypatch.setattr(refresh_module, "_refresh_prepared", failing_patient_view)
    done = []
    with pytest.raises(RuntimeError, match="the patient view failed"):
        for view, refresh in refresh_views(con, [PATIENT, OBSERVATION], tmp_path, CanarySet()):
            done.append((view.name, refresh.mode))
    assert done == [(OBSERVATION.name, "full")]
    _assert_equal_to_full_build(con, tmp_path, OBSERVATION, "Observation")
    assert not has_table(con, PATIENT.name, VIEWS_SCHEMA)
