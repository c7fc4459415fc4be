"""What a process that loads the platform imports: Feast's classes without typeguard's
instrumentation (Feast's own command still loads them with it; every other use of typeguard
keeps it), and no scikit-learn, joblib or pyplot until a model is fitted, saved, loaded or
drawn; and what the definitions load is left out of garbage collections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typeguard

from pipelines.feast_import import skip_for_feast

REPO_ROOT = Path(__file__).resolve().parents[2]

# a Feast definition built with an argument of the wrong type (a name that is not a string)
_WRONG_FIELD = """
import typeguard
from feast import Field
from feast.types import Int64
try:
    Field(name=123, dtype=Int64)
except typeguard.TypeCheckError:
    print("checked")
else:
    print("unchecked")
"""


def _last_line(code: str) -> str:
    """The last line ``code`` prints in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def test_feast_alone_is_instrumented_and_within_the_platform_is_not() -> None:
    # Feast imported first, as `feast apply` (its own command, in a child process) does
    assert _last_line(_WRONG_FIELD) == "checked"
    # the platform imported first, as in a Dagster run worker or an `ehr` command
    assert _last_line("import pipelines\n" + _WRONG_FIELD) == "unchecked"


_LOADED_BY_DEFINITIONS = """
import sys
import pipelines.definitions
from pipelines.models import evaluation, retrain, training
print(sorted(m for m in ("sklearn", "joblib", "matplotlib.pyplot") if m in sys.modules))
"""


def test_loading_the_definitions_imports_no_model_library() -> None:
    assert _last_line(_LOADED_BY_DEFINITIONS) == "[]"


def test_other_uses_of_typeguard_keep_their_checks() -> None:
    assert skip_for_feast()  # already done when `pipelines` was imported; idempotent
    first = typeguard.typechecked
    assert skip_for_feast() and typeguard.typechecked is first

    @typeguard.typechecked
    def double(value: int) -> int:
        return value * 2

    assert double(2) == 4
    with pytest.raises(typeguard.TypeCheckError):
        double("2")  # type: ignore[arg-type]

    @typeguard.typechecked()
    def halve(value: int) -> int:
        return value // 2

    with pytest.raises(typeguard.TypeCheckError):
        halve("4")  # type: ignore[arg-type]


_COLLECTED_AFTER_LOADING = """
import gc
import pipelines.definitions
frozen = gc.get_freeze_count()
cycle = []
cycle.append(cycle)
del cycle
print(frozen, gc.collect())
"""


def test_what_the_definitions_load_is_left_out_of_collections() -> None:
    frozen, collected = map(int, _last_line(_COLLECTED_AFTER_LOADING).split())
    # the libraries' and the definitions' objects: never walked again
    assert frozen > 100_000
    # a cycle made after loading is still found and freed
    assert collected >= 1
