"""A patient who leaves the release and comes back in the next batch is served online again,
as a store materialised from scratch serves them: also when the sync that deleted them was
killed before it wrote anything."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from pipelines.features import online_sync
from tests.pipelines.features.crafted import B, D
from tests.pipelines.features.test_online_sync import (
    Killed,
    Release,
    assert_equals_fresh_materialisation,
    holding,
)


def test_a_patient_who_leaves_and_returns_is_served_again(tmp_path: Path) -> None:
    release = Release(tmp_path / "release")
    release.sync()
    views_of_b, views_of_d = holding(release, B), holding(release, D)
    assert views_of_b >= 4 and views_of_d >= 4
    rows = copy.deepcopy(release.rows)
    release.remove_patient(B)
    release.opt_out(D)
    release.rebuild()
    left = release.sync()
    assert left.rows_deleted == views_of_b + views_of_d
    assert holding(release, B) == holding(release, D) == 0
    release.rows = rows  # both back, their rows as before
    release.rebuild()
    back = release.sync()
    assert (back.mode, back.rows_written) == ("incremental", views_of_b + views_of_d)
    assert (holding(release, B), holding(release, D)) == (views_of_b, views_of_d)
    assert_equals_fresh_materialisation(release, tmp_path / "fresh")


def test_a_patient_back_after_a_sync_killed_once_it_deleted_them_is_served_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = Release(tmp_path / "release")
    release.sync()
    views_of_b = holding(release, B)
    rows = copy.deepcopy(release.rows)
    release.remove_patient(B)
    release.add_hba1c(D, 6.1, days=300)  # a row to write after the delete
    release.rebuild()

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(online_sync, "_write_rows", killed)
        with pytest.raises(Killed):
            release.sync()
    release.rows = rows  # B back as before, D's new result gone again
    release.rebuild()
    release.sync()
    assert holding(release, B) == views_of_b
    assert_equals_fresh_materialisation(release, tmp_path / "fresh")


def test_a_full_sync_killed_while_materialising_has_deleted_the_patients_the_release_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full path (no snapshot to trust, or asked for) materialised every view and deleted
    the patients the release lost after it: killed while Feast materialised, a withheld or
    opted-out patient's online rows were served beside the new ones until the next run."""
    from pipelines.features.feast_store import feature_store
    from pipelines.features.online_sync import sync_online_store

    release = Release(tmp_path / "release")
    release.sync()
    assert holding(release, B) > 0 and holding(release, D) > 0
    release.remove_patient(B)
    release.opt_out(D)
    release.rebuild()

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed

    store = feature_store("feature_repo", release.data, release.features)
    with monkeypatch.context() as patch:
        patch.setattr(online_sync, "materialize_latest", killed)
        with pytest.raises(Killed):
            sync_online_store(release.con, store, full=True)
    assert holding(release, B) == holding(release, D) == 0
    release.sync()
    assert_equals_fresh_materialisation(release, tmp_path / "fresh")
