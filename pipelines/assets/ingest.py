"""Stage ``ingest``: landing → one streaming pass → quarantine + encrypted PHI vault."""

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from pipelines.partitions import batch_partitions
from pipelines.resources import (
    IngestSettings,
    KeyProviderResource,
    LandingResource,
    WarehouseResource,
)
from vault.ingest import (
    IngestReport,
    Reconciliation,
    ingest_batch,
    quarantine_counts,
    reconcile_batch,
    vault_totals,
)
from vault.landing import BatchSource, batch_source

WAREHOUSE_POOL = "warehouse"  # DuckDB takes one writer at a time
# the folder's fingerprint when the landing sensor judged the batch complete (run tag)
FINGERPRINT_TAG = "ehr/fingerprint"
# Dagster's tag on a re-execution (from the UI or a daemon retry): the folder may have been
# fixed since the run it re-executes was requested
PARENT_RUN_TAG = "dagster/parent_run_id"


class BatchChangedError(RuntimeError):
    """The batch's folder is not the one its run was requested for."""


def check_requested_folder(
    tags: Mapping[str, str], source: BatchSource, when: str, outcome: str = "not ingested"
) -> None:
    """Refuse a batch whose folder changed since the landing sensor requested its run: a new
    delivery into the same folder, still being copied while the run waited in the queue (or
    during its read), would be ingested and released half-copied. The run fails; the sensor
    requests the batch again once the new delivery is complete. Runs not requested by the
    sensor (``ehr run``, a launch or re-execution from the UI) carry no such tag or are
    re-executions, and read the folder as it is. ``outcome``: what became of the batch (a
    folder that changed during the read was written to the vault as read, and not published)."""
    requested = tags.get(FINGERPRINT_TAG)
    if requested is None or PARENT_RUN_TAG in tags or requested == source.fingerprint:
        return
    raise BatchChangedError(
        f"batch {source.key}: its folder changed {when} (fingerprint {source.fingerprint}, "
        f"requested for {requested}): a new delivery may still be copying; {outcome}, the "
        "landing sensor requests it again once it is complete"
    )


@asset(group_name="ingest", partitions_def=batch_partitions, kinds={"fhir", "json"})
def landing_batch(context: AssetExecutionContext, landing: LandingResource) -> MaterializeResult:
    """Inventory of one batch of FHIR files in the landing folder (counts and sizes only)."""
    source = batch_source(Path(landing.path), context.partition_key)
    listing = source.listing()
    files, skipped = listing.files, listing.skipped
    kinds: dict[str, int] = {}
    for f in files:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    # reasons only (links, special files, metadata): file names can carry patient names
    skipped_reasons: dict[str, int] = {}
    for s in skipped:
        skipped_reasons[s.reason] = skipped_reasons.get(s.reason, 0) + 1
    return MaterializeResult(
        metadata={
            "files": len(files),
            "skipped_files": len(skipped),
            "skipped_reasons": _count_table(skipped_reasons),
            "bytes": sum(_listed_size(f.path) for f in files),
            "files_by_kind": MetadataValue.json(kinds),
            "fingerprint": source.fingerprint,
        }
    )


def _listed_size(path: Path) -> int:
    """A listed data file's size; 0 when it is gone since the listing (moved or removed by
    whoever fills the folder: the ingest's fingerprint check fails the batch, naming no file)
    or cannot be looked at. Never an error quoting the path, which Dagster would keep in its
    storage: file names can carry patient names."""
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _count_table(counts: dict[str, int]) -> MetadataValue:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(counts.items()))
    return MetadataValue.md("| kind | count |\n|---|---|\n" + rows if counts else "none")


def reconciliation_metadata(report: dict[str, Any], rec: Reconciliation) -> dict[str, Any]:
    """Records in = accepted + quarantined, counted four ways: while reading (the ingest
    report, as a dict), per file, in the ledger, and in the vault and quarantine tables."""
    counted = report["records_in"] == rec.records_in == report["accepted"] + report["quarantined"]
    metadata: dict[str, Any] = {k: v for k, v in rec.to_dict().items() if isinstance(v, int | bool)}
    metadata["records_in_while_reading"] = report["records_in"]
    metadata["passed"] = rec.passed and counted
    return metadata


def reconcile_check(report: IngestReport, rec: Reconciliation) -> AssetCheckResult:
    """The reconciliation (:func:`reconciliation_metadata`) as the blocking check. A file that
    failed before its first record counts as one record in, quarantined with its reason."""
    metadata = reconciliation_metadata(report.to_dict(), rec)
    return AssetCheckResult(
        check_name="records_reconcile",
        asset_key="phi_vault",
        passed=bool(metadata["passed"]),
        severity=AssetCheckSeverity.ERROR,
        metadata=metadata,
    )


def quarantine_rate_result(
    records_in: int,
    quarantined: int,
    limit: float,
    others: Mapping[str, tuple[int, int]] | None = None,
) -> AssetCheckResult:
    """Warn when the batch quarantined more than ``limit`` of its records, or read none at all,
    and while any other batch of the warehouse (``others``: batch key -> records read and
    quarantined, as the ledger holds them now) does: Dagster keeps one status per check, not
    one per partition, so a later batch that passes would otherwise clear the warning before
    anyone saw it. The batches over the limit are named (partition keys, which the UI shows)."""
    rate = quarantined / records_in if records_in else 1.0
    over = {
        key: round(q / n if n else 1.0, 4)
        for key, (n, q) in sorted((others or {}).items())
        if not n or q / n > limit
    }
    passed = records_in > 0 and rate <= limit
    described = ", ".join(f"{key} ({share:.0%})" for key, share in over.items())
    return AssetCheckResult(
        check_name="quarantine_rate",
        asset_key="quarantine",
        passed=passed and not over,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "records_in": records_in,
            "quarantined": quarantined,
            "rate": round(rate, 4),
            "max_rate": limit,
            "other_batches_over_max_rate": MetadataValue.json(over),
        },
        description=None
        if not over
        else f"{len(over)} other batch(es) of the warehouse quarantined more than {limit:.0%} "
        f"of their records or read none: {described}. The warning stays until each is run "
        "again with fewer records rejected (its folder dropped again, fixed).",
    )


@multi_asset(
    specs=[
        AssetSpec(
            "phi_vault",
            group_name="ingest",
            deps=[landing_batch],
            description="Accepted original resources, AES-256-GCM under per-patient data keys.",
            kinds={"duckdb"},
        ),
        AssetSpec(
            "quarantine",
            group_name="ingest",
            deps=[landing_batch],
            description="Rejected records, encrypted, with reason code, message and position.",
            kinds={"duckdb"},
        ),
    ],
    check_specs=[
        AssetCheckSpec(
            "records_reconcile",
            asset="phi_vault",
            blocking=True,
            description="Records in = accepted + quarantined, each matching its table.",
        ),
        AssetCheckSpec(
            "quarantine_rate",
            asset="quarantine",
            blocking=False,
            description="The batch, and every other batch of the warehouse, quarantined at most "
            "IngestSettings.max_quarantine_rate of its records (warning: a mostly rejected export "
            "is a broken export, not a success; the batches over it are named).",
        ),
    ],
    partitions_def=batch_partitions,
    pool=WAREHOUSE_POOL,
)
def ingest(
    context: AssetExecutionContext,
    landing: LandingResource,
    warehouse: WarehouseResource,
    keys: KeyProviderResource,
    ingest_settings: IngestSettings,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """One streaming pass over a batch: parse, validate (R4B), resolve, encrypt, write."""
    source = batch_source(Path(landing.path), context.partition_key)
    check_requested_folder(context.run.tags, source, "since its run was requested")
    provider = keys.provider()
    with keys.naming_source():  # keys that are not the warehouse's own: say whose they were
        report = ingest_batch(
            warehouse.path,
            context.partition_key,
            source.path,
            provider,
            workers=ingest_settings.worker_count(),
            fingerprint=source.fingerprint,
            nested=source.nested,
        )
    after = batch_source(Path(landing.path), context.partition_key)
    check_requested_folder(
        {FINGERPRINT_TAG: source.fingerprint},
        after,
        "while it was read",
        "what was read is in the vault but not de-identified or released",
    )
    context.log.info(
        f"batch {report.batch_id}: {report.records_in} records, {report.accepted} accepted, "
        f"{report.quarantined} quarantined in {report.seconds:.1f}s"
    )
    if report.no_longer_in_batch:
        context.log.warning(
            f"batch {report.batch_id}: {report.no_longer_in_batch} resources its previous ingest "
            "held are not in its files now (a file removed or rewritten): re-running a batch "
            "replaces what it wrote, so they left the vault with it unless another batch holds them"
        )
    for message, count in report.file_warnings.items():
        context.log.warning(f"batch {report.batch_id}: {count} file(s): {message}")
    rate = report.records_in / report.seconds if report.seconds else 0.0
    vault_meta: dict[str, Any] = {
        "records_in": report.records_in,
        "accepted": report.accepted,
        "patients": report.patients,
        "outcomes": MetadataValue.json(report.outcomes),
        "resources_by_type": _count_table(report.resources_by_type),
        "references": report.references,
        "unresolved_references": report.unresolved_references,
        "external_references": report.external_references,
        "no_longer_in_batch": report.no_longer_in_batch,
        "records_per_second": round(rate, 1),
        "workers": report.workers,
    }
    con = warehouse.connect(read_only=True)
    try:  # one read of the warehouse after the pass: the vault's totals and the reconciliation
        current, patients = vault_totals(con)
        rec = reconcile_batch(con, context.partition_key)
        others = quarantine_counts(con)
    finally:
        con.close()
    others.pop(context.partition_key, None)
    vault_meta["dagster/row_count"] = current
    vault_meta["vault_patients"] = patients
    vault_meta["ingest_report"] = MetadataValue.json(report.to_dict())
    yield MaterializeResult(asset_key="phi_vault", metadata=vault_meta)
    yield MaterializeResult(
        asset_key="quarantine",
        metadata={
            "quarantined": report.quarantined,
            "reasons": _count_table(report.quarantine_reasons),
        },
    )
    yield quarantine_rate_result(
        report.records_in, report.quarantined, ingest_settings.max_quarantine_rate, others
    )
    yield reconcile_check(report, rec)
