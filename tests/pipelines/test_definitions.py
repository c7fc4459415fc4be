from __future__ import annotations

from dagster import AssetKey

from pipelines.definitions import defs


def test_definitions_load_with_groups_and_descriptions() -> None:
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"landing_batch", "phi_vault", "quarantine"} <= keys
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name in {"ingest", "deid", "views", "features", "feast", "models"}
        assert node.description, f"{key} needs a one-line description"


def test_reconciliation_check_is_blocking_and_beside_phi_vault() -> None:
    graph = defs.resolve_asset_graph()
    checks = [c for c in graph.asset_check_keys if c.asset_key == AssetKey("phi_vault")]
    assert any(c.name == "records_reconcile" for c in checks)


def test_sensor_and_job_are_registered() -> None:
    assert defs.resolve_sensor_def("landing_sensor") is not None
    assert defs.resolve_job_def("ingest_batch_job") is not None


def test_release_follows_batches_through_eager_automation() -> None:
    from dagster import DefaultSensorStatus

    from pipelines.definitions import release_assets

    graph = defs.resolve_asset_graph()
    for assets_def in release_assets:
        for key in assets_def.keys:
            condition = graph.get(key).automation_condition
            assert condition is not None and "eager" in condition.get_label().lower(), key
    sensor = defs.resolve_sensor_def("release_automation")
    assert sensor.default_status == DefaultSensorStatus.RUNNING


def test_jobs_run_in_process() -> None:
    for name in ("release_job", "ingest_batch_job"):
        job = defs.resolve_job_def(name)
        assert job.executor_def.name == "in_process", name
    assert defs.resolve_implicit_global_asset_job_def().executor_def.name == "in_process"


def test_kinds_and_checks_a_data_engineer_reads() -> None:
    graph = defs.resolve_asset_graph()
    kinds = {k.to_user_string(): graph.get(k).kinds for k in graph.get_all_asset_keys()}
    assert "duckdb" in kinds["phi_vault"] and "parquet" in kinds["views/patient"]
    assert "feast" in kinds["feast_online_store"] and kinds["readmission_model"] == {"sklearn"}
    checks = {f"{c.asset_key.to_user_string()}:{c.name}" for c in graph.asset_check_keys}
    assert {
        "quarantine:quarantine_rate",
        "feast_online_store:online_store_freshness",
        "feast_online_store:phi_leak_scan",
        "phi_vault:records_reconcile",
    } <= checks


def test_quarantine_rate_warns_above_the_threshold() -> None:
    from dagster import AssetCheckSeverity

    from pipelines.assets.ingest import quarantine_rate_result

    assert quarantine_rate_result(100, 5, 0.05).passed
    high = quarantine_rate_result(100, 100, 0.05)
    assert not high.passed and high.severity == AssetCheckSeverity.WARN
    assert not quarantine_rate_result(0, 0, 0.05).passed  # nothing read is not a success


def test_column_schema_in_dagster_vocabulary() -> None:
    from pipelines.assets.checks import column_metadata

    meta = column_metadata([("patient_id", "VARCHAR"), ("age", "INTEGER")])
    schema = meta["dagster/column_schema"].value
    assert [c.name for c in schema.columns] == ["patient_id", "age"]  # type: ignore[union-attr]


def test_key_material_error_names_the_path_it_looked_at(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from pipelines.resources import KeyProviderResource
    from vault.keys import KeyMaterialError

    monkeypatch.delenv("EHR_KEK", raising=False)
    missing = tmp_path / "nowhere" / "keyring.json"
    with pytest.raises(KeyMaterialError, match=str(missing)):
        KeyProviderResource(key_file=str(missing)).provider()
