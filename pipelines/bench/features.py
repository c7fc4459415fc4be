"""``ehr bench features``: the feature store's costs, printed (never asserted).

On synthetic ``views.*`` tables (made in DuckDB SQL, no FHIR run needed) it builds the feature
tables and applies the Feast repo in a temporary folder, then measures:

- the cost of the change-point rows: the feature tables built with them against the same
  tables with rows at events only (goal: at most 2x the time);
- a training set of N entity rows through Feast ``get_historical_features`` (the
  ``readmission_v2`` service) against a hand-written DuckDB ASOF JOIN over the same Parquet
  files with the same TTLs (goal: at most 4x; and how many values agree);
- ``get_online_features`` latency p50/p99 for batches of 1 and 10 patients, through the SDK and
  through ``feast serve`` over HTTP (a child process on a free loopback port);
- materialisation time per 100,000 feature rows in the materialised range.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from pipelines.features.feast_store import (
    apply_repo,
    feast_env,
    feature_store,
    materialize_latest,
    resolve_repo,
)
from pipelines.features.tables import build_feature_tables_report
from vault.keys import without_key_material

SERVICE = "readmission_v2"
AGREEMENT_COLUMNS = ("hba1c_latest", "encounters_30d", "age_years", "charlson_index")


def synthetic_views(con: duckdb.DuckDBPyConnection, patients: int, seed: int = 7) -> None:
    """``views.*`` tables for ``patients`` patients over 2020-2024: ~20 encounters each (70 %
    ambulatory, 20 % emergency, 10 % inpatient), labs and vitals at each, a few conditions and
    prescriptions, and 3 % research opt-outs. Every time has a time of day, so each ``*_latest``
    column (the latest instant a value stands for) is the time itself."""
    con.execute("CREATE SCHEMA IF NOT EXISTS views")
    con.execute(f"SELECT setseed({(seed % 1000) / 1000})")
    con.execute(
        f"""
        CREATE OR REPLACE TABLE views.patient AS
        SELECT md5(i::VARCHAR) AS id,
            CASE WHEN i % 2 = 0 THEN 'female' ELSE 'male' END AS gender,
            DATE '1925-01-01' + (hash(i) % 30000)::INT AS birth_date,
            false AS deceased, NULL::TIMESTAMPTZ AS deceased_date_time,
            ['2106-3', '2054-5', '2028-9', '2131-1'][1 + (i % 4)::INT] AS race_code,
            NULL::VARCHAR AS race_display,
            CASE WHEN i % 7 = 0 THEN '2135-2' ELSE '2186-5' END AS ethnicity_code,
            NULL::VARCHAR AS ethnicity_display, 'MA' AS state
        FROM range({patients}) t(i)
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE views.consent AS
        SELECT 'k' || id AS id, id AS patient_id, 'active' AS status, 'research' AS scope_code,
            NULL::VARCHAR AS category_code,
            CASE WHEN random() < 0.03 THEN 'OPTOUT' ELSE 'OPTIN' END AS policy_rule_code,
            NULL::VARCHAR AS provision_type, NULL::TIMESTAMPTZ AS date_time
        FROM views.patient
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE views.encounter AS
        WITH e AS (
            SELECT p.id AS patient_id, n, random() AS r,
                TIMESTAMPTZ '2020-01-01 00:00:00+00' + to_days((random() * 1825)::INT) AS start
            FROM views.patient p, range(20) t(n)
        )
        SELECT md5(patient_id || n) AS id, patient_id, NULL::VARCHAR AS part_of_id,
            'finished' AS status,
            CASE WHEN r < 0.7 THEN 'AMB' WHEN r < 0.9 THEN 'EMER' ELSE 'IMP' END AS class_code,
            NULL::VARCHAR AS type_system, NULL::VARCHAR AS type_code,
            NULL::VARCHAR AS type_display, start AS period_start,
            start + to_days(CASE WHEN r >= 0.9 THEN 1 + (r * 100)::INT % 9 ELSE 0 END)
                AS period_end,
            start AS period_start_latest,
            start + to_days(CASE WHEN r >= 0.9 THEN 1 + (r * 100)::INT % 9 ELSE 0 END)
                AS period_end_latest,
            NULL::VARCHAR AS discharge_disposition_code
        FROM e
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE views.observation AS
        WITH m AS (
            SELECT * FROM (VALUES ('4548-4', NULL, 5.0, 4.0), ('2339-0', NULL, 80.0, 90.0),
                ('85354-9', '8480-6', 110.0, 50.0), ('85354-9', '8462-4', 65.0, 30.0),
                ('8867-4', NULL, 55.0, 40.0), ('39156-5', NULL, 20.0, 15.0))
                v(code, component_code, lo, span)
        )
        SELECT md5(e.id || m.code) AS id, e.patient_id, e.id AS encounter_id, 'final' AS status,
            NULL::VARCHAR AS category_code, 'http://loinc.org' AS code_system, m.code,
            NULL::VARCHAR AS code_display, m.component_code,
            round(m.lo + random() * m.span, 1) AS value_quantity, NULL::VARCHAR AS value_unit,
            NULL::VARCHAR AS value_code, NULL::VARCHAR AS value_string,
            e.period_start AS effective_date_time,
            e.period_start AS effective_date_time_latest, e.period_start AS issued
        FROM views.encounter e, m
        WHERE random() < 0.5
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE views.condition AS
        WITH c AS (
            SELECT * FROM (VALUES ('http://hl7.org/fhir/sid/icd-10-cm', 'E11.9'),
                ('http://snomed.info/sct', '38341003'), ('http://hl7.org/fhir/sid/icd-10-cm',
                'I50.9'), ('http://snomed.info/sct', '13645005'),
                ('http://hl7.org/fhir/sid/icd-10-cm', 'N18.30'),
                ('http://hl7.org/fhir/sid/icd-10-cm', 'C34.90'),
                ('http://hl7.org/fhir/sid/icd-10-cm', 'J02.9')) v(code_system, code)
        )
        SELECT md5(e.id || c.code) AS id, e.patient_id, e.id AS encounter_id,
            'active' AS clinical_status, 'confirmed' AS verification_status,
            NULL::VARCHAR AS category_code, e.period_start AS onset_date_time,
            e.period_start AS onset_date_time_latest, e.period_start AS onset_end_date_time,
            NULL::TIMESTAMPTZ AS abatement_date_time, e.period_start AS recorded_date,
            e.period_start AS recorded_date_latest,
            c.code_system, c.code, NULL::VARCHAR AS code_display
        FROM views.encounter e, c
        WHERE random() < 0.02
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE views.medication_request AS
        WITH d AS (
            SELECT * FROM (VALUES ('860975'), ('311041'), ('314076'), ('617312'), ('855332'),
                ('312940'), ('308182'), ('243670')) v(code)
        )
        SELECT md5(e.id || d.code) AS id, e.patient_id, e.id AS encounter_id,
            CASE WHEN random() < 0.5 THEN 'active' ELSE 'completed' END AS status,
            'order' AS intent, e.period_start AS authored_on,
            e.period_start AS authored_on_latest,
            'http://www.nlm.nih.gov/research/umls/rxnorm' AS medication_system,
            d.code AS medication_code, NULL::VARCHAR AS medication_display
        FROM views.encounter e, d
        WHERE random() < 0.04
        """
    )


def entity_frame(con: duckdb.DuckDBPyConnection, rows: int, seed: int = 11) -> pd.DataFrame:
    """``rows`` (patient_id, event_timestamp) pairs: random patients at random times."""
    ids = [p for (p,) in con.execute("SELECT id FROM views.patient ORDER BY id").fetchall()]
    rng = random.Random(seed)
    start = datetime(2020, 6, 1, tzinfo=UTC)
    return pd.DataFrame(
        {
            "patient_id": [rng.choice(ids) for _ in range(rows)],
            "event_timestamp": [
                start + timedelta(seconds=rng.randrange(4 * 365 * 86400)) for _ in range(rows)
            ],
        }
    )


def asof_training_set(
    entities: pd.DataFrame, features_dir: Path, views: list[tuple[str, list[str], timedelta]]
) -> pd.DataFrame:
    """The same point-in-time join by hand: per feature view, the latest row at or before each
    entity timestamp (ASOF JOIN), nulled when older than the view's TTL."""
    con = duckdb.connect()
    try:
        con.register("entity_df", entities)
        selects = ["e.patient_id", "e.event_timestamp"]
        joins = []
        for i, (name, columns, ttl) in enumerate(views):
            path = features_dir / f"{name}.parquet"
            alias = f"f{i}"
            fresh = (
                f"{alias}.event_timestamp >= e.event_timestamp - "
                f"INTERVAL {int(ttl.total_seconds())} SECONDS"
            )
            selects += [f"CASE WHEN {fresh} THEN {alias}.{c} END AS {c}" for c in columns]
            joins.append(
                f"ASOF LEFT JOIN read_parquet('{path}') {alias} ON {alias}.patient_id = "
                f"e.patient_id AND e.event_timestamp >= {alias}.event_timestamp"
            )
        sql = f"SELECT {', '.join(selects)} FROM entity_df e {' '.join(joins)}"
        return con.execute(sql).df()
    finally:
        con.close()


def change_point_cost(
    con: duckdb.DuckDBPyConnection,
    events_dir: Path,
    features_dir: Path,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Build the feature tables with rows at events only, then with every change point (window
    edges, birthdays); print and return both times, row counts and their ratio."""
    baseline = build_feature_tables_report(con, events_dir, edges=False)
    full = build_feature_tables_report(con, features_dir)
    out = {
        "events_only_rows": sum(baseline.rows.values()),
        "events_only_build_s": baseline.seconds,
        "feature_rows": sum(full.rows.values()),
        "feature_build_s": full.seconds,
        "change_point_ratio": full.seconds / max(baseline.seconds, 1e-9),
    }
    echo(
        f"feature tables: {out['feature_rows']:,} rows (events only: "
        f"{out['events_only_rows']:,}) built in {full.seconds:.2f}s (events only: "
        f"{baseline.seconds:.2f}s), change points cost {out['change_point_ratio']:.2f}x "
        "(goal <= 2x)"
    )
    return out


def training_set_comparison(
    store: Any,
    service: Any,
    entities: pd.DataFrame,
    features_dir: Path,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Time the Feast training set against the hand-written ASOF join and count how often four
    features agree; print and return the numbers."""
    results: dict[str, Any] = {}
    entity_rows = len(entities)
    t0 = time.perf_counter()
    feast_df = store.get_historical_features(entity_df=entities, features=service).to_df()
    results["feast_training_s"] = time.perf_counter() - t0
    views = []
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        views.append((view.name, [f.name for f in projection.features], view.ttl or timedelta(0)))
    t0 = time.perf_counter()
    asof_df = asof_training_set(entities, features_dir, views)
    results["asof_training_s"] = time.perf_counter() - t0
    ratio = results["feast_training_s"] / max(results["asof_training_s"], 1e-9)
    results["training_ratio"] = ratio
    key = ["patient_id", "event_timestamp"]
    merged = feast_df.merge(asof_df, on=key, suffixes=("", "_asof"))
    for column in AGREEMENT_COLUMNS:
        agree = (
            (merged[column] == merged[f"{column}_asof"])
            | (merged[column].isna() & merged[f"{column}_asof"].isna())
        ).mean()
        results[f"asof_agreement_{column}"] = float(agree)
    results["asof_agreement_hba1c"] = results["asof_agreement_hba1c_latest"]
    agreement = min(results[f"asof_agreement_{c}"] for c in AGREEMENT_COLUMNS)
    echo(
        f"training set, {entity_rows:,} entity rows: Feast {results['feast_training_s']:.2f}s, "
        f"DuckDB ASOF JOIN {results['asof_training_s']:.2f}s, ratio {ratio:.1f}x "
        f"(goal <= 4x; {', '.join(AGREEMENT_COLUMNS)} agree on >= {agreement:.1%} of rows)"
    )
    return results


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return p50 * 1000, p99 * 1000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_server(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"feast serve exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("feast serve did not answer /health in time")


def http_online_latencies(
    repo: Path, env: dict[str, str], batches: dict[int, list[list[str]]], timeout: float = 120
) -> dict[int, tuple[float, float]]:
    """p50/p99 (ms) of POST /get-online-features per batch size, against ``feast serve`` run as
    a child process on a free loopback port (stopped, by its own pid, afterwards)."""
    port = _free_port()
    command = [
        sys.executable, "-c", "from feast.cli.cli import cli; cli()",
        "serve", "-h", "127.0.0.1", "-p", str(port), "--workers", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=repo,
        env={**without_key_material(os.environ), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_server(port, process, timeout)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        results: dict[int, tuple[float, float]] = {}
        for size, requests in batches.items():
            samples = []
            for ids in requests:
                body = json.dumps({"feature_service": SERVICE, "entities": {"patient_id": ids}})
                t0 = time.perf_counter()
                conn.request(
                    "POST", "/get-online-features", body, {"Content-Type": "application/json"}
                )
                response = conn.getresponse()
                response.read()
                samples.append(time.perf_counter() - t0)
                if response.status != 200:
                    raise RuntimeError(f"feast serve answered {response.status}")
            results[size] = _percentiles(samples)
        conn.close()
        return results
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def bench_features(
    entity_rows: int = 100_000,
    patients: int = 10_000,
    online_requests: int = 200,
    http: bool = True,
    workdir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmark (see the module doc) and print each number; returns them too."""
    own_tmp = workdir is None
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ehr-bench-features-"))
    results: dict[str, Any] = {"entity_rows": entity_rows, "patients": patients}
    saved_env = {k: os.environ.get(k) for k in ("EHR_FEAST_DATA", "EHR_FEATURES_DIR")}
    try:
        features_dir, data_dir = root / "features", root / "feast"
        con = duckdb.connect(str(root / "bench.duckdb"))
        synthetic_views(con, patients)
        results.update(change_point_cost(con, root / "events_only", features_dir, echo))
        feature_rows = results["feature_rows"]
        entities = entity_frame(con, entity_rows)
        con.close()

        repo = resolve_repo(None)
        apply_repo(repo, data_dir, features_dir)
        store = feature_store(repo, data_dir, features_dir)
        service = store.get_feature_service(SERVICE)

        results.update(training_set_comparison(store, service, entities, features_dir, echo))

        # materialisation: the latest row per patient and view, as the platform does
        t0 = time.perf_counter()
        materialize_latest(store)
        seconds = time.perf_counter() - t0
        results["materialize_s"] = seconds
        results["materialize_s_per_100k_rows"] = seconds / max(feature_rows, 1) * 100_000
        echo(
            f"materialize {feature_rows:,} feature rows: {seconds:.2f}s, "
            f"{results['materialize_s_per_100k_rows']:.2f}s per 100,000 rows"
        )

        ids = list(entities["patient_id"].unique())
        rng = random.Random(3)
        batches = {
            size: [rng.sample(ids, size) for _ in range(online_requests)] for size in (1, 10)
        }
        for size, requests in batches.items():
            samples = []
            for batch in requests:
                t0 = time.perf_counter()
                store.get_online_features(
                    features=service, entity_rows=[{"patient_id": p} for p in batch]
                ).to_dict()
                samples.append(time.perf_counter() - t0)
            p50, p99 = _percentiles(samples)
            results[f"online_sdk_b{size}_ms"] = (p50, p99)
            echo(f"online SDK, batch {size}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        if http:
            served = http_online_latencies(repo, feast_env(data_dir, features_dir), batches)
            for size, (p50, p99) in served.items():
                results[f"online_http_b{size}_ms"] = (p50, p99)
                echo(f"online HTTP (feast serve), batch {size}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        return results
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
