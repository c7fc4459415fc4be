"""Stage ``views``: one asset per SQL-on-FHIR ViewDefinition in ``fhir/views/``, run over the
de-identified resources (never the vault), each guarded by the PHI leak scan.

Adding a table is adding a JSON file: the assets are discovered from the folder at load time.
A view's columns and their DuckDB types are declared by its ViewDefinition and the table is
created with exactly those (``fhirlake.viewdef.write_view_table``), so the column schema is the
asset's definition metadata (``dagster/column_schema``, with each column's description) rather
than a copy in every materialization: Dagster writes a materialization's metadata twice (the
step output and the materialization) and reads it back for the checks and the next steps.
All views are one subsettable multi-asset, a single step: after a small batch each view's
refresh takes a fraction of a second, and a step of its own per view cost more than its work
(opening the warehouse, the step's events).
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from fhirlake.viewdef import ViewDefinition, duckdb_type, load_view
from pipelines.assets.checks import RELEASE_CANARIES, column_schema, leak_scan_result
from pipelines.assets.deid import RELEASE_INPUT
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.resources import KeyProviderResource, WarehouseResource
from pipelines.views.refresh import ViewRefresh, refresh_views
from pipelines.views.tables import VIEWS_DIR, VIEWS_SCHEMA, view_files


def view_asset_key(name: str) -> AssetKey:
    return AssetKey([VIEWS_SCHEMA, name])


def _view_spec(view: ViewDefinition, path: Path) -> AssetSpec:
    return AssetSpec(
        view_asset_key(view.name),
        group_name="views",
        deps=["deid_resources", "released_patients", RELEASE_INPUT],
        description=f"SQL-on-FHIR view `{view.name}` over de-identified {view.resource} resources.",
        metadata={
            "view_file": str(path.name),
            "resource": view.resource,
            "dagster/column_schema": column_schema(
                [(c.name, duckdb_type(c), c.description) for c in view.columns]
            ),
        },
        kinds={"duckdb", "parquet"},
        automation_condition=AutomationCondition.eager(),
    )


def _scan_spec(view: ViewDefinition) -> AssetCheckSpec:
    return AssetCheckSpec(
        "phi_leak_scan",
        asset=view_asset_key(view.name),
        blocking=True,
        description="No name, identifier, SSN, phone, email, address or city with ZIP of any "
        "patient or relative, and no patient's own birth date, appears in the staged view; the "
        "view is published only when none does (the rows that changed in full, the distinct "
        "values of the rest against every patient known now, and the rest of the rows of each "
        "patient whose Patient changed in the vault against that patient's birth date).",
    )


def _view_metadata(refresh: ViewRefresh) -> dict[str, Any]:
    result = refresh.result
    return {
        "dagster/row_count": result.rows,
        "published": result.published,
        "rows": result.rows,
        "resources": result.resources,
        "patients": result.patients,
        "table": result.table,
        "parquet": MetadataValue.path(str(result.parquet)),
        "seconds": result.seconds,
        "refresh": refresh.mode,
        "resources_changed": refresh.resources_changed,
        "resources_removed": refresh.resources_removed,
        "patients_rechecked": refresh.patients_rechecked,
        "withdrawn": refresh.withdrawn,
    }


def build_views_asset(views_dir: Path = VIEWS_DIR) -> AssetsDefinition:
    """The views multi-asset: one asset (and leak-scan check) per ViewDefinition file."""
    views = [(load_view(path), path) for path in view_files(views_dir)]

    @multi_asset(
        name="views",
        specs=[_view_spec(view, path) for view, path in views],
        check_specs=[_scan_spec(view) for view, _ in views],
        can_subset=True,
        pool=WAREHOUSE_POOL,
    )
    def _views(
        context: AssetExecutionContext, warehouse: WarehouseResource, keys: KeyProviderResource
    ) -> Iterator[MaterializeResult | AssetCheckResult]:
        """Refresh the selected views: only rows of resources that changed are rebuilt."""
        selected = context.selected_asset_keys
        con = warehouse.connect()
        try:
            canaries = RELEASE_CANARIES.get(
                con, keys.provider(), context.run.run_id, sealed=keys.seal_canaries
            )
            chosen = [view for view, _ in views if view_asset_key(view.name) in selected]
            workdir = Path(warehouse.workdir)
            for view, refresh in refresh_views(con, chosen, workdir, canaries):
                key = view_asset_key(view.name)
                result, scan = refresh.result, refresh.result.check
                context.log.info(
                    f"view {view.name} ({refresh.mode}): {result.rows} rows from "
                    f"{result.resources} resources, {refresh.resources_changed} changed and "
                    f"{refresh.resources_removed} removed, {refresh.patients_rechecked} "
                    f"patients' birth dates re-checked, in {result.seconds:.1f}s; "
                    + (
                        "published"
                        if result.published
                        else "not published: leak scan failed"
                        + ("; the published view withdrawn" if refresh.withdrawn else "")
                    )
                )
                yield MaterializeResult(asset_key=key, metadata=_view_metadata(refresh))
                yield leak_scan_result(key, scan)
        finally:
            con.close()

    return _views


view_assets: list[AssetsDefinition] = [build_views_asset()]
