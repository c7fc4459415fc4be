"""What a data engineer sees: headless Chromium (Debian's package, never a downloaded browser) on
the asset lineage and on the model's asset page of the `dagster dev` the webserver test drove.

`make test` installs chromium when it is missing; where it cannot be installed this test skips
and says so."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from dagster_ui import DagsterUI

# one `dagster dev` for both modules: they share its session fixture, so one worker runs them
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("dagster_ui")]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# kept after the run (build/ is not versioned) so a failure can be looked at
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
WINDOW = "1600,1000"
# the UI is a single-page app: give its GraphQL round trips time before the DOM is read
RENDER_BUDGET_MS = "25000"


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW}",
            f"--virtual-time-budget={RENDER_BUDGET_MS}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def visit(url: str, shot: Path, profile: Path) -> str:
    """Save a screenshot of ``url`` and return the text of its rendered DOM."""
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    _chromium(profile, f"--screenshot={shot}", url)
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot of {url}"
    dom = _chromium(profile, "--dump-dom", url).stdout
    assert "<html" in dom, f"no DOM from {url}"
    return dom


@pytest.fixture
def chromium_profile(tmp_path: Path) -> Path:
    if CHROMIUM is None:
        pytest.skip(
            "chromium is not installed (make test installs Debian's chromium with apt-get "
            "where it can; no browser is downloaded)"
        )
    return tmp_path / "chromium-profile"


def test_lineage_shows_every_stage(ui_release: DagsterUI, chromium_profile: Path) -> None:
    url = f"{ui_release.url}/assets/readmission_model?view=lineage&lineageScope=upstream"
    url += "&lineageDepth=12"  # every stage up to the landing batch
    dom = visit(url, SCREENSHOTS / "lineage.png", chromium_profile)
    for name in (
        "landing_batch",
        "phi_vault",
        "deid_resources",
        "released_patients",
        "feast_registry",
        "readmission_labels",
    ):
        assert name in dom, f"{name} not on the lineage page"
    assert "Join the Dagster community" not in dom  # nothing drawn over the graph
    # the online store is served beside the training set, not upstream of the model: what the
    # registry feeds
    # (the training set between them is drawn with its name shortened)
    url = f"{ui_release.url}/assets/feast_registry?view=lineage&lineageScope=downstream"
    dom = visit(url + "&lineageDepth=2", SCREENSHOTS / "lineage_feast.png", chromium_profile)
    for name in ("feast_online_store", "readmission_model"):
        assert name in dom, f"{name} not downstream of the registry"


def test_model_page_shows_its_metadata_and_checks(
    ui_release: DagsterUI, chromium_profile: Path
) -> None:
    dom = visit(
        f"{ui_release.url}/assets/readmission_model", SCREENSHOTS / "model.png", chromium_profile
    )
    for text in ("readmission_model", "sklearn", "release_job", "eager", "Metadata"):
        assert text in dom, f"{text!r} not on the model page"
    # the sensors that can launch it: release_automation, and landing_sensor, which requests
    # release_job for a release left behind (the page names one, or counts two)
    assert "2 sensors" in dom or "release_automation" in dom
    if "/logs/ehr_plots/" in dom:  # trained: the plots are images on the page itself
        assert '<img src="/logs/ehr_plots/' in dom and "roc_curve" in dom
    else:  # too small a release to train on: the page says why
        assert "not trained" in dom or "reason" in dom
    checks = visit(
        f"{ui_release.url}/assets/readmission_model?view=checks",
        SCREENSHOTS / "model_checks.png",
        chromium_profile,
    )
    assert "auroc_beats_chance" in checks
