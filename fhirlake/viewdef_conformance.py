"""Run an SQL-on-FHIR v2 conformance suite folder and build the official test report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fhirlake.fhirpath import FhirPathError
from fhirlake.viewdef import ViewDefinitionError, load_view


@dataclass
class CaseResult:
    file: str
    title: str
    tags: list[str]
    passed: bool
    error: str | None = None

    @property
    def experimental(self) -> bool:
        return "experimental" in self.tags


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _row_key(row: dict[str, Any]) -> bytes:
    return orjson.dumps({k: _canonical(v) for k, v in row.items()}, option=orjson.OPT_SORT_KEYS)


def run_case(case: dict[str, Any], resources: list[dict[str, Any]], file: str = "") -> CaseResult:
    """One test case: rows compared without order; expectError, expectCount, expectColumns."""
    title = str(case.get("title", ""))
    tags = list(case.get("tags") or [])
    try:
        view = load_view(case.get("view") or {})
        rows = list(view.run(resources))
    except (ViewDefinitionError, FhirPathError) as exc:
        if case.get("expectError"):
            return CaseResult(file, title, tags, True)
        return CaseResult(file, title, tags, False, f"unexpected error: {exc}")
    if case.get("expectError"):
        return CaseResult(file, title, tags, False, "expected an error, got rows")
    if "expectCount" in case:
        ok = len(rows) == case["expectCount"]
        return CaseResult(file, title, tags, ok, None if ok else f"{len(rows)} rows")
    if "expectColumns" in case:
        names = [c.name for c in view.columns]
        ok = names == case["expectColumns"]
        return CaseResult(file, title, tags, ok, None if ok else f"columns {names}")
    expected = case.get("expect") or []
    got = Counter(_row_key(r) for r in rows)
    want = Counter(_row_key(r) for r in expected)
    if got == want:
        return CaseResult(file, title, tags, True)
    missing = list((want - got).elements())[:2]
    extra = list((got - want).elements())[:2]
    return CaseResult(
        file,
        title,
        tags,
        False,
        f"missing {[m.decode() for m in missing]} unexpected {[e.decode() for e in extra]}",
    )


def iter_suite(suite_dir: Path) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(file name, case, resources) for every case of every JSON file in the folder."""
    out = []
    for path in sorted(Path(suite_dir).glob("*.json")):
        suite = orjson.loads(path.read_bytes())
        resources = suite.get("resources") or []
        for case in suite.get("tests") or []:
            out.append((path.name, case, resources))
    return out


def run_conformance_suite(suite_dir: Path) -> dict[str, Any]:
    """The official test report of a conformance folder:
    ``{file: {tests: [{name, result: {passed, error?}}]}}``."""
    report, _ = run_conformance_cases(suite_dir)
    return report


def run_conformance_cases(suite_dir: Path) -> tuple[dict[str, Any], list[CaseResult]]:
    """The official report (see :func:`run_conformance_suite`) and the per-case results
    (with tags, so callers can tell shareable from experimental failures)."""
    report: dict[str, Any] = {}
    results = []
    for file, case, resources in iter_suite(suite_dir):
        result = run_case(case, resources, file)
        results.append(result)
        entry: dict[str, Any] = {"passed": result.passed}
        if result.error:
            entry["error"] = result.error
        report.setdefault(file, {"tests": []})["tests"].append(
            {"name": result.title, "result": entry}
        )
    return report, results
