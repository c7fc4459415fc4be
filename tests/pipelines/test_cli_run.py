"""``ehr run`` when a run fails: the command says which run and step failed and exits 1, with
neither a traceback of its own nor the error's text in its summary (Dagster's own log of the
failure, like the run's page in the UI, shows the error)."""

from __future__ import annotations

import base64
import json
import shutil
import stat
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

import deid.methods as deid_methods
import pipelines.assets.ingest as ingest_assets
from fhirlake.synthetic import generate
from pipelines.cli import main
from pipelines.run import build_summary, run_pipeline, write_summary
from pipelines.workdir import Workdir
from vault import warehouse
from vault.ingest import reconcile_batch

pytestmark = pytest.mark.e2e

# an error text a careless library could carry: the command must not repeat it
SECRET_TEXT = "text that must not be printed"


class IngestBrokeError(RuntimeError):
    pass


REAL_INGEST = ingest_assets.ingest_batch


def _broken_ingest(*args: object, **kwargs: object) -> None:
    raise IngestBrokeError(SECRET_TEXT)


def _second_batch_broken(path: object, batch_id: str, *args: object, **kwargs: object) -> object:
    if batch_id == "b2":
        raise IngestBrokeError(SECRET_TEXT)
    return REAL_INGEST(path, batch_id, *args, **kwargs)  # type: ignore[arg-type]


def _ehr_run(landing: Path, workdir: Path) -> tuple[Result, dict[str, Any], list[str]]:
    """``ehr run`` through the CLI: its result, the summary it wrote, its output's lines."""
    result = CliRunner().invoke(
        main, ["run", "--input", str(landing), "--workdir", str(workdir), "--workers", "1"]
    )
    assert result.exit_code == 1, result.output
    summary = json.loads((workdir / "run_summary.json").read_text())
    return result, summary, result.output.splitlines()


def test_a_failed_batch_run_is_named_with_its_step(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate(tmp_path / "landing" / "b1", 3, seed=2)
    monkeypatch.setattr(ingest_assets, "ingest_batch", _broken_ingest)
    workdir = tmp_path / "work"
    result, summary, lines = _ehr_run(tmp_path / "landing", workdir)
    assert not isinstance(result.exception, KeyError), result.output
    (run,) = summary["runs"]  # the release is not run after a failed batch
    assert run["batch"] == "b1" and not run["success"]
    assert run["failed_steps"] == {"ingest": "IngestBrokeError"}
    assert f"  batch b1: run {run['run_id']} failed at ingest (IngestBrokeError)" in lines
    assert "some runs failed: open the Dagster UI (make ui) for details" in lines
    assert SECRET_TEXT not in (workdir / "run_summary.json").read_text()
    summary_lines = lines[
        lines.index(
            "ingest: 0 records in, 0 accepted, 0 quarantined; vault holds 0 resources of 0 patients"
        ) :
    ]
    assert not any(SECRET_TEXT in line for line in summary_lines)


def test_a_failed_batch_after_a_good_one(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The good batch is reconciled, the failed one named; the release does not run."""
    generate(tmp_path / "landing" / "b1", 3, seed=2)
    generate(tmp_path / "landing" / "b2", 3, seed=3)
    monkeypatch.setattr(ingest_assets, "ingest_batch", _second_batch_broken)
    _, summary, lines = _ehr_run(tmp_path / "landing", tmp_path / "work")
    assert [(r["batch"], r["success"]) for r in summary["runs"]] == [("b1", True), ("b2", False)]
    failed = summary["runs"][1]
    assert "  batch b1: reconciled=True" in lines
    assert f"  batch b2: run {failed['run_id']} failed at ingest (IngestBrokeError)" in lines
    # no release run: the k-anonymous table is not said to hold 0 patients
    (deid,) = [line for line in lines if line.startswith("deid: ")]
    assert deid.endswith("the k-anonymous table not rebuilt (no release run)"), deid


def _resources_in(folder: Path) -> int:
    """The distinct resources of a landing folder's bundles, counted here from the files."""
    found = set()
    for path in folder.glob("*.json"):
        document = json.loads(path.read_text())
        for entry in document.get("entry", []) if document.get("resourceType") == "Bundle" else []:
            found.add((entry["resource"]["resourceType"], entry["resource"]["id"]))
    return len(found)


def test_a_batch_under_another_pseudonym_key_is_refused_and_nothing_is_stranded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Environment keys, the pseudonym key regenerated between two runs: the batch under the
    new key fails at its ingest, naming the error's class, and writes nothing; with the
    warehouse's own key back, the same re-sent batch is ingested as the same resources and
    the release runs."""
    monkeypatch.delenv("EHR_KEY_FILE", raising=False)
    monkeypatch.setenv("EHR_KEK", base64.b64encode(bytes(range(32))).decode())
    monkeypatch.setenv("EHR_MAX_WITHHELD_SHARE", "1")  # three patients cannot make groups of 5
    landing, workdir = tmp_path / "landing", tmp_path / "work"
    generate(landing / "b1", 3, seed=2)
    expected = f"vault holds {_resources_in(landing / 'b1')} resources of 3 patients"

    def run_with(pseudonym_key: bytes) -> Result:
        monkeypatch.setenv("EHR_PSEUDONYM_KEY", base64.b64encode(pseudonym_key).decode())
        return CliRunner().invoke(
            main, ["run", "--input", str(landing), "--workdir", str(workdir), "--workers", "1"]
        )

    first = run_with(bytes(range(32, 64)))
    assert first.exit_code == 0, first.output
    assert expected in first.output
    shutil.copytree(landing / "b1", landing / "b2")  # the same export, sent again

    refused = run_with(bytes(range(64, 96)))
    assert refused.exit_code == 1, refused.output
    run = json.loads((workdir / "run_summary.json").read_text())["runs"][-1]
    assert run["batch"] == "b2" and run["failed_steps"] == {"ingest": "PseudonymKeyMismatchError"}
    # Dagster's log of the failure (the run's page in the UI) names the key ids and the source
    assert "is not the one this warehouse was built with" in refused.output
    assert "[looked in: environment variables EHR_KEK and EHR_PSEUDONYM_KEY]" in refused.output
    assert base64.b64encode(bytes(range(64, 96))).decode() not in refused.output
    assert expected in refused.output

    again = run_with(bytes(range(32, 64)))
    assert again.exit_code == 0, again.output
    assert "  batch b2: reconciled=True" in again.output.splitlines()
    assert expected in again.output


def test_a_resource_another_batch_holds_stays_released_after_a_file_is_removed(
    tmp_path: Path, key_file: Path
) -> None:
    """a_batch holds Patients p0 and p1, b_batch p0 again, the same bytes (recorded as
    unchanged). After p0's file leaves a_batch, one ``ehr run`` keeps p0 in the vault (as
    b_batch's row) and in the release (b_batch de-identified again in the same run), and both
    batches reconcile. The counts are worked out from the files written here."""
    generate(tmp_path / "gen", 3, seed=4, fmt="ndjson")
    lines = (tmp_path / "gen" / "Patient.ndjson").read_bytes().splitlines(keepends=True)
    land = tmp_path / "landing"
    for batch, names in (("a_batch", ("p0", "p1")), ("b_batch", ("p0",))):
        (land / batch).mkdir(parents=True)
        for name in names:
            (land / batch / f"{name}.ndjson").write_bytes(lines[int(name[1])])
    workdir = tmp_path / "work"
    run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    (land / "a_batch" / "p0.ndjson").unlink()
    summary = run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    patients = len({lines[0], lines[1]})  # p0 (still in b_batch) and p1 (in a_batch)
    assert summary["stages"]["ingest"]["vault_resources_current"] == patients
    assert _released_patients_by_batch(workdir) == [("a_batch", 1), ("b_batch", 1)]
    con = warehouse.connect(workdir / "warehouse.duckdb", read_only=True)
    try:
        assert all(reconcile_batch(con, b).passed for b in ("a_batch", "b_batch"))
    finally:
        con.close()


def test_a_version_a_corrected_later_export_drops_is_released_from_the_earlier_one(
    tmp_path: Path, key_file: Path
) -> None:
    """export_1 holds a Patient, export_2 the same Patient with versionId 2; export_2 is then
    corrected to drop it. One ``ehr run`` releases export_1's version again (its released
    row had been replaced by export_2's): the Patient is in the release once, from export_1."""
    generate(tmp_path / "gen", 3, seed=4, fmt="ndjson")
    lines = (tmp_path / "gen" / "Patient.ndjson").read_bytes().splitlines(keepends=True)
    first, other = orjson.loads(lines[0]), orjson.loads(lines[1])
    second = {**first, "meta": {"versionId": "2"}, "gender": "unknown"}
    land = tmp_path / "landing"
    for batch, resources in (("export_1", [first]), ("export_2", [second, other])):
        (land / batch).mkdir(parents=True)
        (land / batch / "p.ndjson").write_bytes(
            b"".join(orjson.dumps(r) + b"\n" for r in resources)
        )
    workdir = tmp_path / "work"
    run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    (land / "export_2" / "p.ndjson").write_bytes(orjson.dumps(other) + b"\n")
    run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    # the first Patient from export_1 (its only version left), the other from export_2
    assert _released_patients_by_batch(workdir) == [("export_1", 1), ("export_2", 1)]


def _released_patients_by_batch(workdir: Path) -> list[tuple[str, int]]:
    """(batch, released Patients) of the work directory's release, by batch."""
    con = warehouse.connect(workdir / "warehouse.duckdb", read_only=True)
    try:
        return con.execute(
            "SELECT batch_id, count(*) FROM deid_resources WHERE resource_type = 'Patient' "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
    finally:
        con.close()


def test_a_keyring_others_may_read_is_refused_before_a_warehouse_is_made(
    tmp_path: Path, key_file: Path
) -> None:
    """`ehr run` with a keyring of mode 0644: the batch fails at ingest naming the error's
    class, Dagster's log of it names the path, the mode and the chmod, and no warehouse is
    made; the keyring is left as it was."""
    generate(tmp_path / "landing" / "b1", 3, seed=2)
    key_file.chmod(0o644)
    before = key_file.read_bytes()
    workdir = tmp_path / "work"
    result, summary, _ = _ehr_run(tmp_path / "landing", workdir)
    (run,) = summary["runs"]
    assert run["failed_steps"] == {"ingest": "KeyFilePermissionError"}
    assert f"key file {key_file} has mode 0644" in result.output
    assert f"chmod 600 {key_file}" in result.output
    assert not (workdir / "warehouse.duckdb").exists()
    assert key_file.read_bytes() == before
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o644


def test_the_summary_counts_the_patients_withheld_below_k(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The summary's deid stage gave the released resources and the k-anonymous table's size,
    and `ehr run` printed "0 withheld" (resources the de-identification withheld) while 3 of
    120 patients were withheld below k: the count is in the summary and on that line."""
    release = {"released_patients": {"dagster/row_count": 117, "withheld": 3, "patients": 120}}
    totals = {
        "release": {"released": 10, "released_by_type": {"Patient": 10}, "withheld": {}},
        "vault_resources_current": 10,
        "vault_patients": 120,
    }
    summary = build_summary({}, release, [], totals, {})
    deid = summary["stages"]["deid"]
    assert (deid["released_patients"], deid["withheld_patients"]) == (117, 3)
    assert "withheld_patients" not in build_summary({}, {}, [], totals, {})["stages"]["deid"]

    summary["success"] = True
    monkeypatch.setattr("pipelines.run.run_pipeline", lambda *args, **kwargs: summary)
    (tmp_path / "in").mkdir()
    result = CliRunner().invoke(
        main, ["run", "--input", str(tmp_path / "in"), "--workdir", str(tmp_path / "w")]
    )
    assert result.exit_code == 0, result.output
    assert (
        "deid: 10 resources released, 0 withheld; 117 patients in the k-anonymous table, "
        "3 withheld below k" in result.output
    )


def test_an_input_with_no_batch_is_named_without_a_traceback(tmp_path: Path) -> None:
    """`ehr run` over a folder holding no FHIR data file ended in a traceback of the
    FileNotFoundError; it is a usage error naming what the folder holds (never a file name),
    and no work directory is made."""
    (tmp_path / "in" / "export").mkdir(parents=True)
    (tmp_path / "in" / "export" / "Patient-Zedwick.xml").write_bytes(b"<Patient/>")
    workdir = tmp_path / "work"
    result = CliRunner().invoke(
        main, ["run", "--input", str(tmp_path / "in"), "--workdir", str(workdir)]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Error: no FHIR data files (.json, .ndjson, .json.gz, .ndjson.gz)" in result.output
    assert "not a FHIR data file extension: 1" in result.output
    assert "Traceback" not in result.output and "Zedwick" not in result.output
    assert not workdir.exists()


def test_a_run_waits_while_another_process_has_the_warehouse_open(
    tmp_path: Path, key_file: Path
) -> None:
    """Another process (an erasure, another command) has the warehouse open when ``ehr run``
    starts and when its batch is ingested: the run waits its turn, as its steps that write do,
    instead of failing the batch's ingest or stopping with DuckDB's lock error."""
    import subprocess
    import sys

    generate(tmp_path / "landing" / "b1", 3, seed=2)
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    warehouse.connect(workdir / "warehouse.duckdb").close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
            "print('ok', flush=True); time.sleep(float(sys.argv[2])); c.close()",
            str(workdir / "warehouse.duckdb"),
            "6",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        args = ["--input", str(tmp_path / "landing"), "--workdir", str(workdir), "--workers", "1"]
        result = CliRunner().invoke(main, ["run", *args])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output
    assert "  batch b1: reconciled=True" in result.output.splitlines()
    summary = json.loads((workdir / "run_summary.json").read_text())
    assert [(r["batch"], r["success"]) for r in summary["runs"]] == [("b1", True), (None, True)]


def test_one_run_releases_a_batch_as_the_batches_after_it_leave_its_references(
    tmp_path: Path, key_file: Path
) -> None:
    """b1 holds Patient p1 and an Encounter naming its patient by MRN; b2, run after it, holds
    p2 with the same MRN. With two holders the reference names no one: one ``ehr run`` of both
    folders releases b1 again after b2 (its ledger changed), and the Encounter names no patient,
    as a release of b1 after b2 gives; every batch ends settled. Ingest filed the Encounter
    under p1 by that reference: b1 is ingested again too, and the Encounter is no one's."""
    system, mrn = "http://hospital.example.org/mrn", "12345"

    def patient(pid: str) -> dict[str, Any]:
        return {
            "resourceType": "Patient",
            "id": pid,
            "identifier": [{"system": system, "value": mrn}],
        }

    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient?identifier={system}|{mrn}"},
        "period": {"start": "2020-01-01", "end": "2020-01-01"},
    }
    land = tmp_path / "landing"
    for batch, records in (("b1", [patient("p1"), encounter]), ("b2", [patient("p2")])):
        (land / batch).mkdir(parents=True)
        (land / batch / "data.ndjson").write_bytes(
            b"".join(orjson.dumps(r) + b"\n" for r in records)
        )
    workdir = tmp_path / "work"
    summary = run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    assert all(run["success"] for run in summary["runs"])
    con = warehouse.connect(workdir / "warehouse.duckdb", read_only=True)
    try:
        ((text, owner),) = con.execute(
            "SELECT resource, patient_id FROM deid_resources WHERE resource_type = 'Encounter'"
        ).fetchall()
        settled = {b for (b,) in con.execute("SELECT batch_id FROM deid_batches").fetchall()}
    finally:
        con.close()
    assert "subject" not in orjson.loads(text) and owner is None
    assert [run["batch"] for run in summary["runs"]] == ["b1", "b2", "b1", None]
    assert summary["stages"]["ingest"]["batches_deidentified_again"] == []
    assert settled == {"b1", "b2"}
    again = run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    assert again["stages"]["ingest"]["batches_already_done"] == ["b1", "b2"]


def test_an_opt_out_by_identifier_applies_once_a_later_batch_brings_her_patient(
    tmp_path: Path, key_file: Path
) -> None:
    """b1 holds a research deny whose patient is given by MRN alone, and no Patient holds the
    MRN: it is filed under no patient. b2, run later, brings her Patient (and another
    patient's): the next ``ehr run`` ingests b1 again, the Consent is filed under her, and she
    is in no feature table, while the other patient is."""
    system, mrn = "http://hospital.example.org/mrn", "LATE778899"
    consent = {
        "resourceType": "Consent",
        "id": "c1",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": system, "value": mrn}},
        "provision": {"type": "deny"},
    }

    def patient(pid: str, identifier: str) -> dict[str, Any]:
        return {
            "resourceType": "Patient",
            "id": pid,
            "gender": "female",
            "birthDate": "1960-05-05",
            "identifier": [{"system": system, "value": identifier}],
        }

    def visit(pid: str) -> dict[str, Any]:
        return {
            "resourceType": "Encounter",
            "id": f"e-{pid}",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{pid}"},
            "period": {"start": "2020-01-01", "end": "2020-01-01"},
        }

    land, workdir = tmp_path / "landing", tmp_path / "work"
    (land / "b1").mkdir(parents=True)
    (land / "b1" / "consent.ndjson").write_bytes(orjson.dumps(consent) + b"\n")
    assert all(r["success"] for r in run_pipeline(land, workdir, str(key_file), 1)["runs"])
    (land / "b2").mkdir()
    records = [patient("p9", mrn), patient("p8", "OTHER1234"), visit("p9"), visit("p8")]
    data = b"".join(orjson.dumps(r) + b"\n" for r in records)
    (land / "b2" / "patients.ndjson").write_bytes(data)
    summary = run_pipeline(land, workdir, str(key_file), 1)
    assert [r["batch"] for r in summary["runs"]] == ["b2", "b1", None]
    assert all(r["success"] for r in summary["runs"])
    con = warehouse.connect(workdir / "warehouse.duckdb", read_only=True)
    try:
        ((hers,),) = con.execute(
            "SELECT patient_id FROM deid_resources WHERE resource_type = 'Consent'"
        ).fetchall()
        patients = {p for (p,) in con.execute("SELECT patient_id FROM views.patient").fetchall()}
        featured = {
            p
            for (p,) in con.execute(
                "SELECT patient_id FROM features.patient_demographics"
            ).fetchall()
        }
    finally:
        con.close()
    assert hers in patients and len(patients) == 2
    assert featured == patients - {hers}


def test_a_batch_that_cannot_be_listed_is_left_for_the_next_run_and_the_others_run(
    tmp_path: Path, key_file: Path, refuse_listing: Any
) -> None:
    """A batch folder holding a sub-folder the process may not list stopped `ehr run` for every
    batch. Now the others run, the release follows them, and the command names that batch by
    its key (no name below it) and exits 1; once it can be read, the next run takes it."""
    landing = tmp_path / "landing"
    generate(landing / "b1", 3, seed=2)
    secret = landing / "b2" / "Quillfeather_Marisol"
    generate(secret, 3, seed=3)
    allow = refuse_listing(secret)
    workdir = tmp_path / "work"
    result, summary, lines = _ehr_run(landing, workdir)
    assert [(r["batch"], r["success"]) for r in summary["runs"]] == [("b1", True), (None, True)]
    assert not summary["success"]
    (reason,) = summary["stages"]["ingest"]["batches_not_read"].values()
    assert reason.startswith("batch b2: a folder 1 level down in the batch could not be listed")
    assert f"  {reason}: not read, left for the next run (the other batches ran)" in lines
    assert "  batch b1: reconciled=True" in lines
    for text in (result.output, (workdir / "run_summary.json").read_text()):
        assert "Quillfeather" not in text, text

    allow()
    again = CliRunner().invoke(
        main, ["run", "--input", str(landing), "--workdir", str(workdir), "--workers", "1"]
    )
    assert again.exit_code == 0, again.output
    summary = json.loads((workdir / "run_summary.json").read_text())
    runs = [(r["batch"], r["success"]) for r in summary["runs"]]
    # b1 may run again after it: b2's references can change what b1's name (documented)
    assert runs[0] == ("b2", True) and runs[-1] == (None, True) and all(ok for _, ok in runs)
    assert summary["stages"]["ingest"]["batches_not_read"] == {}


def _released(workdir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The released tables, in a fixed order."""
    con = warehouse.connect(workdir / "warehouse.duckdb", read_only=True)
    try:
        return {
            "deid_resources": con.execute(
                "SELECT resource_type, id, patient_id, resource::VARCHAR FROM deid_resources "
                "ORDER BY ALL"
            ).fetchall(),
            "released_patients": con.execute(
                "SELECT * EXCLUDE (patient_id) FROM released_patients ORDER BY ALL"
            ).fetchall(),
            "quasi": con.execute(
                "SELECT patient_id, birth_year FROM release_quasi_identifiers ORDER BY ALL"
            ).fetchall(),
        }
    finally:
        con.close()


def _birth_observations(released: dict[str, list[tuple[Any, ...]]]) -> list[str]:
    return sorted(
        orjson.loads(row[3])["valueDateTime"]
        for row in released["deid_resources"]
        if row[0] == "Observation"
    )


def _on_day(monkeypatch: pytest.MonkeyPatch, day: date) -> None:
    """Today, in UTC, for every stage of the run (deid.methods.today_utc's clock)."""
    moment = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    monkeypatch.setattr(deid_methods, "utcnow", lambda: moment)


BORN = "1937-06-15"  # 90 on 15 June 2027


def _stable_until(workdir: Path) -> dict[str, date | None]:
    """The ledger's stable_until of each batch (in clear beside it)."""
    con = warehouse.connect(workdir / "warehouse.duckdb", read_only=True)
    try:
        return dict(con.execute("SELECT batch_id, stable_until FROM deid_batches").fetchall())
    finally:
        con.close()


def test_a_new_day_ingests_nothing_and_deidentifies_again_only_a_batch_it_changes(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b1 holds a patient who turns 90 on 15 June 2027, with an observation of her birth date;
    b2 a patient of 46. The age limit counts calendar years: her birth date is over it from
    1 January 2027. The run of 31 December 2026 releases both; the next day's run ingests
    nothing and de-identifies b1 alone again, from the vault (her birth date is now one over
    the age limit: the year of 90), and its release equals a first run on that day's; the run
    after, on 2 January, changes nothing. Each batch's stable_until, in clear in the ledger,
    is a 1 January. Before, the first run of each day ingested and de-identified every batch
    again."""
    birth_date = {"system": "http://loinc.org", "code": "21112-8"}

    def patient(pid: str, born: str) -> dict[str, Any]:
        return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": born}

    def born_on(pid: str, born: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": f"o-{pid}",
            "status": "final",
            "code": {"coding": [birth_date]},
            "subject": {"reference": f"Patient/{pid}"},
            "valueDateTime": born,
        }

    land = tmp_path / "landing"
    batches = {
        "b1": [patient("p1", BORN), born_on("p1", BORN)],
        "b2": [patient("p2", "1980-03-14"), born_on("p2", "1980-03-14")],
    }
    for batch, records in batches.items():
        (land / batch).mkdir(parents=True)
        (land / batch / "data.ndjson").write_bytes(
            b"".join(orjson.dumps(r) + b"\n" for r in records)
        )
    workdir = tmp_path / "work"
    # the reference: over the limit from 1 January of the year her birth is 90 years before
    over_from = date(int(BORN[:4]) + 90, 1, 1)

    _on_day(monkeypatch, over_from - timedelta(days=1))
    first = run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    assert first["success"], first["runs"]
    before = _released(workdir)
    assert _stable_until(workdir) == {"b1": over_from, "b2": date(1980 + 90, 1, 1)}

    _on_day(monkeypatch, over_from)
    summary = run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    assert summary["success"], summary["runs"]
    ingest = summary["stages"]["ingest"]
    assert ingest["batches_already_done"] == ["b2"]
    assert ingest["batches_deidentified_again"] == ["b1"]
    # b1's de-identification alone, then the release: no ingest ran
    assert [run["batch"] for run in summary["runs"]] == ["b1", None]
    assert "phi_vault" not in "".join(summary["runs"][0]["checks"])
    assert [b["batch"] for b in ingest["batches"]] == ["b1", "b2"]
    assert all(b["records_in"] == 2 for b in ingest["batches"])  # the ingest's own figures
    after = _released(workdir)
    assert after != before  # her birth date crossed the age limit
    # the release a first run on that day gives
    fresh = tmp_path / "fresh"
    assert run_pipeline(land, fresh, key_file=str(key_file), workers=1)["success"]
    assert after == _released(fresh)
    # her birth date observation: the shifted date of someone of 89, then the year of 90
    (hers, his), (hers_after, his_after) = _birth_observations(before), _birth_observations(after)
    assert len(hers) == len(BORN) and hers_after == BORN[:4] and his_after == his
    # over the limit, the year of 90 moves on the next 1 January
    assert _stable_until(workdir) == {"b1": date(over_from.year + 1, 1, 1), "b2": date(2070, 1, 1)}

    _on_day(monkeypatch, over_from + timedelta(days=1))
    again = run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    assert again["stages"]["ingest"]["batches_already_done"] == ["b1", "b2"]
    assert again["stages"]["ingest"]["batches_deidentified_again"] == []
    assert [run["batch"] for run in again["runs"]] == [None]
    assert _released(workdir) == after


def test_a_step_failed_on_a_worker_process_is_named_by_the_error_the_worker_raised() -> None:
    """An error raised on a worker process reaches the step as the caller's error caused by
    ``_RemoteTraceback`` (the worker's traceback as text): the innermost error of the chain
    named every such failure ``_RemoteTraceback``. It is named by the error it stands for."""
    from types import SimpleNamespace

    from dagster._utils.error import SerializableErrorInfo

    from pipelines.run import failed_steps

    remote = SerializableErrorInfo("Traceback ...", [], "_RemoteTraceback")
    raised = SerializableErrorInfo("m", [], "RecordNotDeidentifiedError", cause=remote)
    wrapped = SerializableErrorInfo("m", [], "DagsterExecutionStepExecutionError", cause=raised)
    event = SimpleNamespace(
        event_type_value="STEP_FAILURE",
        step_key="deid_resources",
        step_failure_data=SimpleNamespace(error=wrapped),
    )
    assert failed_steps(SimpleNamespace(all_events=[event])) == {
        "deid_resources": "RecordNotDeidentifiedError"
    }


def test_a_step_failed_on_a_changed_row_is_named_by_the_platforms_error() -> None:
    """A vault row that does not open fails its step with ``InvalidCiphertext``, raised from
    cryptography's ``InvalidTag``: the innermost error of the chain named it ``InvalidTag``,
    a class the platform's documentation never names. Dagster's wrapper is unwrapped, the
    platform's error is not."""
    from types import SimpleNamespace

    from dagster._utils.error import SerializableErrorInfo

    from pipelines.run import failed_steps

    tag = SerializableErrorInfo("", [], "InvalidTag")
    raised = SerializableErrorInfo("vault row 0a: failed", [], "InvalidCiphertext", cause=tag)
    wrapped = SerializableErrorInfo("m", [], "DagsterExecutionStepExecutionError", cause=raised)
    event = SimpleNamespace(
        event_type_value="STEP_FAILURE",
        step_key="deid_resources",
        step_failure_data=SimpleNamespace(error=wrapped),
    )
    assert failed_steps(SimpleNamespace(all_events=[event])) == {
        "deid_resources": "InvalidCiphertext"
    }


def test_a_new_year_deidentifies_again_a_batch_whose_folder_is_gone(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b1 holds a patient who turns 90 in 2027, with an observation of her birth date and a
    condition of the year she was born; b2 a patient of 46. Both are released on 31 December
    2026, then b1's folder is removed (the landing folder cleaned once ingested: the vault
    holds its rows). The run of 1 January 2027 de-identifies b1 again alone, from the vault:
    her birth date is released as the year of 90 and the condition's date is withheld, as a
    first run on that day from both folders releases them. The run took only the folders it
    found: b1's rows stayed as released on 31 December for good, her shifted full birth date
    and a date over the age limit among them."""
    born = BORN
    land = tmp_path / "landing"
    records = {
        "b1": [
            {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": born},
            {
                "resourceType": "Observation",
                "id": "o-p1",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "21112-8"}]},
                "subject": {"reference": "Patient/p1"},
                "valueDateTime": born,
            },
            {
                "resourceType": "Condition",
                "id": "c-p1",
                "subject": {"reference": "Patient/p1"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                "onsetDateTime": f"{born[:4]}-09-01",
            },
        ],
        "b2": [
            {"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "1980-03-14"}
        ],
    }
    for batch, rows in records.items():
        (land / batch).mkdir(parents=True)
        (land / batch / "data.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    original = tmp_path / "original"
    shutil.copytree(land, original)
    workdir = tmp_path / "work"
    over_from = date(int(born[:4]) + 90, 1, 1)

    _on_day(monkeypatch, over_from - timedelta(days=1))
    assert run_pipeline(land, workdir, key_file=str(key_file), workers=1)["success"]
    shutil.rmtree(land / "b1")
    _on_day(monkeypatch, over_from)
    summary = run_pipeline(land, workdir, key_file=str(key_file), workers=1)
    assert summary["success"], summary["runs"]
    assert summary["stages"]["ingest"]["batches_deidentified_again"] == ["b1"]
    assert _stable_until(workdir)["b1"] == date(over_from.year + 1, 1, 1)
    fresh = tmp_path / "fresh"
    assert run_pipeline(original, fresh, key_file=str(key_file), workers=1)["success"]
    assert _released(workdir) == _released(fresh)


def test_a_summary_write_that_dies_leaves_the_last_summary_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_summary.json`` was written in place: a run killed mid-write left a cut file. Now a
    write that dies (here: after half its text) leaves the last summary as it was."""
    workdir = Workdir(tmp_path)
    write_summary(workdir, {"success": True, "run": 1})
    real_write = Path.write_text

    def dies_halfway(self: Path, text: str, **kwargs: Any) -> int:
        real_write(self, text[: len(text) // 2], **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", dies_halfway)
        with pytest.raises(KeyboardInterrupt):
            write_summary(workdir, {"success": False, "run": 2})
    assert json.loads(workdir.summary.read_text()) == {"success": True, "run": 1}
    assert [p.name for p in tmp_path.iterdir()] == [workdir.summary.name]
