"""`dagster dev` as a data engineer runs it: a free loopback port, a temporary DAGSTER_HOME with
the repository's instance settings, a landing folder and a work directory of its own.

The ``ui_release`` fixture (session scope, shared by the webserver and the browser tests) turns
the landing sensor on over GraphQL, drops a generated batch and waits, bounded, until the batch
run and the automatic release refresh have succeeded."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from vault.keys import init_keyring

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCATION = "ehr_platform"
REPOSITORY = "__repository__"
PATIENTS = 25
SEED = 5
BATCH = "clinic-a"
START_TIMEOUT = 120
RELEASE_TIMEOUT = 300


@dataclass
class DagsterUI:
    url: str
    home: Path
    workdir: Path
    landing: Path
    key_file: Path
    log: Path
    batch_run: dict[str, Any] | None = None
    release_run: dict[str, Any] | None = None
    seconds_to_release: float = 0.0
    reference: subprocess.Popen[bytes] | None = None  # `ehr run` of the same input
    process_group: int = 0  # of `dagster dev` and everything it started

    @property
    def reference_workdir(self) -> Path:
        return self.home.parent / "ehr_run_work"

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return dict(body["data"])

    def repository(self, fields: str) -> dict[str, Any]:
        query = (
            "query($l: String!, $r: String!) { repositoryOrError(repositorySelector: "
            "{repositoryLocationName: $l, repositoryName: $r}) { __typename ... on Repository { "
            + fields
            + " } ... on PythonError { message } } }"
        )
        repo = self.graphql(query, {"l": LOCATION, "r": REPOSITORY})["repositoryOrError"]
        assert repo["__typename"] == "Repository", repo
        return dict(repo)

    def runs(self) -> list[dict[str, Any]]:
        data = self.graphql(
            "{ runsOrError { ... on Runs { results { runId status jobName startTime endTime "
            "tags { key value } } } } }"
        )
        return list(data["runsOrError"]["results"])

    def start_sensor(self, name: str) -> str:
        data = self.graphql(
            "mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename "
            "... on Sensor { sensorState { status } } ... on PythonError { message } } }",
            {
                "s": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": REPOSITORY,
                    "sensorName": name,
                }
            },
        )
        return str(data["startSensor"]["sensorState"]["status"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ui_env(home: Path, workdir: Path, landing: Path, key_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EHR_KEK", "EHR_PSEUDONYM_KEY")}
    env.update(
        DAGSTER_HOME=str(home),
        EHR_WORKDIR=str(workdir),
        EHR_LANDING=str(landing),
        EHR_KEY_FILE=str(key_file),
        PYTHONWARNINGS="ignore",
        # a 25-patient batch cannot be 5-anonymous without withholding most of it
        EHR_DEID_K="1",
    )
    return env


def wait_until_up(ui: DagsterUI, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, ui.log.read_text(errors="replace")[-3000:]
        try:
            ui.repository("name")
            return
        except (requests.RequestException, AssertionError, KeyError, TypeError):
            time.sleep(2)
    raise AssertionError(f"dagster dev did not load in {START_TIMEOUT}s: {ui.log}")


def drop_batch(ui: DagsterUI, tmp: Path) -> None:
    """Generate a batch elsewhere, move it into landing in one rename, then mark it complete."""
    staging = tmp / "staging" / BATCH
    subprocess.run(
        [
            str(BIN / "ehr"),
            "generate",
            "--patients",
            str(PATIENTS),
            "--seed",
            str(SEED),
            "--out",
            str(staging),
        ],
        check=True,
        capture_output=True,
    )
    staging.rename(ui.landing / BATCH)
    (ui.landing / BATCH / "_READY").write_bytes(b"")


def _tag(run: dict[str, Any], key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)


def wait_for_release(ui: DagsterUI, started: float) -> None:
    """The batch run, then the release run the automation sensor launched after it (the run
    that materialised the model), both successful, and no run left pending."""
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while time.monotonic() < deadline:
        runs = ui.runs()
        failed = [r for r in runs if r["status"] in ("FAILURE", "CANCELED")]
        assert not failed, (failed, ui.log)
        batch = [r for r in runs if _tag(r, "ehr/batch") == BATCH and r["status"] == "SUCCESS"]
        pending = [r for r in runs if r["status"] not in ("SUCCESS", "FAILURE", "CANCELED")]
        model_run = _model_run_id(ui)
        release = [r for r in runs if r["runId"] == model_run and r["status"] == "SUCCESS"]
        if batch and release and not pending:
            ui.batch_run, ui.release_run = batch[0], release[0]
            ui.seconds_to_release = time.monotonic() - started
            return
        time.sleep(3)
    raise AssertionError(f"no successful release within {RELEASE_TIMEOUT}s: {ui.runs()}")


def _model_run_id(ui: DagsterUI) -> str | None:
    data = ui.graphql(
        '{ assetNodeOrError(assetKey: {path: ["readmission_model"]}) { ... on AssetNode { '
        "assetMaterializations(limit: 1) { runId } } } }"
    )
    materialisations = data["assetNodeOrError"]["assetMaterializations"]
    return str(materialisations[0]["runId"]) if materialisations else None


def start_reference_run(ui: DagsterUI) -> subprocess.Popen[bytes]:
    """`ehr run` over the same landing folder into a work directory of its own (and its own
    Dagster instance), started beside the UI's runs to save wall-clock time."""
    env = ui_env(ui.home, ui.reference_workdir, ui.landing, ui.key_file)
    env.pop("DAGSTER_HOME")
    return subprocess.Popen(
        [
            str(BIN / "ehr"),
            "run",
            "--input",
            str(ui.landing),
            "--workdir",
            str(ui.reference_workdir),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(ui.home.parent / "ehr_run.log").open("wb"),
    )


@contextlib.contextmanager
def dagster_dev(
    tmp: Path, settings: Callable[[str], str] | None = None, again: bool = False
) -> Iterator[DagsterUI]:
    """`dagster dev` on a free loopback port, with a temporary DAGSTER_HOME holding the
    repository's instance settings (changed by ``settings``, given their text), its own landing
    folder, work directory and keyring; up and loaded when the block starts, its whole process
    group stopped when it ends. ``again``: started once more over what an earlier one in ``tmp``
    left (its instance, folders and keyring), as after a reboot."""
    home, landing = tmp / "dagster_home", tmp / "landing"
    key_file = tmp / "keys" / "keyring.json"
    if not again:
        home.mkdir()
        landing.mkdir()
        text = (REPO_ROOT / ".dagster_home" / "dagster.yaml").read_text()
        (home / "dagster.yaml").write_text(settings(text) if settings else text)
        init_keyring(key_file)
    port = free_port()
    ui = DagsterUI(
        f"http://127.0.0.1:{port}", home, tmp / "work", landing, key_file, tmp / "dagster_dev.log"
    )
    with ui.log.open("ab" if again else "wb") as log:
        process = subprocess.Popen(
            [
                str(BIN / "dagster"),
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=REPO_ROOT,
            env=ui_env(home, ui.workdir, landing, key_file),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ui.process_group = process.pid
    try:
        wait_until_up(ui, process)
        yield ui
    finally:
        if ui.reference is not None and ui.reference.poll() is None:
            ui.reference.kill()
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it already
            os.killpg(process.pid, signal.SIGTERM)  # the group this fixture started
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ui_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterUI]:
    tmp = tmp_path_factory.mktemp("dagster_ui")
    with dagster_dev(tmp) as ui:
        assert ui.start_sensor("landing_sensor") == "RUNNING"
        started = time.monotonic()
        drop_batch(ui, tmp)
        ui.reference = start_reference_run(ui)
        wait_for_release(ui, started)
        yield ui
