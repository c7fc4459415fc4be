"""Every case of the invalid corpus in ``../shared/data/fhir_invalid`` (HL7 validator test
cases and the Microsoft FHIR server's bad files, see its PROVENANCE.md) through ingest, one
test per case: the exact outcome (records in, accepted, quarantine reasons, unresolved
references), reconciliation, and no offending value quoted in any quarantine message.

fhir.resources checks structure and datatypes, not terminology, invariants, narrative XHTML or
reference targets, so not every HL7 error case is caught: the agreement rate is asserted as a
floor, and the table below pins what ingest does with each case (a change shows up by name).
Controls rejected on purpose: R5-only elements in unversioned cases (Group.membership, List with
fhir_comments), JSON with comments (json5), urn:uuid references naming no entry of their Bundle.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from vault import warehouse
from vault.ingest import ingest_batch, reconcile_batch
from vault.keys import FileKeyProvider, init_keyring

CORPUS = SHARED_DATA / "fhir_invalid"
HL7 = CORPUS / "hl7_validator_tests"
MS = CORPUS / "ms_fhir_server"

# case → (records in, accepted, quarantine reasons, unresolved references)
EXPECTED: dict[str, tuple[int, int, dict[str, int], int]] = {
    "attachment-with-invalid-binary": (1, 0, {"schema_violation": 1}, 0),
    "attachment-with-wrong-size": (1, 1, {}, 0),
    "bundle-good": (2, 2, {}, 0),
    "bundle-document-versioned-references-good": (5, 5, {}, 0),
    "bundle-document-versioned-references-bad": (5, 5, {}, 0),
    "bundle-bad-empty": (2, 0, {"invalid_bundle": 2}, 0),
    "group-choice-bad1": (1, 0, {"schema_violation": 1}, 0),
    "group-choice-bad2": (1, 0, {"schema_violation": 1}, 0),
    "group-choice-bad3": (1, 0, {"schema_violation": 1}, 0),
    "group-choice-empty": (1, 0, {"invalid_json": 1}, 0),
    "group-choice-good": (1, 0, {"schema_violation": 1}, 0),
    "contained": (1, 1, {}, 0),
    "group-minimal-tiny": (1, 0, {"schema_violation": 1}, 0),
    "group-minimal": (1, 0, {"schema_violation": 1}, 0),
    "list-bad-syntax": (1, 0, {"invalid_json": 1}, 0),
    "list-contained-bad-json": (1, 1, {}, 0),
    "list-contained": (1, 1, {}, 0),
    "list-empty1": (1, 0, {"schema_violation": 1}, 0),
    "list-empty2": (1, 0, {"schema_violation": 1}, 0),
    "list-minimal": (1, 0, {"schema_violation": 1}, 0),
    "list-unknown-prop": (1, 0, {"schema_violation": 1}, 0),
    "list-wrong-order": (1, 1, {}, 0),
    "list-xhtml-attribute": (1, 0, {"schema_violation": 1}, 0),
    "list-xhtml-correct1": (1, 0, {"schema_violation": 1}, 0),
    "list-xhtml-correct2": (1, 0, {"schema_violation": 1}, 0),
    "primitive-good-ws": (1, 1, {}, 0),
    "list-xhtml-element": (1, 0, {"schema_violation": 1}, 0),
    "list-xhtml-syntax": (1, 1, {}, 0),
    "list-xhtml-wrongns1": (1, 0, {"schema_violation": 1}, 0),
    "list-xhtml-wrongns2": (1, 0, {"schema_violation": 1}, 0),
    "list-xhtml-xxe": (1, 1, {}, 0),
    "observation-with-trailing-dot": (1, 0, {"invalid_json": 1}, 0),
    "synthea": (1, 0, {"schema_violation": 1}, 0),
    "patient-good": (1, 1, {}, 0),
    "patient-duplicate": (1, 1, {}, 0),
    "patient-lang1": (1, 1, {}, 0),
    "patient-lang2": (1, 1, {}, 0),
    "patient-lang3": (1, 1, {}, 0),
    "fhirpath-good": (1, 1, {}, 2),
    "fhirpath-bad": (1, 1, {}, 2),
    "fhirpath-null": (1, 1, {}, 2),
    "patient-example-ra4": (1, 1, {}, 0),
    "dr-example-org": (1, 1, {}, 0),
    "dr-example-org-2": (1, 1, {}, 0),
    "care-plan": (1, 1, {}, 1),
    "mr-covid-bnd1": (13, 13, {}, 0),
    "pat-security-good1": (1, 1, {}, 0),
    "pat-security-good2": (1, 1, {}, 0),
    "pat-security-good3": (1, 1, {}, 0),
    "pat-security-bad-xhtml": (1, 1, {}, 0),
    "pat-security-bad-string": (1, 1, {}, 0),
    "parameters-reference": (1, 1, {}, 0),
    "parameters-reference-bad": (1, 1, {}, 0),
    "bundle-duplicate-id": (2, 2, {}, 0),
    "mni-patientOverview-bundle-example1": (3, 3, {}, 0),
    "mni-patientOverview-bundle-example1b": (3, 3, {}, 0),
    "bundle-duplicate-ids-not": (39, 39, {}, 0),
    "empty-array": (1, 0, {"schema_violation": 1}, 0),
    "hakan-se": (1, 0, {"schema_violation": 1}, 0),
    "hakan-se-nofetch": (1, 0, {"schema_violation": 1}, 0),
    "hakan-se-2": (1, 0, {"schema_violation": 1}, 0),
    "target-ref-profile-empty": (1, 1, {}, 5),
    "bundle-id-1": (1, 1, {}, 0),
    "bundle-id-2": (1, 1, {}, 0),
    "bundle-id-3": (1, 1, {}, 1),
    "bundle-id-4": (2, 2, {}, 1),
    "bundle-id-5": (1, 1, {}, 1),
    "resource-invalid-id-0": (1, 1, {}, 0),
    "resource-invalid-id-1": (1, 0, {"invalid_id": 1}, 0),
    "resource-invalid-id-2": (1, 0, {"invalid_id": 1}, 0),
    "resource-invalid-id-3": (1, 0, {"schema_violation": 1}, 0),
    "resource-invalid-eid-0": (1, 1, {}, 0),
    "resource-invalid-eid-1": (1, 1, {}, 0),
    "resource-invalid-eid-2": (1, 1, {}, 0),
    "document-manifest": (1, 1, {}, 1),
    "params-empty-r4": (1, 1, {}, 0),
    "bundle-with-contained": (2, 2, {}, 0),
    "risk-assessment-probability-range": (1, 1, {}, 1),
    "uk-msg": (9, 9, {}, 0),
    "contained-resource-bad-id": (1, 1, {}, 0),
    "contained-resource-bad-id-ignore": (1, 1, {}, 0),
    "encounter-period": (1, 1, {}, 2),
    "patient-id-bad-1 / R4": (1, 0, {"invalid_id": 1}, 0),
    "patient-id-bad-3 / R4": (1, 0, {"invalid_id": 1}, 0),
    "patient-id-bad-2 / R4": (1, 0, {"invalid_id": 1}, 0),
    "bad-markdown": (1, 1, {}, 0),
    "bad-markdown-no-html": (1, 1, {}, 0),
    "bundle-ea-testcase": (2, 1, {"schema_violation": 1}, 0),
    "xml-bad-entities-json": (1, 1, {}, 1),
    "json-good": (1, 1, {}, 0),
    "json-comments-1-no": (1, 0, {"invalid_json": 1}, 0),
    "json-comments-1-yes": (1, 0, {"invalid_json": 1}, 0),
    "json-comments-2-no": (1, 0, {"invalid_json": 1}, 0),
    "json-comments-2-yes": (1, 0, {"invalid_json": 1}, 0),
    "json-comma-bad-1": (1, 0, {"invalid_json": 1}, 0),
    "json-comma-bad-2": (1, 0, {"invalid_json": 1}, 0),
    "json-no-quotes-1": (1, 0, {"invalid_json": 1}, 0),
    "json-no-quotes-2": (1, 0, {"invalid_json": 1}, 0),
    "comments-4": (1, 0, {"schema_violation": 1}, 0),
    "bundle-profiles": (1, 1, {}, 0),
    "bundle-url-dash": (1, 1, {}, 0),
    "bundle-conditional-reference-bad": (1, 1, {}, 0),
    "bundle-conditional-reference-good": (1, 1, {}, 0),
    "obs-decimal": (1, 1, {}, 0),
    "params-ws": (1, 1, {}, 0),
    "ai1": (1, 1, {}, 0),
    "ai2": (1, 1, {}, 0),
    "ai3": (1, 0, {"schema_violation": 1}, 0),
    "ai4": (1, 0, {"schema_violation": 1}, 0),
    "ai7": (1, 0, {"schema_violation": 1}, 0),
    "ai8": (1, 0, {"schema_violation": 1}, 0),
    "attachment-tx": (1, 1, {}, 0),
    "sd-device": (1, 1, {}, 0),
    "unicode-control-chars-json": (1, 1, {}, 0),
    "ips-nz-pj": (55, 55, {}, 0),
    "ips-htmlrefs-backwards": (5, 5, {}, 0),
    "Observation-ex-pain.json": (1, 0, {"schema_violation": 1}, 0),
    "bad-json-close": (1, 0, {"invalid_json": 1}, 0),
    "bad-json-close-2": (1, 0, {"invalid_json": 1}, 0),
    "bad-json-close-3": (1, 0, {"invalid_json": 1}, 0),
    "cs-narrative-status": (1, 1, {}, 0),
    "params-reference-fullUrl-extension": (1, 1, {}, 0),
    "params-reference-transaction-bundle": (1, 1, {}, 0),
    "params-reference-part-transaction": (1, 1, {}, 0),
    "ref-policy-default-r4": (5, 4, {"dangling_reference": 1}, 0),
    "ref-policy-default-apply-r5": (5, 4, {"dangling_reference": 1}, 0),
    "Bundle-BatchWithDuplicatedItems.json": (
        9,
        3,
        {"duplicate_full_url": 2, "unsupported_entry": 4},
        0,
    ),
    "Bundle-BatchWithInvalidEleEnums.json": (
        10,
        3,
        {"duplicate_full_url": 1, "schema_violation": 2, "unsupported_entry": 4},
        0,
    ),
    "Bundle-InvalidBundleType.json": (1, 0, {"invalid_bundle": 1}, 0),
    "Bundle-MissingIdentifier.json": (1, 1, {}, 0),
    "Bundle-TransactionWithInvalidBundleEntry.json": (1, 0, {"invalid_json": 1}, 0),
    "Bundle-TransactionWithInvalidProcessingRoutes.json": (2, 1, {"unsupported_entry": 1}, 0),
    # ``Patientt?identifier=``: no resource type, so no reference (neither indexed nor
    # released), rather than an unresolved one
    "Bundle-TransactionWithInvalidResourceType.json": (1, 1, {}, 0),
    "Bundle-TransactionWithMultipleResourcesWithSameFullUrl.json": (
        5,
        3,
        {"duplicate_full_url": 1, "unsupported_entry": 1},
        0,
    ),
    "Bundle-TypeMissing.json": (10, 0, {"invalid_bundle": 10}, 0),
    "Import-InvalidPatient.ndjson": (5, 0, {"invalid_id": 4, "invalid_json": 1}, 0),
    "InvalidCompartmentDefinition.json": (3, 2, {"duplicate_full_url": 1}, 0),
    "InvalidObservation.json": (1, 0, {"schema_violation": 1}, 0),
    "MoneyWithWrongDecimal.json": (1, 0, {"unknown_resource_type": 1}, 0),
    "ObservationWithInvalidDecimalSpecification.json": (1, 1, {}, 1),
    "ObservationWithInvalidStatus.json": (1, 0, {"schema_violation": 1}, 0),
    "ObservationWithLongEyeColor.json": (1, 1, {}, 0),
    "ObservationWithNoCode.json": (1, 0, {"schema_violation": 1}, 0),
    "PatientMissingResourceType.json": (1, 0, {"not_a_resource": 1}, 0),
    "PatientWithUnknownElements.json": (1, 0, {"schema_violation": 1}, 0),
}


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    errors: int | None  # HL7's expected error count; None for the Microsoft files
    first_error: str


@dataclass(frozen=True)
class Outcome:
    summary: tuple[int, int, dict[str, int], int]
    reconciled: bool
    messages: list[str]


def _cases() -> list[Case]:
    if not CORPUS.is_dir():
        return []
    index = json.loads((HL7 / "_index.json").read_text())["cases"]
    cases = [
        Case(c["name"], HL7 / c["input"], int(c["expected_error_count"]), c["first_error"] or "")
        for c in index
    ]
    cases += [
        Case(p.name, p, None, "") for p in sorted(MS.iterdir()) if p.suffix in (".json", ".ndjson")
    ]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case ingested once, each as its own batch of one warehouse."""
    if not CASES:
        pytest.skip("../shared/data is not present")
    tmp = tmp_path_factory.mktemp("corpus")
    init_keyring(tmp / "keyring.json")
    provider = FileKeyProvider.load(tmp / "keyring.json")
    wh = tmp / "w.duckdb"
    found: dict[str, Outcome] = {}
    for i, case in enumerate(CASES):
        report = ingest_batch(wh, f"c{i}", case.path, provider, workers=1)
        con = warehouse.connect(wh, read_only=True)
        try:
            reconciled = reconcile_batch(con, f"c{i}").passed
            rows = con.execute(
                "SELECT message FROM quarantine WHERE batch_id = ?", [f"c{i}"]
            ).fetchall()
        finally:
            con.close()
        summary = (
            report.records_in,
            report.accepted,
            report.quarantine_reasons,
            report.unresolved_references,
        )
        found[case.name] = Outcome(summary, reconciled, [m for (m,) in rows])
    return found


def _quoted_values(first_error: str) -> list[str]:
    """The offending values HL7's validator quotes in its first error ('...'); property names
    (schema, not input values) and canonical URLs aside."""
    quoted = re.findall(r"(?<!property )'([^']{3,})'", first_error)
    return [v for v in quoted if not v.startswith("http")]


def test_every_case_has_an_expected_outcome() -> None:
    if not CASES:
        pytest.skip("../shared/data is not present")
    assert sorted(c.name for c in CASES) == sorted(EXPECTED)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.name]
    assert outcome.reconciled
    records_in, accepted, reasons, _ = outcome.summary
    assert records_in == accepted + sum(reasons.values())
    assert outcome.summary == EXPECTED[case.name]
    for value in _quoted_values(case.first_error):
        assert all(value not in message for message in outcome.messages)


def _flagged(summary: tuple[int, int, dict[str, int], int]) -> bool:
    return bool(summary[2]) or summary[3] > 0


def test_agreement_with_the_hl7_validator(outcomes: dict[str, Outcome]) -> None:
    """Error cases quarantined or flagged, valid controls accepted: floors, printed."""
    hl7 = [c for c in CASES if c.errors is not None]
    errors = [c for c in hl7 if c.errors]
    controls = [c for c in hl7 if not c.errors]
    flagged = sum(_flagged(outcomes[c.name].summary) for c in errors)
    accepted = sum(not outcomes[c.name].summary[2] for c in controls)
    rate = (flagged + accepted) / len(hl7)
    print(
        f"\nHL7 invalid corpus: {flagged + accepted}/{len(hl7)} agree ({rate:.0%}); invalid "
        f"cases flagged {flagged}/{len(errors)}; valid controls accepted {accepted}/{len(controls)}"
    )
    assert rate >= 0.70 and accepted / len(controls) >= 0.78
    ms = [c for c in CASES if c.errors is None]
    ms_flagged = sum(_flagged(outcomes[c.name].summary) for c in ms)
    print(f"Microsoft FHIR server invalid files: {ms_flagged}/{len(ms)} quarantined or flagged")
    assert ms_flagged / len(ms) >= 0.6
