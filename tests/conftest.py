"""Shared fixtures: throw-away key material and the third-party reference data."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
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


class _Refusing:
    """Paths made ones the process may not use: chmod 000, and, as root with
    CAP_DAC_OVERRIDE (a container's usual root) uses them anyway, ``os.<function>`` of those
    paths raising PermissionError (EACCES), what the OS raises for a service user. Each
    refusal returns what undoes it; ``restore`` undoes them all."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, function: str, mode: int) -> None:
        self._monkeypatch, self._function, self._mode = monkeypatch, function, mode
        self._real = getattr(os, function)
        self._refused: set[str] = set()
        self._changed: list[Path] = []

    def _guarded(self, path: Any = ".", *args: Any, **kwargs: Any) -> Any:
        if os.fspath(path) in self._refused:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return self._real(path, *args, **kwargs)

    def __call__(self, path: Path) -> Callable[[], None]:
        path.chmod(0)
        self._changed.append(path)
        if os.access(path, os.R_OK):
            self._refused.add(os.fspath(path))
            self._monkeypatch.setattr(os, self._function, self._guarded)

        def allow() -> None:
            path.chmod(self._mode)
            self._refused.discard(os.fspath(path))

        return allow

    def restore(self) -> None:
        for path in self._changed:
            path.chmod(self._mode)


@pytest.fixture
def refuse_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[Path], Callable[[], None]]]:
    """Make a file one the process may not read (``os.open``); returns what makes it readable
    again."""
    refusing = _Refusing(monkeypatch, "open", 0o644)
    yield refusing
    refusing.restore()


@pytest.fixture
def refuse_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[Path], Callable[[], None]]]:
    """Make a folder one the process may not list (``os.listdir``); returns what makes it
    listable again. Every folder is listable again afterwards, so that the temporary folder can
    be removed."""
    refusing = _Refusing(monkeypatch, "listdir", 0o755)
    yield refusing
    refusing.restore()
