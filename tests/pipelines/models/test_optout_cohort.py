"""One research opt-out rule for the feature tables, the labels and the training frame: a consent
whose scope is written ``Research`` excludes its patient exactly as ``research`` does, and so
does a deny nested in a permit (``views.consent.deny_at_any_level``) under a research scope, or,
under any scope, a nested deny for research (``deny_purpose_codes`` holding HRESCH)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from pipelines.features.tables import FEATURE_TABLES, build_feature_tables
from pipelines.models.labels import readmission_labels_with_counts
from pipelines.models.training_set import readmission_training_set
from tests.feast_stores import throwaway_store

from .crafted import crafted_views

feast = pytest.importorskip("feast")

# Two stays each, the second 17 days after the first: every one of these patients would have a
# labelled, readmitted discharge if they were in the cohort.
NEW_PATIENTS: dict[str, tuple[str, str, str | None, str, bool, list[str]]] = {
    # status, scope, policy rule, top provision, a deny at any level, purposes denied
    "optout_upper": ("active", "Research", None, "deny", True, []),
    "optout_lower": ("active", "research", None, "deny", True, []),
    "optin_upper": ("active", "Research", "OPTIN", "permit", False, []),  # a control: stays in
    "nested_deny": ("active", "research", "OPTIN", "permit", True, []),
    "privacy_nested_research": ("active", "patient-privacy", None, "permit", True, ["hresch"]),
    # a deny for marketing under patient-privacy is no research opt-out: stays in
    "privacy_nested_marketing": ("active", "patient-privacy", None, "permit", True, ["HMARKT"]),
}
# Worked out by hand from the crafted consents (not through the rule under test).
OPTED_OUT = {
    "optout",
    "optout_rule",
    "optout_upper",
    "optout_lower",
    "nested_deny",
    "privacy_nested_research",
}
LABELLED = {
    "readmit",
    "noreadmit",
    "boundary_in",
    "boundary_out",
    "inactive_optout",
    "optin_upper",
    "privacy_nested_marketing",
}
KEPT_CONTROLS = ("optin_upper", "privacy_nested_marketing")
UTILISATION = "patient_utilisation"


def _views(con: duckdb.DuckDBPyConnection) -> None:
    """The crafted model views plus the new patients, and a patient row for everyone
    (the feature tables only know patients in ``views.patient``)."""
    crafted_views(con, with_patient=True)
    con.execute("ALTER TABLE views.consent ADD COLUMN deny_at_any_level BOOLEAN")
    con.execute("ALTER TABLE views.consent ADD COLUMN deny_purpose_codes VARCHAR[]")
    for n, (pid, consent) in enumerate(NEW_PATIENTS.items()):
        con.execute(
            "INSERT INTO views.consent (id, patient_id, status, scope_code, policy_rule_code, "
            "provision_type, deny_at_any_level, deny_purpose_codes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [f"k{n}", pid, *consent],
        )
        for stay, (start, end) in enumerate(
            (("2024-07-01", "2024-07-03"), ("2024-07-20", "2024-07-22"))
        ):
            con.execute(
                "INSERT INTO views.encounter VALUES (?, ?, 'finished', 'IMP', NULL, NULL, NULL, "
                "CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), 'home')",
                [f"n{n}{stay}", pid, start, end],
            )
    con.execute(
        "INSERT INTO views.patient (id, gender, birth_date, race_code, ethnicity_code) "
        "SELECT DISTINCT patient_id, 'female', DATE '1950-01-01', '2106-3', '2186-5' "
        "FROM views.encounter WHERE patient_id NOT IN (SELECT id FROM views.patient)"
    )


def _store(tmp_path: Path, source: Path) -> feast.FeatureStore:
    """A throw-away Feast store serving two utilisation features as ``readmission_v2``."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Int64

    patient = Entity(name="patient", join_keys=["patient_id"], value_type=ValueType.STRING)
    view = FeatureView(
        name=UTILISATION,
        entities=[patient],
        ttl=timedelta(days=3650),
        schema=[
            Field(name="prior_inpatient_stays_365d", dtype=Int64),
            Field(name="encounters_30d", dtype=Int64),
        ],
        source=FileSource(
            name=f"{UTILISATION}_source",
            path=str(source),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        ),
    )
    service = FeatureService(name="readmission_v2", features=[view])
    return throwaway_store(tmp_path, "optout_test", [patient, view, service])


def test_research_opt_out_is_case_insensitive_everywhere(tmp_path: Path) -> None:
    con = duckdb.connect()
    _views(con)
    build_feature_tables(con, tmp_path / "features")
    demographics = {
        p for (p,) in con.execute("SELECT patient_id FROM features.patient_demographics").fetchall()
    }
    everyone = {p for (p,) in con.execute("SELECT id FROM views.patient").fetchall()}
    assert demographics == everyone - OPTED_OUT
    for name in FEATURE_TABLES:
        present = {p for (p,) in con.execute(f"SELECT patient_id FROM features.{name}").fetchall()}
        assert not present & OPTED_OUT, name
        if name != "patient_labs_vitals":  # no measurement, no row
            assert set(KEPT_CONTROLS) <= present, name

    labels, counts = readmission_labels_with_counts(con)
    assert set(labels["patient_id"]) == LABELLED
    # one stay each of optout and optout_rule, two each of the four new ones
    assert counts.opted_out == 10
    for kept in KEPT_CONTROLS:
        control = labels[labels["patient_id"] == kept]
        assert control["label"].tolist() == [1, 0], kept

    store = _store(tmp_path, tmp_path / "features" / f"{UTILISATION}.parquet")
    frame = readmission_training_set(store, labels)
    assert set(frame["patient_id"]) == LABELLED
    assert len(frame) == len(labels)
    joined = frame[frame["patient_id"] == "optin_upper"]["prior_inpatient_stays_365d"]
    assert pd.to_numeric(joined).tolist() == [0, 1]  # features reach the kept patients
