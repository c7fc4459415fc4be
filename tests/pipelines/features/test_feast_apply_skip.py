"""``feast apply`` runs only when it would change something: a digest of what it reads (the
repo's files, the rendered feature_store.yaml and its variables, the feast version) is recorded
beside the registry after each apply."""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from pipelines.features.feast_store import (
    FEAST_DATA_ENV,
    FEATURES_DIR_ENV,
    ApplyReport,
    _feast,
    apply_digest,
    apply_repo,
    feast_env,
    feature_store,
    materialize_latest,
    read_apply_record,
    registry_definitions,
    resolve_repo,
)
from pipelines.features.tables import build_feature_tables
from tests.pipelines.features.crafted import crafted_rows, write_views
from vault.keys import KEY_ENV_VARS


@pytest.fixture(autouse=True)
def _restore_feast_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # apply_repo writes these into os.environ; monkeypatch puts the old values back
    monkeypatch.setenv(FEAST_DATA_ENV, "/nonexistent")
    monkeypatch.setenv(FEATURES_DIR_ENV, "/nonexistent")
    yield


def repo_copy(root: Path) -> Path:
    repo = root / "repo"
    shutil.copytree(resolve_repo(None), repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def online_tables(db: Path) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {name for (name,) in con.execute("SELECT name FROM sqlite_master")}
    finally:
        con.close()


def test_digest_covers_files_and_variables_but_not_bytecode(tmp_path: Path) -> None:
    repo = repo_copy(tmp_path)
    os.environ[FEAST_DATA_ENV] = str(tmp_path / "feast")
    first = apply_digest(repo)
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "features.cpython-311.pyc").write_bytes(b"written by an import")
    assert apply_digest(repo) == first
    os.environ[FEAST_DATA_ENV] = str(tmp_path / "elsewhere")
    assert apply_digest(repo) != first
    os.environ[FEAST_DATA_ENV] = str(tmp_path / "feast")
    (repo / "README.md").write_text("changed")
    assert apply_digest(repo) != first


def _applied(tmp_path: Path) -> tuple[Path, Path, Path, ApplyReport]:
    """A copy of the repo applied once over feature tables built from crafted views: the
    repo, its data folder, the features folder and the first apply's result."""
    repo = repo_copy(tmp_path)
    features, data = tmp_path / "features", tmp_path / "feast"
    con = duckdb.connect()
    write_views(con, crafted_rows())
    build_feature_tables(con, features)
    return repo, data, features, apply_repo(repo, data, features)


def test_apply_skipped_until_something_it_reads_changes(tmp_path: Path) -> None:
    repo, data, features, first = _applied(tmp_path)
    assert (first.applied, first.reason) == (True, "no registry")
    generation = read_apply_record(data / "registry.db")["generation"]

    again = apply_repo(repo, data, features)
    assert not again.applied and again.digest == first.digest
    assert (again.feature_views, again.features) == (first.feature_views, first.features)
    assert read_apply_record(data / "registry.db")["generation"] == generation

    with (repo / "features.py").open("a") as f:
        f.write("\n# a changed repo file\n")
    changed = apply_repo(repo, data, features)
    assert changed.applied and changed.reason == "repo, environment or feast version changed"
    assert read_apply_record(data / "registry.db")["generation"] != generation

    moved = tmp_path / "features_moved"
    shutil.copytree(features, moved)
    assert apply_repo(repo, data, moved).applied  # another data path
    assert not apply_repo(repo, data, moved).applied

    (data / "online_store.db").unlink()
    recreated = apply_repo(repo, data, moved)
    assert (recreated.applied, recreated.reason) == (True, "online store tables missing")
    assert "ehr_platform_patient_demographics" in online_tables(data / "online_store.db")

    (data / "registry.db").unlink()
    assert apply_repo(repo, data, moved).reason == "no registry"


def test_a_registry_emptied_or_cut_short_by_a_killed_write_is_applied_again(
    tmp_path: Path,
) -> None:
    """Feast rewrites its registry in place (``open(path, "wb")``, then the bytes) at every apply
    and materialisation: a process killed in between leaves it empty beside the record of a
    successful apply, and a registry of no feature view must not pass for the applied repo."""
    repo, data, features, first = _applied(tmp_path)
    registry = data / "registry.db"
    whole = registry.read_bytes()

    for left in (b"", whole[: len(whole) // 2], b"\xff" * 64):
        registry.write_bytes(left)
        again = apply_repo(repo, data, features)
        assert (again.applied, again.reason) == (True, "registry empty or unreadable")
        assert (again.feature_views, again.features) == (first.feature_views, first.features)
        assert not apply_repo(repo, data, features).applied


def test_a_copied_work_directory_leaves_the_original_online_store_alone(tmp_path: Path) -> None:
    """``feast apply`` drops the online tables its registry lists and the config does not: a
    registry copied with its directory lists the original's, which must keep theirs."""
    repo = repo_copy(tmp_path)
    original, copy = tmp_path / "original", tmp_path / "copy"
    con = duckdb.connect()
    write_views(con, crafted_rows())
    build_feature_tables(con, original / "features")
    apply_repo(repo, original / "feast", original / "features")
    tables = online_tables(original / "feast" / "online_store.db")
    assert "ehr_platform_patient_demographics" in tables
    shutil.copytree(original, copy)

    applied = apply_repo(repo, copy / "feast", copy / "features")
    assert online_tables(original / "feast" / "online_store.db") == tables
    assert (applied.applied, applied.reason) == (
        True,
        "registry copied from another work directory",
    )
    assert online_tables(copy / "feast" / "online_store.db") == tables
    assert not apply_repo(repo, copy / "feast", copy / "features").applied


def test_a_moved_work_directory_applies_its_registry_again(tmp_path: Path) -> None:
    """A work directory moved (``mv``): its registry lists the online store of a directory that
    is gone. Read through Feast's ``get_infra``, which opens each listed SQLite file, it failed
    with ``FileNotFoundError``, and every release after the move stopped at the registry."""
    repo = repo_copy(tmp_path)
    before, after = tmp_path / "before", tmp_path / "after"
    con = duckdb.connect()
    write_views(con, crafted_rows())
    build_feature_tables(con, before / "features")
    apply_repo(repo, before / "feast", before / "features")
    tables = online_tables(before / "feast" / "online_store.db")
    before.rename(after)

    applied = apply_repo(repo, after / "feast", after / "features")
    assert (applied.applied, applied.reason) == (
        True,
        "registry copied from another work directory",
    )
    assert online_tables(after / "feast" / "online_store.db") == tables
    assert not before.exists()  # nothing made where the directory was
    assert not apply_repo(repo, after / "feast", after / "features").applied


def test_feast_apply_gets_no_key_material(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run may hold its keys in variables; the ``feast apply`` child reads none, so it gets
    none. Seen from inside the real apply: it imports every module of the repo, one of which
    writes down the names of the variables it was given."""
    repo = repo_copy(tmp_path)
    seen = tmp_path / "apply_env.txt"
    (repo / "zz_seen_env.py").write_text(
        "import os, pathlib\n"
        f"pathlib.Path({str(seen)!r}).write_text('\\n'.join(sorted(os.environ)))\n"
    )
    planted = {name: base64.b64encode(os.urandom(32)).decode() for name in KEY_ENV_VARS}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EHR_NOT_A_KEY", "kept")
    features = tmp_path / "features"
    con = duckdb.connect()
    write_views(con, crafted_rows())
    build_feature_tables(con, features)
    apply_repo(repo, tmp_path / "feast", features, force=True)
    names = set(seen.read_text().split("\n"))
    assert not names & set(KEY_ENV_VARS)
    assert {"EHR_NOT_A_KEY", FEAST_DATA_ENV, FEATURES_DIR_ENV, "PATH"} <= names


def _source_paths(repo: Path, data: Path, features: Path) -> set[Path]:
    store = feature_store(repo, data, features)
    return {Path(v.batch_source.path).parent for v in store.list_feature_views()}


def test_an_apply_from_a_shell_with_other_sources_is_applied_again(tmp_path: Path) -> None:
    """``feast apply`` run by hand in the repo folder, with ``EHR_FEATURES_DIR`` naming another
    folder (or unset, with another ``EHR_WORKDIR``), points every source of the registry there.
    The apply record's digest of the repo and the run's own variables is unchanged, so the next
    release skipped its apply and its online store and training set read the other folder."""
    repo, data, features, _ = _applied(tmp_path)
    generation = read_apply_record(data / "registry.db")["generation"]
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(features, elsewhere)
    _feast(["apply"], repo, feast_env(data, elsewhere))
    assert _source_paths(repo, data, features) == {elsewhere.resolve()}

    again = apply_repo(repo, data, features)
    assert (again.applied, again.reason) == (True, "registry changed since the last apply")
    assert _source_paths(repo, data, features) == {features.resolve()}
    assert read_apply_record(data / "registry.db")["generation"] != generation  # a full sync
    assert not apply_repo(repo, data, features).applied


def test_a_materialisation_changes_no_definition(tmp_path: Path) -> None:
    repo, data, features, _ = _applied(tmp_path)
    before = registry_definitions(data / "registry.db")
    materialize_latest(feature_store(repo, data, features))
    assert registry_definitions(data / "registry.db") == before
    assert not apply_repo(repo, data, features).applied


def test_views_written_again_by_another_process_change_no_definition(tmp_path: Path) -> None:
    """A process that writes the registry (a release's materialisation) serialises the views
    in its own form; the definitions must read the same, or every release would apply again
    and reload the online store in full."""
    repo, data, features, _ = _applied(tmp_path)
    registry = data / "registry.db"
    before = (registry.read_bytes(), registry_definitions(registry))
    store = feature_store(repo, data, features)
    for view in store.list_feature_views():
        store.registry.apply_feature_view(view, store.project, commit=False)
    store.registry.commit()
    assert registry.read_bytes() != before[0]
    assert registry_definitions(registry) == before[1]
    assert not apply_repo(repo, data, features).applied
