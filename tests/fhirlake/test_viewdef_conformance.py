"""The official SQL-on-FHIR v2 test suite (../shared/data/sql_on_fhir_tests), case by case,
plus the report in the official format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirlake.viewdef_conformance import (
    iter_suite,
    run_case,
    run_conformance_cases,
    run_conformance_suite,
)

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


@pytest.fixture(scope="module")
def conformance(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list, Path]:
    """The whole suite once per module: the official report written to test_report.json."""
    if not SUITE.is_dir():
        pytest.skip("../shared/data/sql_on_fhir_tests is not present")
    report, results = run_conformance_cases(SUITE)
    out = tmp_path_factory.mktemp("sql_on_fhir") / "test_report.json"
    out.write_text(json.dumps(report, indent=2))
    shareable = [r for r in results if not r.experimental]
    experimental = [r for r in results if r.experimental]
    print(
        f"\nSQL-on-FHIR conformance: shareable {sum(r.passed for r in shareable)}/"
        f"{len(shareable)}, experimental {sum(r.passed for r in experimental)}/"
        f"{len(experimental)}; report {out}"
    )
    return report, results, out


def test_report_in_the_official_format(conformance: tuple[dict, list, Path]) -> None:
    report, results, out = conformance
    schema = json.loads(
        (SHARED / "sql_on_fhir_tests" / "test_report" / "test-report.schema.json").read_text()
    )
    assert schema["type"] == "object"
    assert json.loads(out.read_text()) == report
    for file, suite in report.items():
        assert file.endswith(".json")
        assert set(suite) == {"tests"} and suite["tests"]
        for test in suite["tests"]:
            assert isinstance(test["name"], str)
            assert isinstance(test["result"]["passed"], bool)
            assert set(test["result"]) <= {"passed", "error", "details"}
    assert run_conformance_suite(SUITE) == report
    assert all(r.passed for r in results if not r.experimental)
