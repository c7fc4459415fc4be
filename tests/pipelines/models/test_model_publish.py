"""A model's files are published as one set: a publish that fails or is killed at any point
leaves every file under ``models/readmission/`` as the previous publish left it, and the next
publish gives the whole new set.

The sets are compared with those of publishes never interrupted (a fit is deterministic: the
same frame and seed give the same bytes), not with what the publishing code thinks complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import pytest

from pipelines.models import training
from pipelines.models.storage import MODEL_DIR
from pipelines.models.training import (
    METRICS_FILE,
    MODEL_FILE,
    TRAINED_ON_ROWS_FILE,
    load_model,
    train_readmission_model,
)
from tests.pipelines.models.crafted import planted_frame

ROOT = Path(__file__).resolve().parents[3]
# two fits that differ in every file: other rows (so other trained_on.*) and another seed
VERSIONS = {"a": (3, 0), "b": (4, 1)}  # name: (seed of the frame, seed of the fit)
PATIENTS = 200


def _train(version: str, out_dir: Path) -> None:
    frame_seed, seed = VERSIONS[version]
    train_readmission_model(planted_frame(PATIENTS, seed=frame_seed), out_dir=out_dir, seed=seed)


def _digests(out_dir: Path) -> dict[str, str]:
    """The sha256 of every file a reader finds under ``out_dir``."""
    return {
        str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    }


def _versions(out_dir: Path) -> list[str]:
    """Hidden siblings of the model's folder (its current set, and any left behind)."""
    return sorted(e.name for e in out_dir.parent.iterdir() if e.name.startswith(f".{MODEL_DIR}-"))


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Each version's files as an uninterrupted publish into an empty folder writes them."""
    sets = {}
    for version in VERSIONS:
        out_dir = tmp_path_factory.mktemp(f"reference_{version}") / "models" / MODEL_DIR
        _train(version, out_dir)
        sets[version] = _digests(out_dir)
    assert set(sets["a"]) == set(sets["b"])
    assert all(sets["a"][name] != sets["b"][name] for name in sets["a"])
    return sets


def _after(write: Callable[..., Any], raise_when: Callable[..., bool] = lambda *a, **k: True):
    """``write``, which raises once it has written when ``raise_when`` holds for its arguments."""

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        result = write(*args, **kwargs)
        if raise_when(*args, **kwargs):
            raise RuntimeError("interrupted")
        return result

    return interrupted


def _interrupt(step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one step of a publish raise: after the model, the plots, the card, the first file of
    the training record, the whole record, or when the folder itself is replaced."""
    if step == "model":
        monkeypatch.setattr(joblib, "dump", _after(joblib.dump))
    elif step in ("plots", "card"):
        name = {"plots": "write_plots", "card": "write_model_card"}[step]
        monkeypatch.setattr(training, name, _after(getattr(training, name)))
    elif step == "record_rows":
        monkeypatch.setattr(
            training,
            "write_replacing",
            _after(training.write_replacing, lambda path, _: path.name == TRAINED_ON_ROWS_FILE),
        )
    elif step == "record":
        monkeypatch.setattr(training, "write_trained_on", _after(training.write_trained_on))
    elif step == "folder":
        replace = os.replace

        def refused(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(dst).name == MODEL_DIR:
                raise RuntimeError("interrupted")
            replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", refused)
    else:
        raise AssertionError(step)


STEPS = ["model", "plots", "card", "record_rows", "record", "folder"]


@pytest.mark.parametrize(
    ("step", "plain_folder"),
    [*[(step, False) for step in STEPS], ("model", True), ("folder", True)],
)
def test_interrupted_publish_leaves_the_previous_set(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    references: dict[str, dict[str, str]],
    step: str,
    plain_folder: bool,
) -> None:
    out_dir = tmp_path / "models" / MODEL_DIR
    if plain_folder:  # as every publish left the folder before sets were published whole
        _train("a", tmp_path / "elsewhere" / MODEL_DIR)
        shutil.copytree(tmp_path / "elsewhere" / MODEL_DIR, out_dir)
    else:
        _train("a", out_dir)
    before = _digests(out_dir)
    assert before == references["a"]

    with monkeypatch.context() as patched:
        _interrupt(step, patched)
        with pytest.raises(RuntimeError, match="interrupted"):
            _train("b", out_dir)
    assert _digests(out_dir) == before, step
    load_model(out_dir / MODEL_FILE)

    _train("b", out_dir)
    assert _digests(out_dir) == references["b"]
    # only the current set is kept: nothing of the interrupted publish or the previous set
    assert len(_versions(out_dir)) == 1
    assert out_dir.resolve().name == _versions(out_dir)[0]


CHILD = """
import sys, time
from pathlib import Path

sys.path.insert(0, {root!r})
import joblib

from pipelines.models import training
from tests.pipelines.models.crafted import planted_frame


def slow(name, write):
    def wrapped(*args, **kwargs):
        result = write(*args, **kwargs)
        print(name, flush=True)
        time.sleep(0.4)
        return result

    return wrapped


joblib.dump = slow("model", joblib.dump)
training.write_plots = slow("plots", training.write_plots)
training.write_model_card = slow("card", training.write_model_card)
training.write_trained_on = slow("record", training.write_trained_on)
frame = planted_frame({patients}, seed=int(sys.argv[2]))
print("fit", flush=True)
training.train_readmission_model(frame, out_dir=Path(sys.argv[1]), seed=int(sys.argv[3]))
print("published", flush=True)
time.sleep(60)
"""

# (the line the child prints, seconds after it): before any write, after each writer (while
# the child sleeps), at the end of the last sleep (the swap) and after the publish
KILL_POINTS = [
    ("fit", 0.2),
    ("model", 0.1),
    ("plots", 0.1),
    ("card", 0.1),
    ("record", 0.1),
    ("record", 0.4),
    ("record", 0.45),
    ("published", 0.0),
]


def _current(out_dir: Path, references: dict[str, dict[str, str]]) -> str:
    """The version whose whole set the files under ``out_dir`` are, checked the way a reader
    would use them: the model loads and metrics.json describes the fit of the same version."""
    state = _digests(out_dir)
    matches = [version for version, digests in references.items() if digests == state]
    assert matches, {
        name: [v for v, digests in references.items() if digests.get(name) == digest] or "other"
        for name, digest in state.items()
    }
    (version,) = matches
    model = joblib.load(out_dir / MODEL_FILE)
    metrics = json.loads((out_dir / METRICS_FILE).read_text())
    assert metrics["seed"] == VERSIONS[version][1]
    assert hasattr(model, "predict_proba")
    return version


def _publish_in_child(
    script: Path, out_dir: Path, version: str, marker: str = "published", delay: float = 0.0
) -> None:
    """Publish ``version`` to ``out_dir`` in a child process, killed (SIGKILL) ``delay`` seconds
    after it prints ``marker``."""
    frame_seed, seed = VERSIONS[version]
    child = subprocess.Popen(
        [sys.executable, str(script), str(out_dir), str(frame_seed), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == marker:
                break
        else:
            raise AssertionError(f"the child ended before printing {marker!r}")
        time.sleep(delay)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_killed_publish_leaves_one_whole_set(tmp_path: Path) -> None:
    script = tmp_path / "publish_child.py"
    script.write_text(CHILD.format(root=str(ROOT), patients=PATIENTS))
    # the sets of uninterrupted publishes by the same kind of process (a model pickled by
    # another process may differ in bytes that do not matter)
    references = {}
    for version in VERSIONS:
        reference = tmp_path / f"reference_{version}" / MODEL_DIR
        _publish_in_child(script, reference, version)
        references[version] = _digests(reference)
    assert all(references["a"][name] != references["b"][name] for name in references["a"])

    out_dir = tmp_path / "models" / MODEL_DIR
    _publish_in_child(script, out_dir, "a")
    seen: list[tuple[str, float, str]] = []
    for marker, delay in KILL_POINTS:
        target = "b" if _current(out_dir, references) == "a" else "a"
        _publish_in_child(script, out_dir, target, marker, delay)
        seen.append((marker, delay, _current(out_dir, references)))
    # the kills landed before and after the switch: both sets were seen
    assert {version for *_, version in seen} == {"a", "b"}, seen
    # the next publish gives the whole new set and removes what the kills left behind
    target = "b" if _current(out_dir, references) == "a" else "a"
    _publish_in_child(script, out_dir, target)
    assert _current(out_dir, references) == target
    assert len(_versions(out_dir)) == 1
