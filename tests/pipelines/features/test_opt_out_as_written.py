"""A research opt-out counts however its source wrote it. Each consent goes through the research
release profile (the real de-identification), the shipped ViewDefinitions, the feature SQL and
the readmission label:

- a code of a required binding in another case (``provision.type: "Deny"``, ``status:
  "Active"``) was withheld by the release, so the view read NULL and the patient stayed in
  every feature table and the label; it is now released as the binding's code;
- a scope given as text only (``scope: {text: "Research"}``), which the release never carries,
  left ``scope_code`` NULL and the patient in; a denial or an ``OPTOUT`` without a readable
  scope code now counts as a research opt-out, while a scope coded as another purpose does not;
- an opt-out written as an exception (``provision.provision``: a permit with a nested deny, at
  any of the four levels the release keeps) was dropped by the release and unread by the view,
  so the patient stayed in; a nested deny now counts under a research scope (or none readable),
  and, under any scope, a deny whose purpose is research (HRESCH or a specialisation), while a
  nested deny for another purpose under ``patient-privacy`` does not.

A status the release withholds (``actve``, in no spelling of the binding) left the view's
status NULL and the patient in; a denial under it now counts, while ``draft`` does not.

Which patients opted out is written here by hand, from what each consent says."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipelines.features import refresh
from pipelines.features.cohort import opted_out_sql, released_cohort, view_as_built
from pipelines.features.refresh import definitions_digest
from pipelines.features.valuesets import load_valuesets
from pipelines.models.labels import readmission_labels_with_counts
from tests.pipelines.features.crafted import (
    features_from_fhir,
    released_pseudonyms,
    released_records,
)

SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
TODAY = date(2026, 11, 28)
KEY = b"\x07" * 32

RESEARCH = {"coding": [{"system": SCOPE, "code": "research"}]}
TREATMENT = {"coding": [{"system": SCOPE, "code": "treatment"}]}
PRIVACY = {"coding": [{"system": SCOPE, "code": "patient-privacy"}]}
OPTOUT = [{"coding": [{"system": ACT, "code": "OPTOUT"}]}]
OPTIN = [{"coding": [{"system": ACT, "code": "OPTIN"}]}]
REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


def _deny(*purposes: str, then: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A deny provision for ``purposes`` (v3-ActReason codes), with ``then`` nested in it."""
    provision: dict[str, Any] = {"type": "deny"}
    if purposes:
        provision["purpose"] = [{"system": REASON, "code": code} for code in purposes]
    if then:
        provision["provision"] = then
    return provision


def _permit(*nested: dict[str, Any]) -> dict[str, Any]:
    """A permit with the exceptions ``nested``."""
    return {"type": "permit", "provision": list(nested)} if nested else {"type": "permit"}


# patient -> what their consent says (None: no consent)
CONSENTS: dict[str, dict[str, Any] | None] = {
    "deny-capitalised": {"status": "active", "scope": RESEARCH, "provision": {"type": "Deny"}},
    "active-capitalised": {"status": "Active", "scope": RESEARCH, "provision": {"type": "deny"}},
    "scope-as-text": {
        "status": "active",
        "scope": {"text": "Research"},
        "policyRule": OPTOUT,
        "provision": {"type": "deny"},
    },
    "scope-as-text-deny-upper": {
        "status": "ACTIVE",
        "scope": {"text": "Research use"},
        "provision": {"type": "DENY"},
    },
    "scope-as-text-permit": {
        "status": "active",
        "scope": {"text": "Research"},
        "policyRule": OPTIN,
        "provision": {"type": "permit"},
    },
    "treatment-deny": {"status": "active", "scope": TREATMENT, "provision": {"type": "deny"}},
    "inactive-deny": {"status": "Inactive", "scope": RESEARCH, "provision": {"type": "Deny"}},
    # a status in no spelling of the binding is withheld by the release: the denial still counts
    "status-misspelled-deny": {"status": "actve", "scope": RESEARCH, "provision": {"type": "deny"}},
    "status-misspelled-permit": {
        "status": "actve",
        "scope": RESEARCH,
        "provision": {"type": "permit"},
    },
    "draft-deny": {"status": "draft", "scope": RESEARCH, "provision": {"type": "deny"}},
    "no-consent": None,
    # exceptions (provision.provision): a permit whose nested deny is the opt-out
    "nested-deny-research": {"status": "active", "scope": RESEARCH, "provision": _permit(_deny())},
    "nested-deny-capitalised": {
        "status": "active",
        "scope": RESEARCH,
        "provision": _permit({"type": "Deny"}),
    },
    "nested-deny-scope-as-text": {
        "status": "active",
        "scope": {"text": "Research"},
        "provision": _permit(_deny()),
    },
    "privacy-nested-deny-hresch": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit(_deny("HRESCH")),
    },
    "privacy-nested-deny-clintrch": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit(_deny("TREAT", "CLINTRCH")),
    },
    "privacy-nested-deny-marketing": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit(_deny("HMARKT")),
    },
    "privacy-nested-permit-hresch": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit({"type": "permit", "purpose": [{"system": REASON, "code": "HRESCH"}]}),
    },
    "privacy-depth-2-deny-hresch": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit(_permit(_deny("HRESCH"))),
    },
    "research-depth-2-deny": {
        "status": "active",
        "scope": RESEARCH,
        "provision": _permit(_permit(), _permit(_deny())),
    },
    "privacy-depth-3-deny-hresch": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit(_permit(_permit(_deny("HRESCH")))),
    },
    "research-deny-with-nested-permit": {
        "status": "active",
        "scope": RESEARCH,
        "provision": _deny(then=[_permit()]),
    },
    "research-nested-permits": {
        "status": "active",
        "scope": RESEARCH,
        "provision": _permit(_permit()),
    },
    "treatment-nested-deny": {
        "status": "active",
        "scope": TREATMENT,
        "provision": _permit(_deny()),
    },
    # an exception whose type is missing, or misspelled (withheld by the release), is read as
    # a deny: under a research scope it is one; under patient-privacy with a research purpose
    "research-nested-untyped": {
        "status": "active",
        "scope": RESEARCH,
        "provision": _permit({"period": {"start": "2024-01-01"}}),
    },
    "privacy-nested-untyped-hresch": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit({"purpose": [{"system": REASON, "code": "HRESCH"}]}),
    },
    "privacy-nested-misspelled-hresch": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit({"type": "denied", "purpose": [{"system": REASON, "code": "HRESCH"}]}),
    },
    "privacy-nested-untyped-marketing": {
        "status": "active",
        "scope": PRIVACY,
        "provision": _permit({"purpose": [{"system": REASON, "code": "HMARKT"}]}),
    },
    "inactive-privacy-nested-deny-hresch": {
        "status": "inactive",
        "scope": PRIVACY,
        "provision": _permit(_deny("HRESCH")),
    },
}
# read from CONSENTS by hand: the consents that are active and deny research use, or deny
# with no coded scope to say what for, at the top or in an exception at any depth; or, of any
# scope, deny in an exception whose purpose is research (HRESCH or its specialisation CLINTRCH)
OPTED_OUT = {
    "research-nested-untyped",
    "privacy-nested-untyped-hresch",
    "privacy-nested-misspelled-hresch",
    "deny-capitalised",
    "status-misspelled-deny",
    "active-capitalised",
    "scope-as-text",
    "scope-as-text-deny-upper",
    "nested-deny-research",
    "nested-deny-capitalised",
    "nested-deny-scope-as-text",
    "privacy-nested-deny-hresch",
    "privacy-nested-deny-clintrch",
    "privacy-depth-2-deny-hresch",
    "research-depth-2-deny",
    "privacy-depth-3-deny-hresch",
    "research-deny-with-nested-permit",
}
# of those, the ones the top provision alone says (what a consent view built before the nested
# denials were read still counts)
OPTED_OUT_AT_THE_TOP = {
    "deny-capitalised",
    "status-misspelled-deny",
    "active-capitalised",
    "scope-as-text",
    "scope-as-text-deny-upper",
    "research-deny-with-nested-permit",
}


def _encounter(eid: str, patient: str, cls: str, start: str, end: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": ACT, "code": cls},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": start, "end": end},
    }


def _record(patient: str, consent: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A patient with two inpatient stays 10 days apart (a readmission label) and a consent."""
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": patient, "birthDate": "1960-06-15"},
        _encounter(f"{patient}-1", patient, "IMP", "2024-03-01T09:00:00Z", "2024-03-04T09:00:00Z"),
        _encounter(f"{patient}-2", patient, "IMP", "2024-03-14T09:00:00Z", "2024-03-16T09:00:00Z"),
        _encounter(f"{patient}-3", patient, "AMB", "2024-09-01T09:00:00Z", "2024-09-01T09:30:00Z"),
    ]
    if consent is not None:
        resources.append(
            {
                "resourceType": "Consent",
                "id": f"{patient}-consent",
                "patient": {"reference": f"Patient/{patient}"},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                **consent,
            }
        )
    return resources


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> tuple[duckdb.DuckDBPyConnection, dict]:
    """The feature tables built from the released resources, and each patient's pseudonym."""
    by_patient = released_records(
        {patient: _record(patient, consent) for patient, consent in CONSENTS.items()}, KEY, TODAY
    )
    out = [r for resources in by_patient.values() for r in resources]
    pseudonym = released_pseudonyms(by_patient)
    con = features_from_fhir(out, Path(tmp_path_factory.mktemp("optout")))
    return con, pseudonym


def _patients_named(pseudonyms: set[str], pseudonym: dict[str, str]) -> set[str]:
    return {patient for patient, p in pseudonym.items() if p in pseudonyms}


def test_the_opted_out_patients_are_in_no_feature_table(released: tuple) -> None:
    con, pseudonym = released
    tables = [
        name
        for (name,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'features'"
        ).fetchall()
    ]
    assert tables
    anywhere: set[str] = set()
    for table in tables:
        rows = con.execute(f"SELECT DISTINCT patient_id FROM features.{table}").fetchall()
        present = _patients_named({r[0] for r in rows}, pseudonym)
        assert not present & OPTED_OUT, table
        anywhere |= present
    assert anywhere == set(CONSENTS) - OPTED_OUT


def test_the_cohort_is_the_patients_who_did_not_opt_out(released: tuple) -> None:
    con, pseudonym = released
    cohort = _patients_named(set(released_cohort(con)), pseudonym)
    assert cohort == set(CONSENTS) - OPTED_OUT


def test_the_opted_out_patients_have_no_readmission_label(released: tuple) -> None:
    con, pseudonym = released
    labels, _ = readmission_labels_with_counts(con)
    labelled = _patients_named(set(labels["patient_id"]), pseudonym)
    assert labelled == set(CONSENTS) - OPTED_OUT


def test_a_consent_view_built_before_nested_denials_still_reads_the_top_provision(
    released: tuple,
) -> None:
    con, pseudonym = released
    con.execute("CREATE SCHEMA IF NOT EXISTS built_before")
    con.execute(
        "CREATE OR REPLACE TABLE built_before.consent AS SELECT * "
        "EXCLUDE (deny_at_any_level, deny_purpose_codes) FROM views.consent"
    )
    rows = con.execute(
        opted_out_sql(view_as_built(con, "consent", "built_before.consent"))
    ).fetchall()
    assert _patients_named({r[0] for r in rows}, pseudonym) == OPTED_OUT_AT_THE_TOP


def test_a_changed_opt_out_rule_rebuilds_every_feature_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A patient the rule now leaves out may have view rows that never changed: only a full
    build, which a changed definitions digest starts, takes their rows out."""
    valuesets = load_valuesets()
    before = definitions_digest(valuesets)
    monkeypatch.setattr(refresh, "opted_out_sql", lambda consent: f"SELECT NULL FROM {consent}")
    assert definitions_digest(valuesets) != before
