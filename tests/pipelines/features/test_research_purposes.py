"""A deny for any research purpose of v3-ActReason is an opt-out under any scope, and a consent
naming no patient leaves everybody else in the cohort. The research purposes are written here
from HL7 Terminology (HRESCH and the codes that specialise it), not read from the rule."""

from __future__ import annotations

import duckdb

from pipelines.features.cohort import opted_out_sql, released_cohort

# v3-ActReason: HRESCH and its specialisations (HL7 Terminology 2.1.0)
RESEARCH = ["HRESCH", "BIORCH", "CLINTRCH", "CLINTRCHNPC", "CLINTRCHPC", "PRECLINTRCH"]
RESEARCH += ["DSRCH", "POARCH", "TRANSRCH"]
# other purposes of use: a deny of one of them under patient-privacy is no research opt-out
OTHER = ["HMARKT", "TREAT", "HPAYMT", "PUBHLTH", "HOPERAT"]


def _views(consents: list[tuple[str | None, str]]) -> duckdb.DuckDBPyConnection:
    """``views.patient`` and ``views.consent``: per (patient, purpose), an active
    patient-privacy consent that permits, with an exception denying that purpose."""
    con = duckdb.connect()
    con.execute("CREATE SCHEMA views")
    con.execute("CREATE TABLE views.patient (id VARCHAR)")
    con.execute(
        "CREATE TABLE views.consent (id VARCHAR, patient_id VARCHAR, status VARCHAR, "
        "scope_code VARCHAR, policy_rule_code VARCHAR, provision_type VARCHAR, "
        "deny_at_any_level BOOLEAN, deny_purpose_codes VARCHAR[])"
    )
    for n, (patient, purpose) in enumerate(consents):
        con.execute(
            "INSERT INTO views.consent VALUES (?, ?, 'active', 'patient-privacy', NULL, "
            "'permit', true, [?])",
            [f"c{n}", patient, purpose],
        )
        if patient is not None:
            con.execute("INSERT INTO views.patient VALUES (?)", [patient])
    return con


def test_a_deny_for_every_research_purpose_is_an_opt_out() -> None:
    con = _views([(f"p-{code}", code) for code in RESEARCH + OTHER])
    rows = con.execute(opted_out_sql()).fetchall()
    assert {p for (p,) in rows} == {f"p-{code}" for code in RESEARCH}
    assert released_cohort(con) == sorted(f"p-{code}" for code in OTHER)


def test_an_opt_out_of_no_patient_leaves_the_others_in_the_cohort() -> None:
    """A consent whose patient did not resolve denies research for nobody known: its NULL must
    not reach the rule's ``NOT IN``, where it would leave every patient out."""
    con = _views([(None, "HRESCH"), ("p-kept", "TREAT"), ("p-out", "HRESCH")])
    assert con.execute(opted_out_sql()).fetchall() == [("p-out",)]
    assert released_cohort(con) == ["p-kept"]
