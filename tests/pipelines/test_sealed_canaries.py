"""The canaries a batch's run loads are kept sealed for the release run after it (a new run
process: nothing in memory), unless the key resource's ``seal_canaries`` is off."""

from __future__ import annotations

from pathlib import Path

import duckdb
import orjson
import pytest
from dagster import DagsterInstance, materialize

from deid.leakscan import CanarySet
from deid.release import release_canaries
from pipelines.assets.checks import RELEASE_CANARIES
from pipelines.definitions import batch_assets, build_resources, release_assets
from pipelines.resources import KeyProviderResource
from vault import warehouse
from vault.keys import KeyProvider


def _landing(tmp_path: Path) -> Path:
    batch = tmp_path / "landing" / "export-1"
    batch.mkdir(parents=True)
    patients = [
        {
            "resourceType": "Patient",
            "id": f"p{i}",
            "gender": "female",
            "name": [{"family": f"Tarrowby{i}"}],
        }
        for i in range(3)
    ]
    (batch / "data.ndjson").write_bytes(b"\n".join(orjson.dumps(p) for p in patients) + b"\n")
    return tmp_path / "landing"


@pytest.mark.parametrize("seal", [True, False])
def test_the_release_run_takes_the_canaries_its_batchs_run_sealed(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch, seal: bool
) -> None:
    loads: list[str] = []

    def counted(con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> CanarySet:
        loads.append("vault")
        return release_canaries(con, provider)

    monkeypatch.setattr(RELEASE_CANARIES, "_load", counted)
    landing = _landing(tmp_path)
    resources = build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1)
    resources["keys"] = KeyProviderResource(key_file=str(key_file), seal_canaries=seal)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("batches", ["export-1"])
    RELEASE_CANARIES.clear()
    assert materialize(
        batch_assets, partition_key="export-1", instance=instance, resources=resources
    ).success
    assert loads == ["vault"]
    RELEASE_CANARIES.clear()  # the release runs in a process of its own
    assert materialize(release_assets, instance=instance, resources=resources).success
    RELEASE_CANARIES.clear()
    assert loads == (["vault"] if seal else ["vault", "vault"])
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb", read_only=True)
    try:
        ((kept,),) = con.execute("SELECT count(*) FROM sealed_cache").fetchall()
    finally:
        con.close()
    assert kept == (1 if seal else 0)
