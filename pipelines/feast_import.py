"""Feast, loaded without typeguard's instrumentation in the platform's own processes.

Feast decorates its definition classes (``Field``, ``Entity``, ``FeatureView``, ``FileSource``,
``FeatureService``, ...) with typeguard's ``@typechecked``. When a class is decorated, typeguard
fetches and parses the source of its module and recompiles each annotated method with type
checks injected: about 6 of the 7.4 to 8.6 seconds ``import feast`` took where it was measured
(README, "Start-up"), paid by every process that loads the platform (each Dagster run worker
and code server, each ``ehr`` command), and a type check on each call after that. typeguard
makes the decorator a no-op under ``python -O``; :func:`skip_for_feast` does the same for
Feast's own classes and functions only, before Feast is imported, and leaves every other use of
typeguard as it is.

What is given up: a Feast definition built with an argument of the wrong type no longer raises
at construction in these processes. The feature repository is checked where it is authored:
``feast apply`` runs as Feast's own command in a child process
(:mod:`pipelines.features.feast_store`), with typeguard as Feast ships it.
"""

from __future__ import annotations

import functools
from typing import Any

_FEAST_PACKAGE = "feast"
_MARK = "_skips_feast"


def _belongs_to_feast(target: object) -> bool:
    module = getattr(target, "__module__", None) or ""
    return module == _FEAST_PACKAGE or module.startswith(_FEAST_PACKAGE + ".")


def skip_for_feast() -> bool:
    """Make ``typeguard.typechecked`` leave Feast's classes and functions undecorated; True
    when it does (typeguard present and Feast not imported yet: classes already decorated
    stay as they are). Idempotent."""
    try:
        import typeguard
    except ImportError:  # Feast without typeguard: nothing to skip
        return False
    original = typeguard.typechecked
    if getattr(original, _MARK, False):
        return True

    def typechecked(target: Any = None, **options: Any) -> Any:
        if target is None:  # used as @typechecked(...): options first, the target later
            return functools.partial(typechecked, **options)
        if _belongs_to_feast(target):
            return target
        return original(target, **options)

    setattr(typechecked, _MARK, True)  # a marker on the function object
    typeguard.typechecked = typechecked
    return True
