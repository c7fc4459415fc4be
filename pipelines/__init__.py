"""The platform: Dagster assets, sensors and jobs, the Feast feature store, models and the CLI."""

from pipelines.feast_import import skip_for_feast

# before any module of the platform imports Feast (see pipelines.feast_import)
skip_for_feast()
