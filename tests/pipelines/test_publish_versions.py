"""What a folder publish killed after its switch leaves beside the folder (the previous version,
which it would have removed next) is removed when the folder is next kept as it is, not only at
its next publish: a kept model may go unpublished for many releases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines import publish
from pipelines.publish import publish_folder, remove_unpublished_versions


def _hidden(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.parent.iterdir() if e.name.startswith(f".{folder.name}-"))


def _publish(folder: Path, text: str) -> None:
    publish_folder(folder, lambda version: (version / "model.txt").write_text(text))


def test_the_version_a_killed_publish_left_is_removed_and_the_current_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models" / "readmission"
    _publish(folder, "first")
    (first,) = _hidden(folder)
    # killed right after the switch: the old version is still there
    with monkeypatch.context() as patched:
        patched.setattr(publish, "_remove_versions_but", lambda path, kept: 0)
        _publish(folder, "second")
    current = os.readlink(folder)
    assert sorted(_hidden(folder)) == sorted([first, current]) and first != current
    assert remove_unpublished_versions(folder) == 1
    assert _hidden(folder) == [current]
    assert (folder / "model.txt").read_text() == "second"
    assert remove_unpublished_versions(folder) == 0  # nothing more to remove


def test_a_folder_not_published_as_a_version_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "readmission"
    assert remove_unpublished_versions(folder) == 0  # no folder at all
    # a plain folder (an older publish) beside something that looks like a version
    folder.mkdir(parents=True)
    (folder / "model.txt").write_text("plain")
    stray = folder.with_name(".readmission-0123456789abcdef")
    stray.mkdir()
    assert remove_unpublished_versions(folder) == 0
    assert stray.is_dir() and (folder / "model.txt").read_text() == "plain"
    # a link to a folder elsewhere: not one of its versions, nothing removed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / "model.txt").unlink()
    folder.rmdir()
    folder.symlink_to(elsewhere)
    assert remove_unpublished_versions(folder) == 0
    assert stray.is_dir()


def test_every_entry_the_link_leads_through_is_kept(tmp_path: Path) -> None:
    """A version that is itself a link to another (never made by a publish): both stay, and the
    model still reads; only a true leftover goes. An absolute link reads the same."""
    folder = tmp_path / "models" / "readmission"
    _publish(folder, "first")
    (real,) = _hidden(folder)
    alias = folder.with_name(".readmission-fedcba9876543210")
    alias.symlink_to(real)
    leftover = folder.with_name(".readmission-0123456789abcdef")
    leftover.mkdir()
    folder.unlink()
    folder.symlink_to(alias)  # absolute, to the alias
    assert remove_unpublished_versions(folder) == 1
    assert _hidden(folder) == sorted([alias.name, real])
    assert (folder / "model.txt").read_text() == "first"
