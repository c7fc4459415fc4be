"""One feature view per feature table; every field is declared (no schema inference)."""

from datetime import timedelta

from data_sources import (
    patient_comorbidities_source,
    patient_demographics_source,
    patient_labs_vitals_source,
    patient_medications_source,
    patient_utilisation_source,
)
from entities import patient
from feast import FeatureView, Field
from feast.types import Bool, Float64, Int64, String

OWNER = "data-platform"

# Long TTL: these change slowly (age by one a year).
patient_demographics = FeatureView(
    name="patient_demographics",
    entities=[patient],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="age_years", dtype=Int64),
        Field(name="sex", dtype=String),
        Field(name="race_code", dtype=String),
        Field(name="ethnicity_code", dtype=String),
    ],
    source=patient_demographics_source,
    online=True,
    description=(
        "Age in whole years at the event (90 for 90 and over), administrative sex, OMB race and "
        "ethnicity codes; a row per encounter start and end."
    ),
    owner=OWNER,
    tags={
        "description": "Age, sex, race and ethnicity at each encounter",
        "owner": OWNER,
        "sensitivity": "quasi-identifier",
        "table": "features.patient_demographics",
    },
)

# TTL: 365 days, the longest window the counts look back over.
patient_utilisation = FeatureView(
    name="patient_utilisation",
    entities=[patient],
    ttl=timedelta(days=365),
    schema=[
        Field(name="encounters_30d", dtype=Int64),
        Field(name="emergency_visits_30d", dtype=Int64),
        Field(name="inpatient_admissions_30d", dtype=Int64),
        Field(name="encounters_180d", dtype=Int64),
        Field(name="emergency_visits_180d", dtype=Int64),
        Field(name="inpatient_admissions_180d", dtype=Int64),
        Field(name="encounters_365d", dtype=Int64),
        Field(name="emergency_visits_365d", dtype=Int64),
        Field(name="inpatient_admissions_365d", dtype=Int64),
        Field(name="days_since_last_discharge", dtype=Int64),
        Field(name="last_length_of_stay_days", dtype=Int64),
    ],
    source=patient_utilisation_source,
    online=True,
    description=(
        "Encounters, emergency visits and inpatient admissions over 30/180/365 days, days since "
        "the last inpatient discharge and that stay's length; a row per encounter start and end."
    ),
    owner=OWNER,
    tags={
        "description": "Encounter counts over 30/180/365 days and the last inpatient stay",
        "owner": OWNER,
        "sensitivity": "pseudonymous",
        "table": "features.patient_utilisation",
    },
)

# Long TTL: chronic history flags only change when a group is first coded.
patient_comorbidities = FeatureView(
    name="patient_comorbidities",
    entities=[patient],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="has_asthma", dtype=Bool),
        Field(name="has_atrial_fibrillation", dtype=Bool),
        Field(name="has_cancer", dtype=Bool),
        Field(name="has_ckd", dtype=Bool),
        Field(name="has_copd", dtype=Bool),
        Field(name="has_depression", dtype=Bool),
        Field(name="has_diabetes", dtype=Bool),
        Field(name="has_heart_failure", dtype=Bool),
        Field(name="has_hyperlipidemia", dtype=Bool),
        Field(name="has_hypertension", dtype=Bool),
        Field(name="has_mi", dtype=Bool),
        Field(name="has_obesity", dtype=Bool),
        Field(name="has_stroke", dtype=Bool),
        Field(name="charlson_index", dtype=Int64),
    ],
    source=patient_comorbidities_source,
    online=True,
    description=(
        "Condition groups ever coded (SNOMED CT / ICD-10-CM value sets in fhir/valuesets) and the "
        "Charlson index with Quan 2011 weights; a row where a group is first coded."
    ),
    owner=OWNER,
    tags={
        "description": "Condition group flags and the Charlson index (Quan weights)",
        "owner": OWNER,
        "sensitivity": "sensitive-health",
        "table": "features.patient_comorbidities",
    },
)

# TTL: 365 days: an active prescription stays active between visits that can be months apart.
patient_medications = FeatureView(
    name="patient_medications",
    entities=[patient],
    ttl=timedelta(days=365),
    schema=[
        Field(name="active_medication_count", dtype=Int64),
        Field(name="medications_180d", dtype=Int64),
        Field(name="polypharmacy", dtype=Bool),
        Field(name="on_anticoagulant", dtype=Bool),
        Field(name="on_antidepressant", dtype=Bool),
        Field(name="on_antihypertensive", dtype=Bool),
        Field(name="on_antiplatelet", dtype=Bool),
        Field(name="on_insulin", dtype=Bool),
        Field(name="on_metformin", dtype=Bool),
        Field(name="on_other_antidiabetic", dtype=Bool),
        Field(name="on_respiratory_inhaler", dtype=Bool),
        Field(name="on_statin", dtype=Bool),
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
    },
)

# TTL: 2 years; an older lab value is no longer the patient's state.
patient_labs_vitals = FeatureView(
    name="patient_labs_vitals",
    entities=[patient],
    ttl=timedelta(days=730),
    schema=[
        Field(name="hba1c_latest", dtype=Float64),
        Field(name="hba1c_mean_365d", dtype=Float64),
        Field(name="hba1c_days_since", dtype=Int64),
        Field(name="glucose_latest", dtype=Float64),
        Field(name="glucose_mean_365d", dtype=Float64),
        Field(name="glucose_days_since", dtype=Int64),
        Field(name="creatinine_latest", dtype=Float64),
        Field(name="creatinine_mean_365d", dtype=Float64),
        Field(name="creatinine_days_since", dtype=Int64),
        Field(name="egfr_latest", dtype=Float64),
        Field(name="egfr_mean_365d", dtype=Float64),
        Field(name="egfr_days_since", dtype=Int64),
        Field(name="ldl_latest", dtype=Float64),
        Field(name="ldl_mean_365d", dtype=Float64),
        Field(name="ldl_days_since", dtype=Int64),
        Field(name="bmi_latest", dtype=Float64),
        Field(name="bmi_mean_365d", dtype=Float64),
        Field(name="bmi_days_since", dtype=Int64),
        Field(name="systolic_bp_latest", dtype=Float64),
        Field(name="systolic_bp_mean_365d", dtype=Float64),
        Field(name="systolic_bp_days_since", dtype=Int64),
        Field(name="diastolic_bp_latest", dtype=Float64),
        Field(name="diastolic_bp_mean_365d", dtype=Float64),
        Field(name="diastolic_bp_days_since", dtype=Int64),
        Field(name="heart_rate_latest", dtype=Float64),
        Field(name="heart_rate_mean_365d", dtype=Float64),
        Field(name="heart_rate_days_since", dtype=Int64),
    ],
    source=patient_labs_vitals_source,
    online=True,
    description=(
        "Latest value, 365-day mean and days since measured of HbA1c, glucose, creatinine, eGFR, "
        "LDL, BMI, blood pressure and heart rate."
    ),
    owner=OWNER,
    tags={
        "description": "Latest and 365-day mean labs and vitals",
        "owner": OWNER,
        "sensitivity": "sensitive-health",
        "table": "features.patient_labs_vitals",
    },
)
