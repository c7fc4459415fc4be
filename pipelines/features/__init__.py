"""Clinical feature tables (OHDSI-style covariates at each patient's events) built in DuckDB from
the ``views.*`` tables, written to schema ``features`` and to Parquet for the Feast repo."""

from pipelines.features.tables import FEATURE_TABLES, build_feature_tables

__all__ = ["FEATURE_TABLES", "build_feature_tables"]
