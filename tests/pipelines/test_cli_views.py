"""``ehr views run`` and ``ehr views test`` (the ``views`` group of pipelines.cli.views)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner

from fhirlake.synthetic import generate
from pipelines.cli.views import views

VIEWS = Path(__file__).resolve().parents[2] / "fhir" / "views"


def test_views_run_writes_csv_and_parquet(tmp_path: Path) -> None:
    generate(tmp_path / "in", 3, seed=2, fmt="ndjson")
    runner = CliRunner()
    out = tmp_path / "obs.parquet"
    result = runner.invoke(
        views,
        ["run", str(VIEWS / "observation.json"), str(tmp_path / "in"), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows > 10
    assert str(table.schema.field("effective_date_time").type).startswith("timestamp")
    csv = tmp_path / "patients.csv"
    result = runner.invoke(
        views, ["run", str(VIEWS / "patient.json"), str(tmp_path / "in"), "--out", str(csv)]
    )
    assert result.exit_code == 0, result.output
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("id,patient_id,gender,birth_date") and len(lines) == 4
    bad = runner.invoke(
        views, ["run", str(VIEWS / "patient.json"), str(tmp_path / "in"), "--out", "x.txt"]
    )
    assert bad.exit_code != 0 and ".csv or .parquet" in bad.output


def test_views_run_rejects_an_invalid_view(tmp_path: Path) -> None:
    view = tmp_path / "bad.json"
    view.write_text(json.dumps({"resourceType": "ViewDefinition", "select": []}))
    result = CliRunner().invoke(
        views, ["run", str(view), str(tmp_path), "--out", str(tmp_path / "x.csv")]
    )
    assert result.exit_code != 0
    assert "resource" in result.output


def test_views_test_writes_the_report(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "mini.json").write_text(
        json.dumps(
            {
                "title": "mini",
                "resources": [{"resourceType": "Patient", "id": "p1", "gender": "female"}],
                "tests": [
                    {
                        "title": "gender",
                        "tags": ["shareable"],
                        "view": {
                            "resource": "Patient",
                            "select": [{"column": [{"name": "g", "path": "gender"}]}],
                        },
                        "expect": [{"g": "female"}],
                    },
                    {
                        "title": "wrong on purpose",
                        "tags": ["experimental"],
                        "view": {
                            "resource": "Patient",
                            "select": [{"column": [{"name": "g", "path": "gender"}]}],
                        },
                        "expect": [{"g": "male"}],
                    },
                ],
            }
        )
    )
    report = tmp_path / "report.json"
    result = CliRunner().invoke(views, ["test", str(suite), "--report", str(report)])
    assert result.exit_code == 0, result.output  # only an experimental case failed
    assert "shareable 1/1" in result.output
    written = json.loads(report.read_text())
    assert [t["result"]["passed"] for t in written["mini.json"]["tests"]] == [True, False]


def test_views_run_reads_a_single_bundle_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [
                    {"resource": {"resourceType": "Patient", "id": "a", "birthDate": "1970"}},
                    {"resource": {"resourceType": "Patient", "id": "b", "birthDate": "1980-05"}},
                    {"resource": {"resourceType": "Observation", "id": "o", "status": "final"}},
                ],
            }
        )
    )
    view = tmp_path / "pt.json"
    view.write_text(
        json.dumps(
            {
                "resourceType": "ViewDefinition",
                "name": "pt",
                "resource": "Patient",
                "select": [
                    {
                        "column": [
                            {"name": "id", "path": "getResourceKey()"},
                            {"name": "birth_date", "path": "birthDate", "type": "date"},
                        ]
                    }
                ],
            }
        )
    )
    out = tmp_path / "pt.parquet"
    result = CliRunner().invoke(views, ["run", str(view), str(bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 rows" in result.output
    table = pq.read_table(out).to_pylist()
    assert sorted(str(r["birth_date"]) for r in table) == ["1970-01-01", "1980-05-01"]


def _gender_case_file(path: Path, expected: str) -> None:
    """A suite file of one case: a female Patient's gender, expected to be ``expected``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "title": path.stem,
                "resources": [{"resourceType": "Patient", "id": "p1", "gender": "female"}],
                "tests": [
                    {
                        "title": f"gender {expected}",
                        "view": {
                            "resource": "Patient",
                            "select": [{"column": [{"name": "g", "path": "gender"}]}],
                        },
                        "expect": [{"g": expected}],
                    }
                ],
            }
        )
    )


def test_views_test_fails_on_a_shareable_failure(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    _gender_case_file(suite / "bad.json", "male")
    result = CliRunner().invoke(views, ["test", str(suite)])
    assert result.exit_code == 1
    assert "shareable 0/1" in result.output


def test_views_test_reads_the_suite_repository_s_tests_folder_and_fails_on_no_case(
    tmp_path: Path,
) -> None:
    """A copy of the suite's repository keeps its cases in tests/ beside its schema: read from
    there. A folder with no case at all fails, instead of passing 0/0."""
    suite = tmp_path / "sql-on-fhir"
    _gender_case_file(suite / "tests" / "mini.json", "female")
    (suite / "tests.schema.json").write_text(json.dumps({"type": "object"}))
    result = CliRunner().invoke(views, ["test", str(suite)])
    assert result.exit_code == 0, result.output
    assert "passed 1/1" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.json").write_text(json.dumps({"title": "no tests here"}))
    result = CliRunner().invoke(views, ["test", str(empty)])
    assert result.exit_code != 0
    assert "no test case found" in result.output


def test_views_run_says_how_many_records_it_could_not_read(tmp_path: Path) -> None:
    """A line that is not JSON, or JSON that is not an object, was passed over in silence: the
    command printed its row count as if the input had been read whole. They are counted on
    standard error (never shown: a line may hold PHI)."""
    data = tmp_path / "in"
    data.mkdir()
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female"}
    lines = [json.dumps(patient), '{"resourceType": "Patient", "id": "Zedwick', "[1, 2]"]
    (data / "p.ndjson").write_text("\n".join(lines) + "\n")
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        views, ["run", str(VIEWS / "patient.json"), str(data), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"patient: 1 rows -> {out}"
    assert result.stderr.strip() == "2 records skipped: not JSON objects"
    assert "Zedwick" not in result.output
    (data / "p.ndjson").write_text(json.dumps(patient) + "\n")
    clean = CliRunner().invoke(
        views, ["run", str(VIEWS / "patient.json"), str(data), "--out", str(out)]
    )
    assert clean.exit_code == 0 and clean.stderr == ""
