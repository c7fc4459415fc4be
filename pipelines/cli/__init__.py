"""The ``ehr`` command line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from deid.errors import DeidError
from pipelines.cli import features as cli_features
from pipelines.cli import privacy as cli_privacy
from pipelines.cli import views as cli_views
from pipelines.cli.options import existing_warehouse, workdir_option
from pipelines.workdir import Workdir
from vault.errors import KeyMaterialError, VaultError
from vault.keys import default_key_file, init_keyring, shown_key_file


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Privacy-preserving EHR platform: FHIR ingestion, de-identification, features."""


@main.command()
@click.option("--patients", type=click.IntRange(min=1), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["bundle", "ndjson"]), default="bundle")
@click.option("--defect-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True)
def generate(patients: int, seed: int, out_dir: Path, fmt: str, defect_rate: float) -> None:
    """Write synthetic, Synthea-shaped FHIR R4 patients (deterministic for a seed)."""
    from fhirlake.synthetic import generate as run_generate

    summary = run_generate(
        out_dir,
        patients,
        seed=seed,
        fmt="ndjson" if fmt == "ndjson" else "bundle",
        defect_rate=defect_rate,
    )
    click.echo(
        f"wrote {summary.patients} patients, {summary.resources} resources "
        f"in {summary.files} files to {out_dir}"
    )


@main.group()
def keys() -> None:
    """Key material: the key-encryption key and the pseudonym key."""


@keys.command("init")
@click.option("--key-file", type=click.Path(path_type=Path), default=None)
def keys_init(key_file: Path | None) -> None:
    """Create local key material (default ~/.ehr/keyring.json, mode 0600) unless it exists."""
    path = key_file or default_key_file()
    # pipelines/cli/__init__.py: the repository (or, installed, site-packages) is three up
    repo_root = Path(__file__).resolve().parents[2]
    if path.resolve().is_relative_to(repo_root):
        raise click.UsageError("key material must live outside the repository")
    try:
        created = init_keyring(path)
    except KeyMaterialError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{'created' if created else 'kept existing'} keyring at {shown_key_file(path)}")


def _failure(run: dict[str, Any]) -> str:
    """A failed run in a line: its id and each failed step with the class of its error."""
    steps = ", ".join(f"{step} ({error})" for step, error in run.get("failed_steps", {}).items())
    return f"run {run['run_id']} failed" + (f" at {steps}" if steps else "")


@main.command()
@click.option("--input", "input_dir", type=click.Path(path_type=Path, exists=True), required=True)
@workdir_option
@click.option("--key-file", type=str, default=None)
@click.option("--workers", type=int, default=0, help="validation processes (0 = one per core)")
def run(input_dir: Path, workdir: Workdir, key_file: str | None, workers: int) -> None:
    """Materialise the whole asset graph for an input folder and write run_summary.json."""
    from pipelines.run import NoBatchError, run_pipeline
    from vault.landing import BatchFolderNotReadableError
    from vault.warehouse import WarehouseBusyError

    try:
        summary = run_pipeline(input_dir, workdir, key_file=key_file, workers=workers)
    except (DeidError, VaultError, BatchFolderNotReadableError, NoBatchError) as exc:
        raise click.ClickException(str(exc)) from exc
    except WarehouseBusyError as exc:  # open in another process for longer than a run waits
        raise click.ClickException(
            f"{exc}: stop the other command or run (ehr forget, the Dagster UI) and run again"
        ) from exc
    ingest = summary["stages"]["ingest"]
    click.echo(
        f"ingest: {ingest['records_in']} records in, {ingest['accepted']} accepted, "
        f"{ingest['quarantined']} quarantined; vault holds {ingest['vault_resources_current']} "
        f"resources of {ingest['vault_patients']} patients"
    )
    done = set(ingest.get("batches_already_done", []))
    failed = {r["batch"]: r for r in summary["runs"] if not r["success"]}
    for batch in ingest["batches"]:
        key = batch["batch"]
        if key in failed:
            click.echo(f"  batch {key}: {_failure(failed[key])}")
            continue
        passed = batch["reconciliation"].get("passed", "not checked")
        note = " (already ingested and de-identified: not run again)" if key in done else ""
        click.echo(f"  batch {key}: reconciled={passed}{note}")
    for reason in ingest.get("batches_not_read", {}).values():
        click.echo(f"  {reason}: not read, left for the next run (the other batches ran)")
    stages = summary["stages"]
    deid = stages.get("deid") or {}
    if deid:
        # no release run after a failed batch: the table is as the last release left it
        patients = deid.get("released_patients")
        withheld = deid.get("withheld_patients")
        below_k = f", {withheld} withheld below k" if withheld is not None else ""
        table = (
            f"{patients} patients in the k-anonymous table{below_k}"
            if patients is not None
            else "the k-anonymous table not rebuilt (no release run)"
        )
        click.echo(
            f"deid: {deid.get('released', 0)} resources released, "
            f"{sum((deid.get('withheld') or {}).values())} withheld; {table}"
        )
    for stage in ("views", "features"):
        if stages.get(stage):
            tables = ", ".join(f"{t} {n}" for t, n in stages[stage].items())
            click.echo(f"{stage}: {tables}")
    model = stages.get("models") or {}
    if model.get("test_auroc") is not None:
        click.echo(
            f"model: readmission {model['model']}, held-out AUROC {model['test_auroc']:.3f} "
            f"on {model['n_test']} discharges; card {model['model_card']}"
        )
    if None in failed:
        click.echo(f"release: {_failure(failed[None])}")
    click.echo(f"summary: {workdir.summary}")
    if not summary["success"]:
        click.echo("some runs failed: open the Dagster UI (make ui) for details", err=True)
        sys.exit(1)


keys.add_command(cli_privacy.keys_rotate)
keys.add_command(cli_privacy.keys_purge_retired)
keys.add_command(cli_privacy.keys_migrate_audit_key)
keys.add_command(cli_privacy.keys_forget_warehouse)
main.add_command(cli_privacy.forget)
main.add_command(cli_privacy.reidentify)
main.add_command(cli_privacy.audit)


@main.group()
def quarantine() -> None:
    """Inspect quarantined records (reasons and positions; contents stay encrypted)."""


@quarantine.command("list")
@workdir_option
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True)
def quarantine_list(workdir: Workdir, limit: int) -> None:
    """Quarantined records: batch, file pseudonym, position, reason (one JSON object a line;
    when there are more than ``--limit``, standard error says how many are not shown)."""
    with existing_warehouse(workdir, read_only=True) as con:
        rows = con.execute(
            "SELECT batch_id, file_id, position, reason_code, message FROM quarantine "
            "ORDER BY batch_id, file_index, position LIMIT ?",
            [limit],
        ).fetchall()
        ((total,),) = con.execute("SELECT count(*) FROM quarantine").fetchall()
    for row in rows:
        click.echo(json.dumps(dict(zip(["batch", "file", "position", "reason", "message"], row))))
    if total > len(rows):
        click.echo(
            f"{len(rows)} of {total} quarantined records shown; --limit {total} shows them all",
            err=True,
        )


main.add_command(cli_views.views)
main.add_command(cli_features.features)


@main.group()
def bench() -> None:
    """Benchmarks: print throughput, memory and ratios to baselines."""


@bench.command("ingest")
@click.option("--patients", type=click.IntRange(min=1), default=None)
@click.option("--input", "input_dir", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--workers", type=int, default=0, help="0 = one per core")
@click.option("--double", is_flag=True, help="also run on twice the patients (memory growth)")
def bench_ingest_cmd(
    patients: int | None, input_dir: Path | None, seed: int, workers: int, double: bool
) -> None:
    """Ingest throughput against orjson parsing and single-core R4B validation."""
    import os
    import tempfile

    from pipelines.bench.ingest_deid import bench_ingest, generated_input

    if (patients is None) == (input_dir is None):
        raise click.UsageError("give exactly one of --patients or --input")
    workers = workers or (os.cpu_count() or 1)
    results = []
    with tempfile.TemporaryDirectory(prefix="ehr-bench-input-") as tmp:
        if input_dir is not None:
            results.append(bench_ingest(input_dir, workers, label=str(input_dir.name)))
        else:
            assert patients is not None
            sizes = [patients, patients * 2] if double else [patients]
            for n in sizes:
                folder = generated_input(n, seed, Path(tmp))
                results.append(bench_ingest(folder, workers, label=f"{n} patients"))
                shutil.rmtree(folder)
    for result in results:
        click.echo(f"== ingest benchmark: {result['label']}")
        for key, value in result.items():
            if key != "label":
                click.echo(f"  {key:32s} {value}")
    if len(results) == 2:
        growth = results[1]["peak_rss_mib_main"] / max(results[0]["peak_rss_mib_main"], 1e-9)
        click.echo(f"  peak RSS growth when the input doubles: {growth:.2f}x")


@bench.command("deid")
@click.option("--patients", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--profile", type=click.Choice(["research", "safe_harbor"]), default="research")
def bench_deid_cmd(patients: int, seed: int, profile: str) -> None:
    """De-identification throughput against orjson parsing of the same resources."""
    import tempfile

    from pipelines.bench.ingest_deid import bench_deid, generated_input

    with tempfile.TemporaryDirectory(prefix="ehr-bench-input-") as tmp:
        result = bench_deid(generated_input(patients, seed, Path(tmp)), profile)
    click.echo(f"== de-identification benchmark: {patients} patients")
    for key, value in result.items():
        click.echo(f"  {key:32s} {value}")


@bench.command("views")
@click.option("--patients", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--input",
    "input_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="a FHIR folder instead of generated patients",
)
def bench_views_cmd(patients: int, seed: int, input_dir: Path | None) -> None:
    """Rows/s per view, against DuckDB read_json of the same NDJSON and the ingest stage."""
    import tempfile

    from pipelines.bench.ingest_deid import bench_views, generated_input

    with tempfile.TemporaryDirectory(prefix="ehr-bench-input-") as tmp:
        folder = input_dir or generated_input(patients, seed, Path(tmp))
        result = bench_views(folder)
    click.echo(f"== views benchmark: {input_dir or f'{patients} generated patients'}")
    click.echo(
        f"  {'view':22s} {'rows':>8s} {'rows/s':>10s} {'seconds':>8s} {'read_json s':>11s} "
        f"{'ratio':>6s}"
    )
    for v in result["views"]:
        click.echo(
            f"  {v['view']:22s} {v['rows']:8d} {v['rows_per_second'] or 0:10.0f} "
            f"{v['seconds']:8.2f} {v['read_json_seconds']:11.3f} "
            f"{v['ratio_to_read_json'] or 0:6.1f}"
        )
    click.echo(f"  all views: {result['views_seconds']} s; ingest: {result['ingest_seconds']} s")
    click.echo(
        f"  ratio views/ingest: {result['ratio_views_to_ingest']} "
        f"(goal <= {result['goal_ratio_views_to_ingest']})"
    )


@bench.command("release")
@click.option("--patients", type=click.IntRange(min=20), default=1000, show_default=True)
@click.option("--share", type=click.FloatRange(0.001, 0.5), default=0.01, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="run the release after the late batch and the full release this many times each, "
    "from the same state; the ratios are those of the median runs",
)
@click.option("--keep", type=click.Path(path_type=Path), default=None, help="keep the folders here")
def bench_release_cmd(
    patients: int, share: float, seed: int, repeat: int, keep: Path | None
) -> None:
    """A small late batch (its batch run and the release after it) against a full release of
    the same data; and whether both give the same released tables."""
    import tempfile

    from dagster._core.errors import DagsterAssetCheckFailedError

    from pipelines.bench.release import bench_release, print_release_bench

    with tempfile.TemporaryDirectory(prefix="ehr-bench-release-") as tmp:
        root = keep or Path(tmp)
        try:
            result = bench_release(root, patients, share, seed, repeat)
        except DagsterAssetCheckFailedError as exc:
            # a small generated cohort may not be k-anonymous within the withheld share the
            # release allows: the release is then not published, and there is nothing to time
            hint = (
                f"; {patients} generated patients may be too few to be k-anonymous within the "
                "share the release may withhold: try --patients 300 or more (or EHR_DEID_K, "
                "EHR_MAX_WITHHELD_SHARE)"
                if "k_anonymity" in str(exc)
                else ""
            )
            raise click.ClickException(f"a release run failed a blocking check{hint}") from exc
        print_release_bench(result)


@bench.command("features")
@click.option("--entity-rows", type=click.IntRange(min=10), default=100_000, show_default=True)
@click.option("--patients", type=click.IntRange(min=10), default=10_000, show_default=True)
@click.option("--online-requests", type=click.IntRange(min=10), default=200, show_default=True)
@click.option("--no-http", is_flag=True, help="skip the feast serve (HTTP) measurements")
def bench_features_cmd(
    entity_rows: int, patients: int, online_requests: int, no_http: bool
) -> None:
    """Feast training-set retrieval against a DuckDB ASOF JOIN, online latency (SDK and
    feast serve), and materialisation time per 100,000 feature rows."""
    from pipelines.bench.features import bench_features

    click.echo(f"== feature store benchmark: {entity_rows} entity rows, {patients} patients")
    bench_features(
        entity_rows=entity_rows,
        patients=patients,
        online_requests=online_requests,
        http=not no_http,
        echo=click.echo,
    )


if __name__ == "__main__":
    main()
