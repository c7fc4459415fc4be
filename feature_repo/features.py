"""One feature view per feature table; every field is declared (no schema inference), with a
description and its unit in the field's tags (``unit``; ``"1"`` for counts, ``flag`` for
booleans, ``code`` for coded values).

TTL: every table has a row at each time one of its values changes and repeats a patient's
unchanged values at least every 365 days up to the release's data end (see
``pipelines/features/tables.py``, ``with_heartbeats``). So the latest row at or before any T is
at most 365 days old and holds the value at T: a TTL of ``KNOWN_FOR`` (400 days) never turns a
known value (a Charlson index coded in 2007, a count that has been 0 for two years) into null,
and Feast's point-in-time join reads only about a year of rows per entity row. The reason is
repeated per view.
"""

from datetime import timedelta
from typing import Any

from data_sources import (
    patient_comorbidities_source,
    patient_demographics_source,
    patient_labs_vitals_source,
    patient_medications_source,
    patient_utilisation_source,
)
from entities import patient
from feast import FeatureView, Field
from feast.types import Bool, Float64, Int64, String, UnixTimestamp

OWNER = "data-platform"
KNOWN_FOR = timedelta(days=400)  # > the 365-day repeat of pipelines.features.tables
UTILISATION_WINDOWS = (30, 180, 365)


def _field(name: str, dtype: Any, description: str, unit: str) -> Field:
    return Field(name=name, dtype=dtype, description=description, tags={"unit": unit})


# TTL 400 days: a row at every birthday after the first data (up to 90) and yearly repeats
# after 90 and up to the data end; sex and race never change.
patient_demographics = FeatureView(
    name="patient_demographics",
    entities=[patient],
    ttl=KNOWN_FOR,
    schema=[
        _field(
            "age_years",
            Int64,
            "Age in whole years at T, capped at 90 at T (HIPAA 90+), from the released birth "
            "date (a year-only birth date counts from 1 January; withheld: null); null before "
            "the patient's first data.",
            "years",
        ),
        _field("sex", String, "Administrative gender (Patient.gender).", "code"),
        _field("race_code", String, "OMB race category code (US Core race).", "code"),
        _field("ethnicity_code", String, "OMB ethnicity category code.", "code"),
    ],
    source=patient_demographics_source,
    online=True,
    description=(
        "Age in whole years at T (90 for 90 and over, at T), administrative sex, OMB race and "
        "ethnicity codes; a row at the first data time and at every later birthday up to 90 "
        "(no row, so no age, before a patient's first data)."
    ),
    owner=OWNER,
    tags={
        "description": "Age, sex, race and ethnicity at any time",
        "owner": OWNER,
        "sensitivity": "quasi-identifier",
        "table": "features.patient_demographics",
        "rule": "views.patient; age = whole years from birth_date to T, min(age, 90)",
    },
)


def _utilisation_fields() -> list[Field]:
    fields: list[Field] = []
    for d in UTILISATION_WINDOWS:
        fields += [
            _field(
                f"encounters_{d}d",
                Int64,
                f"Encounters of any class started in (T - {d} days, T], the current one included.",
                "1",
            ),
            _field(
                f"emergency_visits_{d}d",
                Int64,
                f"Emergency encounters (class EMER) started in (T - {d} days, T].",
                "1",
            ),
            _field(
                f"prior_inpatient_stays_{d}d",
                Int64,
                f"Inpatient stays (class IMP, ACUTE or NONAC) discharged in [T - {d} days, T): "
                "a stay discharged at T (the index stay at a discharge) is not counted.",
                "1",
            ),
        ]
    return fields


# TTL 400 days: a row at every encounter start, discharge and window edge, counts 0 (not null)
# from the first data, repeated yearly: a quiet year is 0 admissions, not an unknown.
patient_utilisation = FeatureView(
    name="patient_utilisation",
    entities=[patient],
    ttl=KNOWN_FOR,
    schema=[
        *_utilisation_fields(),
        _field(
            "prior_discharge_at",
            UnixTimestamp,
            "Time of the latest inpatient discharge strictly before T (days since = T minus "
            "this; pipelines.models.training_set.with_days_since derives it).",
            "timestamp",
        ),
        _field(
            "prior_stay_length_days",
            Int64,
            "Length in days of the latest inpatient stay discharged strictly before T (of "
            "stays discharged at the same instant, the longest).",
            "days",
        ),
    ],
    source=patient_utilisation_source,
    online=True,
    description=(
        "Encounters and emergency visits started in the last 30/180/365 days, inpatient stays "
        "discharged in the 30/180/365 days before T, and the latest prior stay; exact at any T."
    ),
    owner=OWNER,
    tags={
        "description": "Encounter counts over 30/180/365 days and the latest prior stay",
        "owner": OWNER,
        "sensitivity": "pseudonymous",
        "table": "features.patient_utilisation",
        "rule": "views.encounter: period_start, period_end, class_code, part_of_id",
    },
)

CONDITION_GROUPS = {
    "asthma": "asthma",
    "atrial_fibrillation": "atrial fibrillation",
    "cancer": "any malignancy",
    "ckd": "chronic kidney disease",
    "copd": "chronic obstructive pulmonary disease",
    "depression": "depression",
    "diabetes": "diabetes mellitus",
    "heart_failure": "heart failure",
    "hyperlipidemia": "hyperlipidaemia",
    "hypertension": "hypertension",
    "mi": "myocardial infarction",
    "obesity": "obesity",
    "stroke": "stroke",
}

# TTL 400 days: a row at the first data, wherever a group is first known, and repeated yearly;
# the flags are "ever known" and never expire (a Charlson index from 2007 holds in 2025).
patient_comorbidities = FeatureView(
    name="patient_comorbidities",
    entities=[patient],
    ttl=KNOWN_FOR,
    schema=[
        *[
            _field(
                f"has_{key}",
                Bool,
                f"A non-refuted condition of the {text} value set known at or before T "
                "(recordedDate, else onset).",
                "flag",
            )
            for key, text in CONDITION_GROUPS.items()
        ],
        _field(
            "charlson_index",
            Int64,
            "Charlson comorbidity index (Quan 2011 weights) of conditions known at or before T.",
            "points",
        ),
    ],
    source=patient_comorbidities_source,
    online=True,
    description=(
        "Condition groups known at or before T (SNOMED CT / ICD-10-CM value sets in "
        "fhir/valuesets; a diagnosis counts from its recordedDate, else its onset) and the "
        "Charlson index with Quan 2011 weights."
    ),
    owner=OWNER,
    tags={
        "description": "Condition group flags and the Charlson index (Quan weights)",
        "owner": OWNER,
        "sensitivity": "sensitive-health",
        "table": "features.patient_comorbidities",
        "rule": "views.condition: coalesce(recorded_date_latest, onset_date_time_latest), code; "
        "value sets",
    },
)

DRUG_CLASSES = (
    "anticoagulant",
    "antidepressant",
    "antihypertensive",
    "antiplatelet",
    "insulin",
    "metformin",
    "other_antidiabetic",
    "respiratory_inhaler",
    "statin",
)

# TTL 400 days: a row at every prescription, where it leaves the 90/180-day windows, and
# repeated yearly, so the value holds however long ago the last prescription was.
patient_medications = FeatureView(
    name="patient_medications",
    entities=[patient],
    ttl=KNOWN_FOR,
    schema=[
        _field(
            "active_medication_count",
            Int64,
            "Distinct drugs with a prescription active at T: status active/on-hold, or "
            "authored in (T - 90 days, T].",
            "1",
        ),
        _field(
            "medications_180d",
            Int64,
            "Distinct drugs prescribed in (T - 180 days, T].",
            "1",
        ),
        _field("polypharmacy", Bool, "5 or more active medications at T.", "flag"),
        *[
            _field(
                f"on_{c}",
                Bool,
                f"An active prescription of the {c.replace('_', ' ')} RxNorm class at T.",
                "flag",
            )
            for c in DRUG_CLASSES
        ],
    ],
    source=patient_medications_source,
    online=True,
    description=(
        "Active medication count (status active/on-hold or authored within 90 days), distinct "
        "drugs in 180 days, polypharmacy (>=5 active) and RxNorm drug class flags."
    ),
    owner=OWNER,
    tags={
        "description": "Active medications, polypharmacy and drug classes",
        "owner": OWNER,
        "sensitivity": "sensitive-health",
        "table": "features.patient_medications",
        "rule": "views.medication_request: authored_on_latest, status, intent, medication_code "
        "(else views.medication.code by medication_id)",
    },
)

LAB_UNITS = {
    "hba1c": ("HbA1c", "%"),
    "glucose": ("glucose", "mg/dL"),
    "creatinine": ("creatinine", "mg/dL"),
    "egfr": ("eGFR", "mL/min/1.73m2"),
    "ldl": ("LDL cholesterol", "mg/dL"),
    "bmi": ("body mass index", "kg/m2"),
    "systolic_bp": ("systolic blood pressure", "mm[Hg]"),
    "diastolic_bp": ("diastolic blood pressure", "mm[Hg]"),
    "heart_rate": ("heart rate", "/min"),
}


def _lab_fields() -> list[Field]:
    fields: list[Field] = []
    for key, (text, unit) in LAB_UNITS.items():
        fields += [
            _field(f"{key}_latest", Float64, f"Latest {text} known at or before T.", unit),
            _field(f"{key}_mean_365d", Float64, f"Mean {text} known in (T - 365 days, T].", unit),
            _field(
                f"{key}_measured_at",
                UnixTimestamp,
                f"When the latest {text} was measured, or for a value dated without a time "
                "of day the end of that day (days since = T minus this).",
                "timestamp",
            ),
        ]
    return fields


# TTL 400 days over yearly repeats: the latest value is the latest value, however old; its age
# is the "_measured_at" field, so a model (not an expiry) decides what is too old.
patient_labs_vitals = FeatureView(
    name="patient_labs_vitals",
    entities=[patient],
    ttl=KNOWN_FOR,
    schema=_lab_fields(),
    source=patient_labs_vitals_source,
    online=True,
    description=(
        "Latest value, when it was measured and the 365-day mean of HbA1c, glucose, "
        "creatinine, eGFR, LDL, BMI, blood pressure and heart rate, in the UCUM unit each "
        "field's tag names (a result stated in another unit is converted when it is the same "
        "quantity at another scale, such as mg/L, and otherwise left out)."
    ),
    owner=OWNER,
    tags={
        "description": "Latest and 365-day mean labs and vitals",
        "owner": OWNER,
        "sensitivity": "sensitive-health",
        "table": "features.patient_labs_vitals",
        "rule": "views.observation: LOINC code or BP component, value_quantity, "
        "effective_date_time_latest, counted from issued",
    },
)
