"""``ehr bench release``: what a small batch costs against a full release, printed (never
asserted).

A generated cohort is split into a base batch and a late batch (``--share`` of the patients,
1 % by default: whole patient files moved to a second landing folder). Two work directories,
one keyring (the same pseudonyms and date shifts), each with its own Dagster instance:

- *incremental*: the base batch, the release, then the late batch and the release again, the
  way the landing sensor and the release automation run them (one batch run, one release run),
  and the release once more with nothing new: what every refresh pays however small its batch
  (Dagster's own run and event bookkeeping, reading the release to find what changed);
- *full*: both batches, then one release over everything: a full release.

Then a day of a live feed (:func:`_bench_next_day`): a batch of one visit for each of as many
patients as the late batch holds, dated the day after the release's data end on each one's
shifted time line, so that it moves the data end by a day, as nearly every batch of a live feed
does (the late batch, whole patients from the same years as the others, moves it rarely). Its
release is timed in the incremental directory (``--repeat`` runs), set against the same full
release, with the patients the moved data end made the features compute again; both
directories run the batch, and their released tables are compared.

The release after the late batch and the full release are each run ``--repeat`` times (3 by
default) from the same state (the work directory copied aside and put back), each as a new run
process starts (a fresh instance, no canaries in memory). The two take turns (late, full, late,
full, ...): the load of a shared machine drifts from one minute to the next, and a ratio of runs
measured minutes apart would carry that drift. The ratios are those of the median runs, and every
run's seconds are printed: on a shared machine one run moves by a quarter. Where the machine is
a virtual one, the share of its CPU time the host gave to other guests during the timed runs
(steal, from ``/proc/stat``) is printed too.

It prints the seconds of each run, the ratio of the release run after the late batch to the
full release run (goal: at most 0.10), split into what a release with nothing new costs and
what is left, the late batch's own work; the same ratio in CPU seconds (which a busy neighbour on
a shared machine does not move), the ratios of the late batch's whole cost (its batch run plus
its release run) to the full release run and to the whole full pipeline, each release step's
seconds, how much of each release run was Dagster's bookkeeping (the run's main thread outside
the assets' code, :mod:`pipelines.bench.clock`: its wall seconds and its own CPU seconds) and the
ratio of the release runs less Dagster's own CPU seconds, and whether the two work
directories' released tables are equal (content digests; the feature tables' ``created``
column, the build time, is left out, and floating-point values are compared to 9 decimals).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
from dagster import DagsterInstance, materialize

from fhirlake.synthetic.generator import generate
from pipelines.assets.checks import RELEASE_CANARIES
from pipelines.bench.clock import AssetCodeClock
from pipelines.definitions import batch_assets, build_resources, release_run
from pipelines.partitions import batch_partitions
from pipelines.run import local_instance
from pipelines.workdir import Workdir
from vault.catalog import multiset_digest_sql
from vault.keys import FileKeyProvider, init_keyring
from vault.pseudonym import Pseudonymizer

_PARTITIONS = batch_partitions.name or "batches"
# columns that differ between two correct builds: when they were built
_BUILD_TIME_COLUMNS = ("created",)


def split_cohort(root: Path, patients: int, share: float, seed: int) -> tuple[str, str]:
    """Generate ``patients`` into ``root/landing/base`` and move the last ``share`` of the
    patient files to ``root/landing/late``; the two batch keys."""
    base = root / "landing" / "base"
    late = root / "landing" / "late"
    generate(patients=patients, seed=seed, out_dir=base)
    late.mkdir(parents=True)
    files = sorted(p for p in base.glob("[0-9]*.json"))
    for path in files[len(files) - max(1, round(patients * share)) :]:
        shutil.move(path, late / path.name)
    return "base", "late"


@dataclass(frozen=True)
class Timed:
    """A run's wall seconds and CPU seconds (this process, all its threads, and the
    subprocesses it waited for, such as ``feast apply``): the CPU figure is the one a noisy
    neighbour on a shared machine does not move."""

    seconds: float
    cpu_seconds: float


def _cpu_now() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _timed(
    assets: list[Any], instance: DagsterInstance, resources: dict[str, Any], partition: str | None
) -> tuple[Timed, Any]:
    started, cpu_started = time.perf_counter(), _cpu_now()
    result = materialize(
        assets,
        partition_key=partition,
        instance=instance,
        resources=resources,
        raise_on_error=True,
    )
    return Timed(time.perf_counter() - started, _cpu_now() - cpu_started), result


def step_seconds(instance: DagsterInstance, run_id: str) -> dict[str, float]:
    """Seconds of each step of a run, from its event log."""
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type_value == "STEP_START":
            started[event.step_key] = record.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            seconds[event.step_key] = round(record.timestamp - started[event.step_key], 2)
    return seconds


def refresh_modes(result: Any) -> dict[str, str]:
    """How each refreshed table was rebuilt (``full``, ``incremental``, ``unchanged``)."""
    modes: dict[str, str] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        mode = materialization.metadata.get("refresh")
        if mode is not None:
            modes[materialization.asset_key.to_user_string()] = str(mode.value)
    return modes


def patients_data_end_moved(result: Any) -> int:
    """How many patients the feature refresh computed again because the data end moved."""
    for event in result.get_asset_materialization_events():
        moved = event.step_materialization_data.materialization.metadata.get(
            "patients_data_end_moved"
        )
        if moved is not None:
            return int(moved.value)
    return 0


def _workdir_run(root: Path, landing: Path, key_file: Path) -> tuple[dict[str, Any], Any]:
    init_keyring(key_file)
    resources = build_resources(str(root), str(landing), str(key_file))
    return resources, local_instance(Workdir(root).dagster_home)


def release_digests(warehouse: Path) -> dict[str, str]:
    """A content digest of every released table, independent of row order; floating-point
    values to 9 decimals (a parallel sum differs in its last bits from one build to the next)."""
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        tables = con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() "
            "WHERE schema_name IN ('views', 'features', 'models') "
            "OR table_name = 'released_patients' "
            "ORDER BY 1, 2"
        ).fetchall()
        digests = {}
        for schema, table in tables:
            columns = [
                f'round("{name}", 9)' if type_ == "DOUBLE" else f'"{name}"'
                for name, type_, *_ in con.execute(f"DESCRIBE {schema}.{table}").fetchall()
                if name not in _BUILD_TIME_COLUMNS
            ]
            ((digest,),) = con.execute(
                f"SELECT count(*) || ':' || coalesce({multiset_digest_sql('hash(t)')}, 0) "
                f"FROM (SELECT {', '.join(columns)} FROM {schema}.{table}) t"
            ).fetchall()
            digests[f"{schema}.{table}"] = str(digest)
        return digests
    finally:
        con.close()


@dataclass(frozen=True)
class ReleaseRun:
    """One timed release run: its seconds, each step's seconds, how each table was refreshed,
    and the seconds of its wall time spent in the platform's own code (the assets and the
    warehouse resource, :class:`pipelines.bench.clock.AssetCodeClock`)."""

    timed: Timed
    steps: dict[str, float]
    refresh: dict[str, str]
    platform_seconds: float = 0.0
    # CPU seconds of the run's main thread outside the assets' code: Dagster's own work (the
    # run, its planned events, steps, outputs, materialisations, check results)
    dagster_cpu_seconds: float = 0.0
    # patients whose features were computed again only because the data end moved
    data_end_moved: int = 0

    @property
    def dagster_seconds(self) -> float:
        """The rest of the run's wall time: Dagster's bookkeeping, with the waits for Python's
        lock that the assets' worker threads caused it."""
        return self.timed.seconds - self.platform_seconds

    @property
    def without_dagster_seconds(self) -> float:
        """The run's wall time less Dagster's own CPU seconds: what the platform's work takes."""
        return self.timed.seconds - self.dagster_cpu_seconds


def _release_run(work: Path, landing: Path, key_file: Path) -> ReleaseRun:
    """One timed release run, started as a new run process would: a fresh instance and no
    canaries in memory, the disk synced first (the pages of a copy just made would otherwise
    be written out during the run, which a short run feels most), and what this process holds
    from its earlier runs collected and the rest frozen out of Python's cycle collector, as
    ``pipelines.definitions`` leaves a run process's modules when it loads them: otherwise a
    full collection early in the run walks every object the bench made before it (0.32-0.38 s
    of the run's main thread, in two of three releases after the late batch, measured with
    ``gc.callbacks``), which a run process never carries."""
    os.sync()
    RELEASE_CANARIES.clear()
    gc.collect()
    gc.freeze()
    resources, instance = _workdir_run(work, landing, key_file)
    with instance, AssetCodeClock().timing(release_run) as clock:
        main_cpu = time.thread_time()
        timed, result = _timed(release_run, instance, resources, None)
        main_cpu = time.thread_time() - main_cpu
        return ReleaseRun(
            timed,
            step_seconds(instance, result.run_id),
            refresh_modes(result),
            clock.seconds,
            main_cpu - clock.cpu_seconds,
            patients_data_end_moved(result),
        )


def _release_runs(
    works: list[Path], landing: Path, key_file: Path, runs: int
) -> list[list[ReleaseRun]]:
    """The release run ``runs`` times in each work directory from the same state, the
    directories taking turns (the first one's run, the second one's, then the first one's
    again): the load of a shared machine drifts from minute to minute, and runs compared are
    then measured in the same minutes. Each directory (its Dagster instance included) is copied
    aside first and put back before each of its later runs, so every run does the same work; the
    last run's state stays."""
    saved = [work.with_name(work.name + ".before-release") for work in works]
    out: list[list[ReleaseRun]] = [[] for _ in works]
    try:
        if runs > 1:
            for work, copy in zip(works, saved, strict=True):
                shutil.copytree(work, copy)
        for run in range(runs):
            for position, (work, copy) in enumerate(zip(works, saved, strict=True)):
                if run:
                    shutil.rmtree(work)
                    shutil.copytree(copy, work)
                out[position].append(_release_run(work, landing, key_file))
    finally:
        for copy in saved:
            shutil.rmtree(copy, ignore_errors=True)
    return out


def host_ticks() -> tuple[int, int] | None:
    """The host's CPU clock ticks so far, all of them and those stolen by other guests of a
    virtual machine's host (``/proc/stat``, Linux); None where there is no such file."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    steal = ticks[7] if len(ticks) > 7 else 0
    # guest time is counted in user time already
    return sum(ticks[:8]), steal


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the CPU ticks between two readings that other guests took."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def _median_run(runs: list[ReleaseRun]) -> ReleaseRun:
    """The run of median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.timed.seconds)[(len(runs) - 1) // 2]


def _batches(work: Path, landing: Path, key_file: Path, keys: list[str], release: bool) -> float:
    """Run the batches ``keys`` (and, with ``release``, the release after the first of them);
    returns the seconds of the last batch run."""
    resources, instance = _workdir_run(work, landing, key_file)
    with instance:
        instance.add_dynamic_partitions(_PARTITIONS, keys)
        seconds = 0.0
        for position, key in enumerate(keys):
            seconds = _timed(batch_assets, instance, resources, key)[0].seconds
            if release and position == 0:
                _timed(release_run, instance, resources, None)
    return seconds


def bench_release(
    root: Path, patients: int, share: float, seed: int, repeat: int = 1
) -> dict[str, Any]:
    """Run both work directories and return the measurements; the release after the late batch
    and the full release are each run ``repeat`` times from the same state, and the ratios
    are those of the median runs."""
    base, late = split_cohort(root, patients, share, seed)
    landing, key_file = root / "landing", root / "keys.json"
    out: dict[str, Any] = {"patients": patients, "share": share, "repeat": repeat}
    incremental, full = root / "incremental", root / "full"
    out["late_batch_s"] = _batches(incremental, landing, key_file, [base, late], release=True)
    started = time.perf_counter()
    _batches(full, landing, key_file, [base, late], release=False)
    batches_s = time.perf_counter() - started
    ticks = host_ticks()
    late_runs, full_runs = _release_runs([incremental, full], landing, key_file, repeat)
    out["steal_share"] = steal_share(ticks, host_ticks())
    # the same release once more with nothing new: what every refresh pays
    idle = _release_run(incremental, landing, key_file)
    late_run, full_run = _median_run(late_runs), _median_run(full_runs)
    out["late_release_runs_s"] = [r.timed.seconds for r in late_runs]
    out["full_release_runs_s"] = [r.timed.seconds for r in full_runs]
    out["full_pipeline_s"] = batches_s + full_run.timed.seconds
    out["late_release_steps"], out["late_refresh"] = late_run.steps, late_run.refresh
    out["idle_release_steps"] = idle.steps
    out["full_release_steps"] = full_run.steps
    out["late_release_s"], out["full_release_s"] = late_run.timed.seconds, full_run.timed.seconds
    out["idle_release_s"] = idle.timed.seconds
    out["late_release_cpu_s"] = late_run.timed.cpu_seconds
    out["full_release_cpu_s"] = full_run.timed.cpu_seconds
    late_cost = out["late_batch_s"] + out["late_release_s"]
    out["release_ratio"] = out["late_release_s"] / out["full_release_s"]
    out["release_cpu_ratio"] = out["late_release_cpu_s"] / out["full_release_cpu_s"]
    out["idle_ratio"] = out["idle_release_s"] / out["full_release_s"]
    out["batch_work_ratio"] = (out["late_release_s"] - out["idle_release_s"]) / out[
        "full_release_s"
    ]
    out["ratio_to_full_release"] = late_cost / out["full_release_s"]
    out["ratio_to_full_pipeline"] = late_cost / out["full_pipeline_s"]
    for which, run in (("late", late_run), ("idle", idle), ("full", full_run)):
        out[f"{which}_dagster_s"] = run.dagster_seconds
        out[f"{which}_dagster_cpu_s"] = run.dagster_cpu_seconds
        out[f"{which}_platform_s"] = run.platform_seconds
        out[f"{which}_without_dagster_s"] = run.without_dagster_seconds
    out["without_dagster_ratio"] = out["late_without_dagster_s"] / out["full_without_dagster_s"]
    a = release_digests(Workdir(incremental).warehouse)
    b = release_digests(Workdir(full).warehouse)
    out["tables_compared"] = len(b)
    out["tables_differing"] = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    out.update(_bench_next_day(root, landing, key_file, repeat, max(1, round(patients * share))))
    out["next_day_ratio"] = out["next_day_release_s"] / out["full_release_s"]
    return out


def _bench_next_day(
    root: Path, landing: Path, key_file: Path, repeat: int, count: int
) -> dict[str, Any]:
    """A day of a live feed: a batch of one visit for each of ``count`` patients, dated the day
    after the release's data end on each one's time line, so that it moves the data end by a
    day. Both work directories run it; the release after it is timed in the incremental one
    (``repeat`` runs from the same state), the full one releases once, and their released
    tables are compared."""
    incremental, full = root / "incremental", root / "full"
    key = write_next_day_batch(landing, Workdir(incremental).warehouse, key_file, count)
    out: dict[str, Any] = {"next_day_patients": count}
    out["next_day_batch_s"] = _batches(incremental, landing, key_file, [key], release=False)
    _batches(full, landing, key_file, [key], release=False)
    (runs,) = _release_runs([incremental], landing, key_file, repeat)
    _release_run(full, landing, key_file)
    run = _median_run(runs)
    out["next_day_release_runs_s"] = [r.timed.seconds for r in runs]
    out["next_day_release_s"] = run.timed.seconds
    out["next_day_release_steps"] = run.steps
    out["next_day_data_end_moved"] = run.data_end_moved
    out["next_day_refresh"] = run.refresh
    a = release_digests(Workdir(incremental).warehouse)
    b = release_digests(Workdir(full).warehouse)
    out["next_day_tables_differing"] = sorted(
        k for k in a.keys() | b.keys() if a.get(k) != b.get(k)
    )
    return out


NEXT_DAY_BATCH = "next-day"


def write_next_day_batch(landing: Path, warehouse: Path, key_file: Path, count: int) -> str:
    """Write the batch :func:`_bench_next_day` runs: for each of the first ``count`` patients of
    the base batch, one ambulatory visit dated the day after the release's data end on that
    patient's time line (the research profile shifts each patient's dates by a secret number of
    days: read here, as an operator holding the keys could, from one of the patient's visits as
    the views hold it). Returns its batch key."""
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        ((end,),) = con.execute(
            "SELECT value FROM release_state.feature_builds WHERE key = 'data_end'"
        ).fetchall()
        day_after = datetime.fromisoformat(end).date() + timedelta(days=1)
        pseudonyms = Pseudonymizer(FileKeyProvider.load(key_file).pseudonym_key())
        visits: list[dict[str, Any]] = []
        for path in sorted((landing / "base").glob("[0-9]*.json")):
            patient_id, visit_id, start = _a_patient_and_visit(path)
            # a patient in the features (released, not opted out), with the visit in the views
            shifted = con.execute(
                "SELECT e.period_start FROM views.encounter e "
                "SEMI JOIN features.patient_demographics f ON f.patient_id = e.patient_id "
                "WHERE e.id = ? AND e.period_start IS NOT NULL",
                [pseudonyms.resource_key("Encounter", visit_id)],
            ).fetchall()
            if not shifted:
                continue
            shift = shifted[0][0].date() - start.date()
            at = datetime.combine(day_after - shift, datetime.min.time(), UTC) + timedelta(hours=9)
            visits.append(_visit(patient_id, f"next-day-{len(visits)}", at))
            if len(visits) == count:
                break
    finally:
        con.close()
    folder = landing / NEXT_DAY_BATCH
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Encounter.ndjson").write_text("".join(json.dumps(v) + "\n" for v in visits))
    return NEXT_DAY_BATCH


def _a_patient_and_visit(path: Path) -> tuple[str, str, datetime]:
    """A generated patient file's Patient id, and the id and start of its first visit."""
    entries = [e["resource"] for e in json.loads(path.read_text())["entry"]]
    patient = next(r for r in entries if r["resourceType"] == "Patient")
    visit = next(r for r in entries if r["resourceType"] == "Encounter" and "period" in r)
    return patient["id"], visit["id"], datetime.fromisoformat(visit["period"]["start"])


def _visit(patient_id: str, visit_id: str, at: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": visit_id,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": {"start": at.isoformat(), "end": (at + timedelta(minutes=30)).isoformat()},
    }


def _runs(out: dict[str, Any], which: str) -> str:
    runs = out[f"{which}_release_runs_s"]
    if len(runs) < 2:
        return ""
    return f" (median of {len(runs)} runs: " + ", ".join(f"{s:.1f}" for s in runs) + " s)"


def print_release_bench(out: dict[str, Any]) -> None:
    print(f"cohort: {out['patients']} patients; late batch: {out['share']:.1%} of them")
    print(f"late batch run                    {out['late_batch_s']:7.1f} s")
    print(f"release after the late batch      {out['late_release_s']:7.1f} s{_runs(out, 'late')}")
    print(f"release with nothing new          {out['idle_release_s']:7.1f} s")
    print(f"full release (both batches)       {out['full_release_s']:7.1f} s{_runs(out, 'full')}")
    print(f"full pipeline (ingest to model)   {out['full_pipeline_s']:7.1f} s")
    print(f"release after the late batch / full release: {out['release_ratio']:.3f} (goal <= 0.10)")
    print(
        f"  in CPU seconds: {out['late_release_cpu_s']:.1f} / {out['full_release_cpu_s']:.1f} = "
        f"{out['release_cpu_ratio']:.3f}"
    )
    print(
        f"  of which every refresh pays (nothing new / full release): {out['idle_ratio']:.3f}; "
        f"the late batch's own work: {out['batch_work_ratio']:.3f}"
    )
    print(
        "  Dagster's bookkeeping in each run, outside the assets' code (late / nothing new / "
        f"full): {out['late_dagster_s']:.2f} / {out['idle_dagster_s']:.2f} / "
        f"{out['full_dagster_s']:.2f} s, of it Dagster's own CPU {out['late_dagster_cpu_s']:.2f} "
        f"/ {out['idle_dagster_cpu_s']:.2f} / {out['full_dagster_cpu_s']:.2f} s"
    )
    print(
        "  without Dagster's own CPU seconds: "
        f"{out['late_without_dagster_s']:.1f} / {out['full_without_dagster_s']:.1f} = "
        f"{out['without_dagster_ratio']:.3f}"
    )
    if out["steal_share"] is not None:
        print(f"  CPU time taken by the host's other guests (steal): {out['steal_share']:.1%}")
    print(f"late batch + its release / full release:  {out['ratio_to_full_release']:.3f}")
    print(f"late batch + its release / full pipeline: {out['ratio_to_full_pipeline']:.3f}")
    print("release steps (late / nothing new / full), seconds:")
    for step, full in out["full_release_steps"].items():
        late, idle = (
            out["late_release_steps"].get(step, 0.0),
            out["idle_release_steps"].get(step, 0.0),
        )
        print(f"  {step:40s} {late:6.2f} / {idle:6.2f} / {full:6.2f}")
    modes = sorted(set(out["late_refresh"].items()), key=lambda kv: kv[0])
    print("refresh after the late batch: " + ", ".join(f"{k} {v}" for k, v in modes))
    differing = out["tables_differing"]
    print(
        f"released tables equal to the full release: "
        f"{out['tables_compared'] - len(differing)}/{out['tables_compared']}"
        + (f" (differ: {', '.join(differing)})" if differing else "")
    )
    print(
        f"a day's visits ({out['next_day_patients']} patients, the data end a day later): "
        f"batch run {out['next_day_batch_s']:.1f} s, release after it "
        f"{out['next_day_release_s']:.1f} s{_runs(out, 'next_day')}"
    )
    print(
        f"  release after a day's visits / full release: {out['next_day_ratio']:.3f}; "
        f"patients computed again for the moved data end: {out['next_day_data_end_moved']}"
    )
    print(
        "  release steps, seconds: "
        + ", ".join(f"{k} {v:.2f}" for k, v in out["next_day_release_steps"].items())
    )
    moved_differing = out["next_day_tables_differing"]
    print(
        "  released tables equal to a full release of the same batches: "
        + ("all" if not moved_differing else f"no (differ: {', '.join(moved_differing)})")
    )
