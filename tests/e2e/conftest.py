"""The `dagster dev` session the webserver and browser tests share (started once per session),
and the release's k for whole-pipeline runs.

These runs use cohorts of a few dozen patients: far too few for k = 5 over six
quasi-identifiers, so nearly all would be withheld and the k-anonymity check would (rightly)
block the release. The end-to-end tests are about the stages, so they run with k = 1; the
k-anonymity step has its own tests (tests/deid/test_kanon.py, tests/deid/test_release.py) and
the demo runs with the default k."""

from __future__ import annotations

import pytest
from dagster_ui import ui_release

from pipelines.assets.deid import K_ENV

__all__ = ["ui_release"]


@pytest.fixture(autouse=True)
def _small_cohort_k(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(K_ENV, "1")
