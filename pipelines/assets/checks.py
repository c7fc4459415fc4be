"""Check results and metadata shared by every released table's assets."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    MetadataValue,
    TableColumn,
    TableSchema,
)

from deid.leakscan import LeakScanResult
from deid.release import ReleaseCanaryCache

RELEASE_CANARIES = ReleaseCanaryCache()
"""The canaries every release-wide table is scanned against (views, feature tables, online
store), decrypted once per vault state in this process: once per run under the in-process
executor, once per step process under the multiprocess one."""


def leak_scan_result(asset_key: str | AssetKey, scan: LeakScanResult) -> AssetCheckResult:
    """The blocking ``phi_leak_scan`` result: counts and canary kinds, never the canaries."""
    return AssetCheckResult(
        check_name="phi_leak_scan",
        asset_key=asset_key,
        passed=scan.passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "scanned_rows": scan.scanned_rows,
            "canaries": scan.canaries,
            "hits": len(scan.hits),
            "hits_by_kind": MetadataValue.json(scan.by_kind()),
        },
    )


def columns_table(columns: list[tuple[str, str]]) -> MetadataValue:
    """A markdown table of column names and types, as the UI shows it."""
    return MetadataValue.md(
        "| column | type |\n|---|---|\n" + "\n".join(f"| {n} | {t} |" for n, t in columns)
    )


def column_schema(columns: list[tuple[str, str, str | None]]) -> MetadataValue:
    """(name, type, description) of each column in Dagster's own vocabulary
    (``dagster/column_schema``: the UI's Columns tab, searchable in the catalog)."""
    return MetadataValue.table_schema(
        TableSchema(columns=[TableColumn(name=n, type=t, description=d) for n, t, d in columns])
    )


def column_metadata(columns: list[tuple[str, str]]) -> dict[str, MetadataValue]:
    """Column names and types in Dagster's own vocabulary (``dagster/column_schema``) and as
    the markdown table shown with the run: for tables whose columns are known once built."""
    return {
        "dagster/column_schema": column_schema([(n, t, None) for n, t in columns]),
        "columns": columns_table(columns),
    }
