"""A regular (non-editable) install works outside the checkout: the wheel carries the
ViewDefinitions, value sets, policies and the Feast repo, and ``ehr generate`` + ``ehr run``
from another folder give the same counts as the editable install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _fresh_venv_with_wheel(tmp: Path) -> Path:
    """A new venv holding only the built wheel; its dependencies come from this interpreter's
    site-packages through a plain path entry, which does not run the editable install's hooks."""
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", REPO_ROOT, "-w", wheels], tmp, dict(os.environ))
    (wheel,) = wheels.glob("ehr_platform-*.whl")
    env_dir = tmp / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    fresh_python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([fresh_python, "-c", purelib], tmp, dict(os.environ)).strip())
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    install = [*pip, "--python", fresh_python, "install", "-q", "--no-deps", wheel]
    _run(install, tmp, dict(os.environ))
    return env_dir / "bin"


def _counts(summary: dict) -> dict:
    stages = summary["stages"]
    ingest = stages["ingest"]
    return {
        "ingest": {k: ingest[k] for k in ("records_in", "accepted", "quarantined")},
        "vault": (ingest["vault_resources_current"], ingest["vault_patients"]),
        "deid": stages["deid"].get("released"),
        "views": stages["views"],
        "features": stages["features"],
    }


def _generate_and_run(ehr: list[str | Path], folder: Path, env: dict[str, str]) -> dict:
    folder.mkdir()
    _run([*ehr, "generate", "--patients", "25", "--seed", "5", "--out", "landing/b"], folder, env)
    _run([*ehr, "run", "--input", "landing", "--workdir", "work", "--workers", "1"], folder, env)
    return json.loads((folder / "work" / "run_summary.json").read_text())


def test_the_wheel_runs_outside_the_checkout(tmp_path: Path, key_file: Path) -> None:
    bin_dir = _fresh_venv_with_wheel(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in {"DAGSTER_HOME", "PYTHONPATH"}}
    env["EHR_KEY_FILE"] = str(key_file)

    code = (
        "import pipelines, vault, deid, fhirlake; "
        "from pipelines.content import views_dir, feature_repo_dir; "
        "print(pipelines.__file__); print(len(list(views_dir().glob('*.json')))); "
        "print((feature_repo_dir() / 'feature_store.yaml').is_file())"
    )
    probe = _run([bin_dir / "python", "-c", code], tmp_path, env).split()
    assert not probe[0].startswith(str(REPO_ROOT)), "imported the checkout, not the wheel"
    assert int(probe[1]) == len(list((REPO_ROOT / "fhir" / "views").glob("*.json")))
    assert probe[2] == "True"

    from_wheel = _generate_and_run([bin_dir / "ehr"], tmp_path / "wheel_run", env)
    editable = _generate_and_run(
        [Path(sys.executable).parent / "ehr"], tmp_path / "editable_run", env
    )
    assert from_wheel["success"] and editable["success"]
    assert _counts(from_wheel) == _counts(editable)
    assert len(_counts(from_wheel)["views"]) == int(probe[1])
