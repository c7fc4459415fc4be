"""Versioned feature services: a model names one and gets exactly these features.

``readmission_v1`` was retired with the features it named (snapshots exact only at events,
``days_since_last_discharge`` and ``inpatient_admissions_30d`` counting the index stay);
``readmission_v2`` names the features that are exact at any T.
"""

from feast import FeatureService
from features import (
    patient_comorbidities,
    patient_demographics,
    patient_labs_vitals,
    patient_medications,
    patient_utilisation,
)

readmission_v2 = FeatureService(
    name="readmission_v2",
    features=[
        patient_demographics[["age_years", "sex"]],
        patient_utilisation,
        patient_comorbidities,
        patient_medications[["active_medication_count", "polypharmacy", "on_insulin"]],
        patient_labs_vitals[
            [
                "hba1c_latest",
                "hba1c_mean_365d",
                "hba1c_measured_at",
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
    description="30-day readmission model, version 2: features at the index discharge, the "
    "index stay excluded from the prior-stay features. A new model version gets a new service "
    "(readmission_v3), never a changed one.",
    owner="data-platform",
    tags={
        "owner": "data-platform",
        "model": "readmission",
        "version": "2",
        "sensitivity": "sensitive-health",
    },
)
