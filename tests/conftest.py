"""Shared fixtures: throw-away key material and the third-party reference data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vault.keys import FileKeyProvider, init_keyring

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``make test`` runs the suite on every core (``-n auto --dist loadgroup``): a module goes
    to one worker whole, so its module-scoped fixtures (a generated cohort, a built warehouse)
    are made once, and the modules marked with one ``xdist_group`` go to one worker together
    (the `dagster dev` session fixture starts once)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModulesAndGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = super()._split_scope(nodeid)
            return group if group != nodeid else nodeid.split("::", 1)[0]

    return ModulesAndGroups(config, log)


@pytest.fixture(autouse=True)
def _runs_stay_in_the_workdir(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make test` exports the repository's DAGSTER_HOME (for `make ui`); runs made by tests
    go to each test's own work directory instead (see pipelines.run.open_instance)."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh keyring outside the repository, selected through EHR_KEY_FILE."""
    path = tmp_path / "keys" / "keyring.json"
    init_keyring(path)
    monkeypatch.setenv("EHR_KEY_FILE", str(path))
    monkeypatch.delenv("EHR_KEK", raising=False)
    monkeypatch.delenv("EHR_PSEUDONYM_KEY", raising=False)
    return path


@pytest.fixture
def key_provider(key_file: Path) -> FileKeyProvider:
    return FileKeyProvider.load(key_file)
