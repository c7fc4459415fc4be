"""Benchmarks that print numbers and ratios (never asserted in tests).

``ehr bench ingest`` measures, on one input: parsing alone (orjson), validating alone
(fhir.resources R4B, one core), and the whole ingest pass (parse + validate + resolve +
encrypt + write, all cores), with peak memory of the ingest process and its workers.
"""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fhirlake.readers import iter_records, list_batch_files
from fhirlake.validation import model_class
from vault.ingest import ingest_batch
from vault.keys import init_keyring, load_key_provider


@dataclass
class Baselines:
    records: int
    bytes: int
    parse_seconds: float
    validate_seconds: float


def measure_baselines(folder: Path) -> Baselines:
    """Stream the input once; time only the orjson parse, then only the R4B validation, of
    every record (reading the files is excluded from both)."""
    files, _ = list_batch_files(folder)
    parse = validate = 0.0
    records = size = 0
    for source in files:
        size += source.path.stat().st_size
        for record in iter_records(source):
            raw = record.raw or b""
            records += 1
            t0 = time.perf_counter()
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parse += time.perf_counter() - t0
                continue
            t1 = time.perf_counter()
            parse += t1 - t0
            cls = model_class(obj.get("resourceType", "")) if isinstance(obj, dict) else None
            if cls is None:
                continue
            t2 = time.perf_counter()
            try:
                cls.model_validate_json(raw)
            except ValueError:
                pass
            validate += time.perf_counter() - t2
    return Baselines(records, size, parse, validate)


def _ingest_child(folder: str, warehouse: str, key_file: str, workers: int, out: Any) -> None:
    started = time.perf_counter()
    report = ingest_batch(
        Path(warehouse), "bench", Path(folder), load_key_provider(key_file), workers=workers
    )
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.send({"seconds": seconds, "report": report.to_dict(), "rss_kib": [own, children]})


def measure_ingest(folder: Path, workdir: Path, key_file: Path, workers: int) -> dict[str, Any]:
    """Run the ingest in a fresh process, so its peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_ingest_child,
        args=(str(folder), str(workdir / "bench.duckdb"), str(key_file), workers, sender),
    )
    proc.start()
    result: dict[str, Any] = receiver.recv()
    proc.join()
    return result


def bench_ingest(folder: Path, workers: int, label: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ehr-bench-") as tmp:
        tmp_path = Path(tmp)
        key_file = tmp_path / "keys" / "keyring.json"
        init_keyring(key_file)
        base = measure_baselines(folder)
        run = measure_ingest(folder, tmp_path, key_file, workers)
    seconds = run["seconds"]
    own_kib, child_kib = run["rss_kib"]
    return {
        "label": label,
        "records": base.records,
        "megabytes": round(base.bytes / 1e6, 1),
        "workers": workers,
        "ingest_seconds": round(seconds, 2),
        "resources_per_second": round(base.records / seconds, 1),
        "megabytes_per_second": round(base.bytes / 1e6 / seconds, 2),
        "parse_only_seconds": round(base.parse_seconds, 2),
        "validate_only_seconds": round(base.validate_seconds, 2),
        "ratio_ingest_to_parse": round(seconds / base.parse_seconds, 2),
        "ratio_ingest_to_validate_1core": round(seconds / base.validate_seconds, 2),
        "peak_rss_mib_main": round(own_kib / 1024, 1),
        "peak_rss_mib_worker": round(child_kib / 1024, 1),
        "accepted": run["report"]["accepted"],
        "quarantined": run["report"]["quarantined"],
    }


def generated_input(patients: int, seed: int, root: Path) -> Path:
    from fhirlake.synthetic import generate

    out = root / f"synthetic-{patients}"
    if out.exists():
        shutil.rmtree(out)
    generate(out, patients, seed=seed, fmt="bundle")
    return out


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@dataclass
class _StageRun:
    resources: list[dict[str, Any]]
    pseudonym_key: bytes
    resources_in: int
    seconds: float
    main_cpu: float
    workers_cpu: float


def _run_stage(folder: Path, policy: Any, workers: int) -> _StageRun:
    """Ingest ``folder``, then time ``deidentify_batch`` over it (wall and CPU seconds)."""
    from deid.release import deidentify_batch
    from vault import warehouse
    from vault.read import iter_current_resources

    with tempfile.TemporaryDirectory(prefix="ehr-bench-") as tmp:
        tmp_path = Path(tmp)
        key_file = tmp_path / "keys" / "keyring.json"
        init_keyring(key_file)
        provider = load_key_provider(key_file)
        ingest_batch(tmp_path / "w.duckdb", "bench", folder, provider)
        con = warehouse.connect(tmp_path / "w.duckdb")
        try:
            resources = list(iter_current_resources(con, provider))
            main_before, workers_before = _cpu_seconds()
            started = time.perf_counter()
            report = deidentify_batch(con, provider, "bench", policy, workers=workers)
            seconds = time.perf_counter() - started
            main_after, workers_after = _cpu_seconds()
        finally:
            con.close()
    return _StageRun(
        resources,
        provider.pseudonym_key(),
        report.resources_in,
        seconds,
        main_after - main_before,
        workers_after - workers_before,
    )


def _timed(work: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of ``work``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_deid(
    folder: Path, profile: str = "research", workers: int | None = None
) -> dict[str, Any]:
    """De-identification against orjson parsing of the same resources, two ways: the engine
    alone on one core (resources already decrypted in memory), and the whole stage as a batch
    runs it (decrypt, de-identify on ``workers`` processes, insert into ``deid_resources``)."""
    from deid.engine import Deidentifier, DeidSecrets
    from deid.methods import today_utc
    from deid.policy import Policy
    from deid.workers import default_workers
    from vault.pseudonym import Pseudonymizer

    workers = default_workers() if workers is None else workers
    policy = Policy.shipped(profile)
    stage = _run_stage(folder, policy, workers)
    resources = stage.resources
    raws = [orjson.dumps(r) for r in resources]

    def parse_all() -> None:
        for raw in raws:
            orjson.loads(raw)

    parse, parse_cpu = _timed(parse_all)
    engine = Deidentifier(
        policy, DeidSecrets.derive(stage.pseudonym_key, policy), today=today_utc()
    )
    pseudo = Pseudonymizer(stage.pseudonym_key)

    def deidentify_all() -> None:
        for item in resources:
            owner = None
            if item["resourceType"] == "Patient":
                owner = pseudo.resource_key("Patient", item["id"])
            engine.apply(item, patient_scope=owner)

    deid, deid_cpu = _timed(deidentify_all)
    # on an otherwise idle machine the stage takes at least its busiest process and at least
    # its total CPU spread over the cores it uses: the estimate when other work shares the cores
    idle_estimate = max(stage.main_cpu, (stage.main_cpu + stage.workers_cpu) / max(workers, 1))
    per_190k = 190_000 / max(stage.resources_in, 1)
    return {
        "profile": profile,
        "resources": len(resources),
        "deid_seconds": round(deid, 2),
        "deid_resources_per_second": round(len(resources) / deid, 1),
        "parse_seconds": round(parse, 3),
        "parse_resources_per_second": round(len(resources) / parse, 1),
        "ratio_deid_to_parse": round(deid / parse, 1),
        "ratio_deid_to_parse_cpu": round(deid_cpu / parse_cpu, 1),
        "stage_workers": workers,
        "stage_seconds": round(stage.seconds, 2),
        "stage_resources_per_second": round(stage.resources_in / stage.seconds, 1),
        "ratio_stage_to_parse": round(stage.seconds / parse, 1),
        "stage_seconds_per_190k": round(stage.seconds * per_190k, 1),
        "stage_cpu_seconds_main": round(stage.main_cpu, 2),
        "stage_cpu_seconds_workers": round(stage.workers_cpu, 2),
        "stage_idle_estimate_seconds_per_190k": round(idle_estimate * per_190k, 1),
        "goal_ratio_deid_to_parse": 20,
        "goal_seconds_per_190k": 25,
    }


def bench_views(folder: Path, workers: int = 0) -> dict[str, Any]:
    """Every view in ``fhir/views/`` over the de-identified release of ``folder``: rows/s per
    view, against DuckDB's ``read_json`` of the same de-identified NDJSON (the floor), and all
    views together against the ingest stage on the same input."""
    from deid.policy import Policy
    from deid.release import deidentify_batch
    from fhirlake.viewdef import write_view_table
    from pipelines.views.tables import load_views, released_resources
    from vault import warehouse
    from vault.keys import FileKeyProvider

    with tempfile.TemporaryDirectory(prefix="ehr-bench-") as tmp:
        tmp_path = Path(tmp)
        key_file = tmp_path / "keys" / "keyring.json"
        init_keyring(key_file)
        provider = FileKeyProvider.load(key_file)
        db = tmp_path / "w.duckdb"
        started = time.perf_counter()
        ingest_batch(db, "bench", folder, provider, workers=workers)
        ingest_seconds = time.perf_counter() - started
        con = warehouse.connect(db)
        try:
            deidentify_batch(con, provider, "bench", Policy.shipped("research"))
            per_view: list[dict[str, Any]] = []
            for view in load_views():
                ndjson = tmp_path / f"{view.resource}.ndjson"
                if not ndjson.exists():
                    with ndjson.open("wb") as out:
                        for item in released_resources(con, view.resource):
                            out.write(orjson.dumps(item) + b"\n")
                t0 = time.perf_counter()
                read = con.execute(
                    "SELECT count(*) FROM read_json(?, format='newline_delimited', "
                    "maximum_object_size=67108864)",
                    [str(ndjson)],
                ).fetchone()
                floor = time.perf_counter() - t0
                t0 = time.perf_counter()
                rows = write_view_table(
                    con,
                    view,
                    released_resources(con, view.resource),
                    f"bench_{view.name}",
                    tmp_path / f"{view.name}.parquet",
                )
                seconds = time.perf_counter() - t0
                per_view.append(
                    {
                        "view": view.name,
                        "resources": int(read[0]) if read else 0,
                        "rows": rows,
                        "seconds": round(seconds, 3),
                        "rows_per_second": round(rows / seconds, 1) if seconds else None,
                        "read_json_seconds": round(floor, 3),
                        "ratio_to_read_json": round(seconds / floor, 1) if floor else None,
                    }
                )
        finally:
            con.close()
    views_seconds = sum(v["seconds"] for v in per_view)
    return {
        "views": per_view,
        "views_seconds": round(views_seconds, 2),
        "ingest_seconds": round(ingest_seconds, 2),
        "ratio_views_to_ingest": round(views_seconds / ingest_seconds, 3),
        "goal_ratio_views_to_ingest": 0.5,
    }
