"""Loaded by the Python processes of a crash test (this folder first on their PYTHONPATH): SIGKILL
the process group at a named point of the platform's code, given as ``EHR_KILL_AT=point``, the
first time the point is reached, and write ``point`` to ``EHR_KILL_MARK`` just before (so the test
knows the kill landed there). The points wrap functions when their module is first imported:

- ``view_parquet_replaced``: a view's or table's new Parquet file renamed into place by an in-place
  publish (``pipelines.publish``), its DuckDB transaction not yet committed;
- ``features_computed``: the changed patients' feature rows computed, nothing of them published;
- ``online_rows_written``: the first feature view's changed rows written to the online store, the
  other views and the snapshot not;
- ``registry_temporary_written``: Feast's file registry's new bytes written to the temporary file
  beside it (``pipelines.features.registry_store.replace_registry_file``) and not yet renamed over
  it, in the run's own process (a materialisation recording its interval), not in the ``feast
  apply`` child;
- ``sealed_canaries_written``: the release canaries sealed and committed in the warehouse by a
  batch's de-identification (``vault.sealed_cache.write_entry``), the batch's scan not yet run;
- ``sealed_canaries_uncommitted``: the same write with the entry's parts deleted and inserted in
  its transaction, the transaction not yet committed (the cursor ``write_entry`` takes from its
  connection is wrapped, only when this point is named, so that its ``commit()`` kills first).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import signal
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

_POINT = os.environ.get("EHR_KILL_AT", "")
_MARK = os.environ.get("EHR_KILL_MARK", "")


def _reached(point: str) -> None:
    if point == _POINT:
        with open(_MARK, "w") as mark:
            mark.write(point)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def _after(module: types.ModuleType, name: str, point: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _reached(point)
        return result

    setattr(module, name, wrapper)


class _Forwarding:
    """Forwards every attribute but those defined on it to ``inner`` (a DuckDB connection or
    cursor, whose methods cannot be replaced on the object itself)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _KillingCursor(_Forwarding):
    def commit(self) -> Any:
        _reached("sealed_canaries_uncommitted")
        return self._inner.commit()


class _KillingConnection(_Forwarding):
    def cursor(self) -> _KillingCursor:
        return _KillingCursor(self._inner.cursor())


def _sealed_cache(module: types.ModuleType) -> None:
    if _POINT == "sealed_canaries_uncommitted":  # other points keep the real cursor
        original = module.write_entry

        @functools.wraps(original)
        def write_entry(con: Any, *args: Any, **kwargs: Any) -> Any:
            return original(_KillingConnection(con), *args, **kwargs)

        setattr(module, "write_entry", write_entry)
    _after(module, "write_entry", "sealed_canaries_written")


def _publish(module: types.ModuleType) -> None:
    real = module.os

    class _Os(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    def replace(source: Any, target: Any) -> None:
        real.replace(source, target)
        if str(target).endswith(".parquet"):
            _reached("view_parquet_replaced")

    proxy = _Os("os")
    proxy.replace = replace  # type: ignore[attr-defined]
    module.os = proxy  # type: ignore[attr-defined]


def _registry(module: types.ModuleType) -> None:
    original = module.replace_registry_file

    @functools.wraps(original)
    def replace(path: Any, data: bytes) -> None:
        if _POINT == "registry_temporary_written" and sys.argv[:1] != ["-c"]:  # not the CLI child
            from pipelines.publish import new_temporary

            new_temporary(Path(path)).write_bytes(data)
            _reached("registry_temporary_written")
        original(path, data)

    setattr(module, "replace_registry_file", replace)


_PATCHES: dict[str, Callable[[types.ModuleType], None]] = {
    "pipelines.publish": _publish,
    "pipelines.features.refresh": lambda m: _after(
        m, "_compute_changed_patients", "features_computed"
    ),
    "pipelines.features.online_sync": lambda m: _after(m, "_write_rows", "online_rows_written"),
    "pipelines.features.registry_store": _registry,
    "vault.sealed_cache": _sealed_cache,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, patch: Callable[[types.ModuleType], None]) -> None:
        self.inner, self.patch = inner, patch

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None:
            spec.loader = _Loader(spec.loader, _PATCHES[name])
        return spec


if _POINT and _MARK:
    sys.meta_path.insert(0, _Finder())
