"""Shared fixtures: throw-away key material and the third-party reference data."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
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


@pytest.fixture
def refuse_reading(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Callable[[], None]]:
    """Make a file one the process may not read; returns what makes it readable again.

    The file is chmod 000. Root with CAP_DAC_OVERRIDE (a container's usual root) reads it
    anyway, so when ``os.access`` says it is still readable, opening that one path raises
    PermissionError (EACCES), what the OS raises for a service user without read permission."""
    refused: set[str] = set()
    real_open = os.open

    def guarded_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) in refused:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def refuse(path: Path) -> Callable[[], None]:
        path.chmod(0)
        if os.access(path, os.R_OK):
            refused.add(os.fspath(path))
            monkeypatch.setattr(os, "open", guarded_open)

        def allow() -> None:
            path.chmod(0o644)
            refused.discard(os.fspath(path))

        return allow

    return refuse


@pytest.fixture
def refuse_listing(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make a folder one the process may not list (chmod 000; for root, which lists it anyway,
    ``os.listdir`` of that path raises EACCES, as it does for a service user); returns what
    makes it listable again."""
    refused: set[str] = set()
    changed: list[Path] = []
    real_listdir = os.listdir

    def guarded_listdir(path: Any = ".") -> list[str]:
        if os.fspath(path) in refused:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_listdir(path)

    def refuse(path: Path) -> Callable[[], None]:
        path.chmod(0)
        changed.append(path)
        if os.access(path, os.R_OK):
            refused.add(os.fspath(path))
            monkeypatch.setattr(os, "listdir", guarded_listdir)

        def allow() -> None:
            path.chmod(0o755)
            refused.discard(os.fspath(path))

        return allow

    yield refuse
    for path in changed:  # listable again, so that the temporary folder can be removed
        path.chmod(0o755)
