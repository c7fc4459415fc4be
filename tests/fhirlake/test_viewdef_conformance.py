"""The official SQL-on-FHIR v2 test suite (../shared/data/sql_on_fhir_tests), case by case,
plus the report in the official format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirlake.viewdef_conformance import iter_suite, run_case, run_conformance_suite

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SUITE = SHARED / "sql_on_fhir_tests" / "tests"
CASES = iter_suite(SUITE) if SUITE.is_dir() else []

pytestmark = pytest.mark.shared


@pytest.mark.parametrize(
    ("file", "case", "resources"),
    CASES,
    ids=[f"{f}:{c.get('title', '')}" for f, c, _ in CASES],
)
def test_case(file: str, case: dict, resources: list[dict]) -> None:
    result = run_case(case, resources, file)
    if not result.passed and "experimental" in (case.get("tags") or []):
        pytest.xfail(f"experimental: {result.error}")
    assert result.passed, result.error


def test_report_in_the_official_format(shared_data: Path, tmp_path: Path) -> None:
    report, results = run_conformance_suite(shared_data / "sql_on_fhir_tests" / "tests")
    out = tmp_path / "test_report.json"
    out.write_text(json.dumps(report, indent=2))
    schema = json.loads(
        (shared_data / "sql_on_fhir_tests" / "test_report" / "test-report.schema.json").read_text()
    )
    assert schema["type"] == "object"
    for file, suite in report.items():
        assert file.endswith(".json")
        assert set(suite) == {"tests"} and suite["tests"]
        for test in suite["tests"]:
            assert isinstance(test["name"], str)
            assert isinstance(test["result"]["passed"], bool)
    shareable = [r for r in results if not r.experimental]
    experimental = [r for r in results if r.experimental]
    print(
        f"\nSQL-on-FHIR conformance: shareable {sum(r.passed for r in shareable)}/"
        f"{len(shareable)}, experimental {sum(r.passed for r in experimental)}/"
        f"{len(experimental)}; report {out}"
    )
    assert all(r.passed for r in shareable)
