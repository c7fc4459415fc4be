"""One Parquet file per feature table, written by pipelines.features (WORKDIR/features).

The folder comes from EHR_FEATURES_DIR, else EHR_WORKDIR/features (EHR_WORKDIR defaults to
data/work); it is resolved when the repo is applied and stored in the registry.
"""

import os
from pathlib import Path

import repo_env  # noqa: F401  (fails loudly when EHR_FEAST_DATA is unset)
from feast import FileSource
from feast.data_format import ParquetFormat

FEATURES_DIR = Path(
    os.environ.get("EHR_FEATURES_DIR")
    or Path(os.environ.get("EHR_WORKDIR", "data/work")) / "features"
).resolve()

patient_demographics_source = FileSource(
    name="patient_demographics_source",
    path=str(FEATURES_DIR / "patient_demographics.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="features.patient_demographics: age, sex, race and ethnicity; a row at the "
    "first data time and at every birthday.",
)

patient_utilisation_source = FileSource(
    name="patient_utilisation_source",
    path=str(FEATURES_DIR / "patient_utilisation.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="features.patient_utilisation: encounter counts and the latest prior stay; a "
    "row wherever a value changes.",
)

patient_comorbidities_source = FileSource(
    name="patient_comorbidities_source",
    path=str(FEATURES_DIR / "patient_comorbidities.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="features.patient_comorbidities: condition group flags and Charlson index.",
)

patient_medications_source = FileSource(
    name="patient_medications_source",
    path=str(FEATURES_DIR / "patient_medications.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="features.patient_medications: active medications and drug classes.",
)

patient_labs_vitals_source = FileSource(
    name="patient_labs_vitals_source",
    path=str(FEATURES_DIR / "patient_labs_vitals.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="features.patient_labs_vitals: latest and 365-day mean of labs and vitals.",
)
