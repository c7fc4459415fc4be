"""Versioned feature services: a model names one and gets exactly these features."""

from feast import FeatureService
from features import (
    patient_comorbidities,
    patient_demographics,
    patient_labs_vitals,
    patient_medications,
    patient_utilisation,
)

readmission_v1 = FeatureService(
    name="readmission_v1",
    features=[
        patient_demographics[["age_years", "sex"]],
        patient_utilisation,
        patient_comorbidities,
        patient_medications[["active_medication_count", "polypharmacy", "on_insulin"]],
        patient_labs_vitals[
            [
                "hba1c_latest",
                "hba1c_mean_365d",
                "hba1c_days_since",
                "glucose_latest",
                "creatinine_latest",
                "egfr_latest",
                "bmi_latest",
                "systolic_bp_latest",
                "diastolic_bp_latest",
                "heart_rate_latest",
            ]
        ],
    ],
    description="30-day readmission model, version 1: features at the index discharge. A new "
    "model version gets a new service (readmission_v2), never a changed one.",
    owner="data-platform",
    tags={
        "owner": "data-platform",
        "model": "readmission",
        "version": "1",
        "sensitivity": "sensitive-health",
    },
)
