"""Pipeline tests run whole stages over cohorts of a few dozen patients: far too few for the
release's k (5) over six quasi-identifiers, so nearly all of them would be withheld and the
k-anonymity check would (rightly) block the release. These tests are about the stages, not
about k: they run with k = 1. The k-anonymity step has its own tests (tests/deid/test_kanon.py,
tests/deid/test_release.py)."""

from __future__ import annotations

import pytest

from pipelines.assets.deid import K_ENV


@pytest.fixture(autouse=True)
def _small_cohort_k(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(K_ENV, "1")
