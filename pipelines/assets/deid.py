"""Stage ``deid``: the vault through a de-identification policy into released tables, guarded by
a PHI leak scan and a k-anonymity check."""

from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from deid.policy import Policy
from deid.release import (
    build_released_patients,
    deidentify_batch,
    release_totals,
    scan_released_batch,
)
from pipelines.assets.checks import leak_scan_result
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.partitions import batch_partitions
from pipelines.resources import DeidSettings, KeyProviderResource, WarehouseResource


def _table(rows: dict[str, int], head: str) -> MetadataValue:
    body = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return MetadataValue.md(f"| {head} | count |\n|---|---|\n{body}" if rows else "none")


@multi_asset(
    specs=[
        AssetSpec(
            "deid_resources",
            group_name="deid",
            deps=["phi_vault"],
            description="De-identified FHIR resources (policy applied, pseudonymous ids).",
            kinds={"duckdb"},
        )
    ],
    check_specs=[
        AssetCheckSpec(
            "phi_leak_scan",
            asset="deid_resources",
            blocking=True,
            description="No name, identifier, address, phone, email or birth date of the "
            "batch's patients appears in the released rows (case-folded, base64 decoded).",
        )
    ],
    partitions_def=batch_partitions,
    pool=WAREHOUSE_POOL,
)
def deid_resources(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    keys: KeyProviderResource,
    deid_settings: DeidSettings,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """De-identify the resources a batch put in the vault, then scan the release for PHI."""
    policy = Policy.shipped(deid_settings.profile)
    provider = keys.provider()
    con = warehouse.connect()
    try:
        report = deidentify_batch(con, provider, context.partition_key, policy)
        scan = scan_released_batch(con, provider, context.partition_key)
        table = release_totals(con)
    finally:
        con.close()
    context.log.info(
        f"batch {report.batch_id}: {report.released} released, {report.withheld} withheld "
        f"under policy {report.policy} in {report.seconds:.1f}s"
    )
    yield MaterializeResult(
        asset_key="deid_resources",
        metadata={
            "dagster/row_count": table["released"],
            "release_totals": MetadataValue.json(table),
            "policy": report.policy,
            "resources_in": report.resources_in,
            "released": report.released,
            "withheld": report.withheld,
            "withheld_reasons": MetadataValue.json(report.withheld_reasons),
            "security_labels": MetadataValue.json(report.labels),
            "rule_counts": _table(report.rule_counts, "rule"),
        },
    )
    yield leak_scan_result("deid_resources", scan)


@multi_asset(
    specs=[
        AssetSpec(
            "released_patients",
            group_name="deid",
            deps=["deid_resources"],
            description="One row per released patient: quasi-identifiers, k-anonymous.",
            automation_condition=AutomationCondition.eager(),
            kinds={"duckdb"},
        )
    ],
    check_specs=[
        AssetCheckSpec(
            "k_anonymity",
            asset="released_patients",
            blocking=True,
            description="Every combination of age band, sex, ZIP3, race and ethnicity is "
            "shared by at least k released patients.",
        )
    ],
    pool=WAREHOUSE_POOL,
)
def released_patients(
    context: AssetExecutionContext, warehouse: WarehouseResource, deid_settings: DeidSettings
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Quasi-identifiers of every released patient, generalised and suppressed up to k."""
    con = warehouse.connect()
    try:
        report = build_released_patients(con, deid_settings.k)
    finally:
        con.close()
    before, after = report.before, report.after
    context.log.info(
        f"k={after.k}: smallest group {before.min_group} → {after.min_group}, "
        f"{report.suppressed} records suppressed"
    )
    yield MaterializeResult(
        asset_key="released_patients",
        metadata={
            "dagster/row_count": after.records,
            "patients": after.records,
            "k": after.k,
            "min_group_before": before.min_group,
            "share_below_k_before": round(before.share_below_k, 4),
            "min_group_after": after.min_group,
            "generalisation_steps": MetadataValue.json(report.steps_applied),
            "suppressed_records": report.suppressed,
        },
    )
    yield AssetCheckResult(
        check_name="k_anonymity",
        asset_key="released_patients",
        passed=after.passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={k: v for k, v in after.to_dict().items() if isinstance(v, int | float | bool)},
    )
