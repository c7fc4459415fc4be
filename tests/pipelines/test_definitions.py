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
