"""Bad input through the Dagster assets: the batch succeeds, every record reconciles, and no
input value reaches a Dagster event (metadata, logs, check results)."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from dagster import DagsterInstance
from dagster._serdes import serialize_value

from pipelines.assets.ingest import reconcile_check
from vault.ingest import IngestReport, Reconciliation
from vault.landing import batch_key

MARK = "Qz9DagsterMarker"


def _landing(tmp_path: Path) -> tuple[Path, str]:
    landing = tmp_path / "landing"
    name = f"export {MARK}"  # a folder name is input too
    batch = landing / name
    batch.mkdir(parents=True)
    lines = [
        {"resourceType": "Patient", "id": "p1", "birthDate": "0001-01-01"},
        {
            "resourceType": "Patient",
            "id": "p2",
            "contained": [{"resourceType": MARK, "id": "c", "name": MARK}],
        },
        {
            "resourceType": "Encounter",
            "id": "e1",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": "Patient/p1"},
            "period": {"start": "9999-12-31T23:59:59Z"},
        },
        {"resourceType": "Observation", "id": "o1", "status": MARK * 1000},
    ]
    (batch / "data.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in lines) + b"\n")
    (batch / "more.ndjson.gz").write_bytes(
        gzip.compress(b"\n".join(orjson.dumps(r) for r in lines))[:30]
    )
    (batch / "bad.json").write_bytes(b"\xff" + MARK.encode())
    (batch / "link.ndjson").symlink_to(batch / "data.ndjson")
    return landing, batch_key(name)


def test_bad_batch_succeeds_and_leaks_nothing_to_dagster(
    tmp_path: Path, materialize_batch: Callable[..., Any]
) -> None:
    landing, key = _landing(tmp_path)
    assert key != f"export {MARK}" and key.startswith("export-")  # a safe key with a digest
    instance = DagsterInstance.ephemeral()
    result = materialize_batch(landing, key, instance)
    assert result.success
    by_key = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("ingest")
    }
    assert by_key["phi_vault"]["records_in"].value == 6  # 4 lines, 1 cut gzip, 1 bad JSON
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["records_reconcile"] is True
    logs = instance.all_logs(result.run_id)
    text = serialize_value(list(logs)) + serialize_value(list(result.all_events))
    # the batch key carries the folder name's safe characters: look for the values only
    assert key in text and text.replace(key, "").count(MARK) == 0


def test_reconcile_check_compares_the_count_taken_while_reading() -> None:
    rec = Reconciliation("b", 3, 3, 2, 1, 1, 2, 0)
    assert rec.passed
    report = IngestReport("b", records_in=3, accepted=2, quarantined=1)
    assert reconcile_check(report, rec).passed
    short = IngestReport("b", records_in=4, accepted=2, quarantined=1)
    result = reconcile_check(short, rec)
    assert not result.passed and result.metadata["records_in_while_reading"].value == 4
