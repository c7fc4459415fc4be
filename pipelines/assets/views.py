"""Stage ``views``: one asset per SQL-on-FHIR ViewDefinition in ``fhir/views/``, run over the
de-identified resources (never the vault), each guarded by the PHI leak scan.

Adding a table is adding a JSON file: the assets are discovered from the folder at load time.
"""

from collections.abc import Iterator
from pathlib import Path

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

from deid.leakscan import LeakScanResult
from fhirlake.viewdef import ViewDefinition, load_view
from pipelines.assets.checks import RELEASE_CANARIES, column_metadata, leak_scan_result
from pipelines.assets.deid import RELEASE_INPUT
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.resources import KeyProviderResource, WarehouseResource
from pipelines.views.refresh import refresh_view
from pipelines.views.tables import VIEWS_DIR, VIEWS_SCHEMA, view_files


def view_asset_key(name: str) -> AssetKey:
    return AssetKey([VIEWS_SCHEMA, name])


def build_view_asset(path: Path) -> AssetsDefinition:
    """The asset (and its leak-scan check) of one ViewDefinition file."""
    view: ViewDefinition = load_view(path)
    key = view_asset_key(view.name)
    description = f"SQL-on-FHIR view `{view.name}` over de-identified {view.resource} resources."

    @multi_asset(
        name=f"view_{view.name}",
        specs=[
            AssetSpec(
                key,
                group_name="views",
                deps=["deid_resources", "released_patients", RELEASE_INPUT],
                description=description,
                metadata={"view_file": str(path.name), "resource": view.resource},
                kinds={"duckdb", "parquet"},
                automation_condition=AutomationCondition.eager(),
            )
        ],
        check_specs=[
            AssetCheckSpec(
                "phi_leak_scan",
                asset=key,
                blocking=True,
                description="No name, identifier, SSN, phone, email, address or city with ZIP "
                "of any patient or relative, and no patient's own birth date, appears in the "
                "staged view; the view is published only when none does.",
            )
        ],
        pool=WAREHOUSE_POOL,
    )
    def _view(
        context: AssetExecutionContext, warehouse: WarehouseResource, keys: KeyProviderResource
    ) -> Iterator[MaterializeResult | AssetCheckResult]:
        con = warehouse.connect()
        try:
            canaries = RELEASE_CANARIES.get(con, keys.provider())
            # only the rows of resources that changed are rebuilt; staged, scanned, then
            # published: rows that fail the scan are never visible
            refresh = refresh_view(con, view, Path(warehouse.workdir), canaries)
        finally:
            con.close()
        result = refresh.result
        scan: LeakScanResult = result.check
        context.log.info(
            f"view {view.name} ({refresh.mode}): {result.rows} rows from {result.resources} "
            f"resources, {refresh.resources_changed} changed and {refresh.resources_removed} "
            f"removed, in {result.seconds:.1f}s; "
            + ("published" if result.published else "not published: the leak scan failed")
        )
        yield MaterializeResult(
            asset_key=key,
            metadata={
                "dagster/row_count": result.rows,
                "published": result.published,
                "rows": result.rows,
                "resources": result.resources,
                "patients": result.patients,
                **column_metadata(result.columns),
                "table": result.table,
                "parquet": MetadataValue.path(str(result.parquet)),
                "seconds": result.seconds,
                "refresh": refresh.mode,
                "resources_changed": refresh.resources_changed,
                "resources_removed": refresh.resources_removed,
            },
        )
        yield leak_scan_result(key, scan)

    _view.__doc__ = description
    return _view


def build_view_assets(views_dir: Path = VIEWS_DIR) -> list[AssetsDefinition]:
    return [build_view_asset(path) for path in view_files(views_dir)]


view_assets: list[AssetsDefinition] = build_view_assets()
