"""Pipeline tests run whole stages over cohorts of a few dozen patients: far too few for the
release's k (5) over six quasi-identifiers, so nearly all of them would be withheld and the
k-anonymity check would (rightly) block the release. These tests are about the stages, not
about k: they run with k = 1. The k-anonymity step has its own tests (tests/deid/test_kanon.py,
tests/deid/test_release.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, materialize

from pipelines.assets.deid import K_ENV
from pipelines.definitions import batch_assets, build_resources


@pytest.fixture(autouse=True)
def _small_cohort_k(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(K_ENV, "1")


@pytest.fixture
def materialize_batch(tmp_path: Path, key_file: Path) -> Callable[..., Any]:
    """Run the batch assets of one landing folder's batch (work directory ``tmp_path/work``,
    one ingest worker) on ``instance``, an ephemeral one by default; the result (a failed step
    raises, unless ``raise_on_error`` is false)."""

    def run(
        landing: Path,
        key: str,
        instance: DagsterInstance | None = None,
        raise_on_error: bool = True,
    ) -> Any:
        instance = instance or DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("batches", [key])
        resources = build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1)
        return materialize(
            batch_assets,
            partition_key=key,
            instance=instance,
            resources=resources,
            raise_on_error=raise_on_error,
        )

    return run
