from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
from dagster import StaticPartitionsDefinition
from hypothesis import given
from hypothesis import strategies as st

from vault.ingest import ingest_batch, reconcile_batch
from vault.keys import FileKeyProvider
from vault.landing import (
    MAX_KEY,
    ROOT_BATCH,
    BatchKeyCollisionError,
    batch_key,
    batch_source,
    describe_idle,
    discover_batches,
    scan_landing,
)
from vault.warehouse import connect

PATIENT = orjson.dumps({"resourceType": "Patient", "id": "p1"})


def _drop(folder: Path, name: str = "Patient.ndjson", data: bytes = PATIENT) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


@pytest.mark.parametrize("name", ["synthetic", "b", "b1", "2024-05-01", "export_7.v2"])
def test_safe_names_are_their_own_keys(name: str) -> None:
    assert batch_key(name) == name


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("x y", "x-y"),
        ("x y", "x  y"),
        ("x/y".replace("/", "\\"), "x-y"),
        ("a" * 70 + "1", "a" * 70 + "2"),
        ("é", "è"),
        (ROOT_BATCH, "root "),
    ],
)
def test_names_that_read_alike_get_different_keys(a: str, b: str) -> None:
    ka, kb = batch_key(a), batch_key(b)
    assert ka != kb
    for key in (ka, kb):
        assert len(key) <= MAX_KEY and key == batch_key(key)  # a key is a safe key itself


@pytest.mark.parametrize("name", ["export...2024", "a....b", "...", "2024-01...2024-03"])
def test_three_dots_never_reach_a_key(name: str) -> None:
    # Dagster's UI and backfills read "a...b" as the partitions from a to b: its own
    # validation of partition keys (static partitions run it) must accept the key
    key = batch_key(name)
    assert "..." not in key and key != name
    assert StaticPartitionsDefinition([key]).get_partition_keys() == [key]
    assert batch_key("a..b") == "a..b"  # two dots are no range


# folder-like names (dots, separators, a non-ASCII letter, a newline) and any text at all
_PIECES = st.sampled_from(["a", "1", ".", "..", "-", "_", " ", "é", "/", "\n"])
_NAMES = st.lists(_PIECES, min_size=1, max_size=40).map("".join) | st.text(min_size=1, max_size=90)


@given(_NAMES)
def test_every_key_is_a_partition_key_dagster_accepts(name: str) -> None:
    key = batch_key(name)
    assert 0 < len(key) <= MAX_KEY and key == batch_key(key)
    StaticPartitionsDefinition([key])  # raises on "...", control characters


def test_reserved_root_name_never_shares_the_root_batch(tmp_path: Path) -> None:
    _drop(tmp_path)  # loose file: batch root
    _drop(tmp_path / "root")
    keys = [b.key for b in discover_batches(tmp_path)]
    assert keys[0] == ROOT_BATCH and len(set(keys)) == 2


def test_folders_that_would_share_a_key_are_refused_by_key(tmp_path: Path) -> None:
    digest_name = batch_key("x y")  # a folder literally named like the other's key
    _drop(tmp_path / "x y")
    _drop(tmp_path / digest_name)
    _drop(tmp_path / "fine")
    with pytest.raises(BatchKeyCollisionError) as err:
        discover_batches(tmp_path)
    assert digest_name in str(err.value) and "2 landing folders" in str(err.value)
    assert "x y" not in str(err.value)  # keys only, never folder names
    assert batch_source(tmp_path, "fine").path == tmp_path / "fine"  # others stay usable
    with pytest.raises(BatchKeyCollisionError):
        batch_source(tmp_path, digest_name)


def test_symlinks_and_special_files_are_skipped_and_listed(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    outside = tmp_path / "outside"
    _drop(outside, "secret.ndjson")
    land = tmp_path / "land"
    batch = land / "b"
    _drop(batch)
    (batch / "link.ndjson").symlink_to(outside / "secret.ndjson")
    (land / "linked-folder").symlink_to(outside, target_is_directory=True)
    (land / "loose.ndjson").symlink_to(outside / "secret.ndjson")
    os.mkfifo(batch / "pipe.ndjson")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(batch / "s.ndjson"))
    try:
        found = scan_landing(land)
        assert [b.key for b in found.batches] == ["b"]  # no root batch: its file is a link
        reasons = sorted((s.path.name, s.reason) for s in found.skipped)
        assert reasons == [
            ("link.ndjson", "symbolic link (not followed)"),
            ("linked-folder", "symbolic link (not followed)"),
            ("loose.ndjson", "symbolic link (not followed)"),
            ("pipe.ndjson", "special file (fifo, socket or device)"),
            ("s.ndjson", "special file (fifo, socket or device)"),
        ]
        wh = tmp_path / "w.duckdb"
        report = ingest_batch(wh, "b", batch, key_provider, workers=1)  # a fifo would block
        assert (report.records_in, report.accepted, report.skipped_files) == (1, 1, 3)
        assert report.skipped_reasons == {
            "symbolic link (not followed)": 1,
            "special file (fifo, socket or device)": 2,
        }
        con = connect(wh, read_only=True)
        try:
            assert reconcile_batch(con, "b").passed
        finally:
            con.close()
    finally:
        sock.close()


def test_fingerprint_follows_data_files_only(tmp_path: Path) -> None:
    _drop(tmp_path / "b")
    before = discover_batches(tmp_path)[0].fingerprint
    (tmp_path / "b" / "notes.txt").write_text("x")
    assert discover_batches(tmp_path)[0].fingerprint == before
    _drop(tmp_path / "b", "Observation.ndjson")
    assert discover_batches(tmp_path)[0].fingerprint != before


def _entries(folder: Path) -> int:
    """Records in the Bundles under ``folder``, counted here from the files themselves."""
    return sum(
        len(orjson.loads(path.read_bytes())["entry"])
        for path in folder.rglob("*.json")
        if not path.name.startswith("_")
    )


def test_an_export_dropped_with_its_own_folders_is_one_batch_read_whole(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """Synthea writes ``output/fhir``: a batch folder holding only sub-folders was not found at
    all, and a sub-folder beside data files was passed over, its records never counted."""
    from fhirlake.synthetic import generate

    land = tmp_path / "land"
    generate(land / "synthea_run1" / "fhir", 3, seed=1)
    generate(land / "synthea_run1" / "fhir_second_export", 2, seed=2)  # the same file names
    _drop(land, "loose.ndjson")  # the root batch: its folder's sub-folders are not its own

    batches = {b.key: b for b in discover_batches(land)}
    assert sorted(batches) == [ROOT_BATCH, "synthea_run1"]
    assert batches["synthea_run1"].nested and not batches[ROOT_BATCH].nested
    assert [f.name for f in batches[ROOT_BATCH].listing().files] == ["loose.ndjson"]

    wh = tmp_path / "w.duckdb"
    run = batches["synthea_run1"]
    report = ingest_batch(wh, run.key, run.path, key_provider, workers=1, nested=True)
    assert report.records_in == _entries(run.path) > 0
    # a Bundle per patient, organizations and practitioners: 3 + 2 in one, 2 + 2 in the other
    assert report.files == 9
    with connect(wh, read_only=True) as con:
        assert reconcile_batch(con, run.key).passed
        ids = con.execute("SELECT count(DISTINCT file_id) FROM source_files").fetchall()
    assert ids == [(9,)]  # two folders' files of one name are two files


def test_a_change_in_a_sub_folder_changes_the_batch(tmp_path: Path) -> None:
    land = tmp_path / "land"
    _drop(land / "export" / "fhir")
    before = batch_source(land, "export").fingerprint
    (land / "export" / "fhir" / "Patient.ndjson").write_bytes(PATIENT + b"\n")
    grown = batch_source(land, "export").fingerprint
    assert grown != before
    (land / "export" / "fhir").rename(land / "export" / "fhir2")  # same files, other folder
    assert batch_source(land, "export").fingerprint not in (before, grown)


def test_a_file_whose_name_is_not_utf8_is_read_with_the_rest(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A file named in Latin-1 (``café`` as the byte E9, as a Windows share may write it) made
    every scan of the landing folder fail with a UnicodeEncodeError: ``ehr run`` stopped and
    the landing sensor's every tick failed, so that no batch was read at all. Its records are
    read and counted with the batch's others, under its name with the byte escaped."""
    land = tmp_path / "land"
    _drop(land / "b", "ok.ndjson")
    p2 = orjson.dumps({"resourceType": "Patient", "id": "p2"})
    (land / "b").joinpath(os.fsdecode(b"caf\xe9.ndjson")).write_bytes(p2)

    (source,) = discover_batches(land)
    assert sorted(f.name for f in source.listing().files) == ["caf\\xe9.ndjson", "ok.ndjson"]
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b", source.path, key_provider, workers=1, nested=True)
    assert (report.files, report.records_in, report.accepted) == (2, 2, 2)
    with connect(wh, read_only=True) as con:
        assert reconcile_batch(con, "b").passed


def test_a_batch_fingerprint_is_the_digest_of_its_files_names_sizes_and_times(
    tmp_path: Path,
) -> None:
    """Computed here by hand from the files (a name's undecodable byte as itself): a name in
    UTF-8 is fingerprinted as it always was, so batches already ingested stay done."""
    import hashlib

    folder = tmp_path / "land" / "b"
    _drop(folder, "ok.ndjson")
    (folder / os.fsdecode(b"caf\xe9.ndjson")).write_bytes(PATIENT)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(os.fsencode(folder))):
        stat = os.lstat(os.path.join(os.fsencode(folder), name))
        digest.update(name + f"\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
    assert batch_source(tmp_path / "land", "b").fingerprint == digest.hexdigest()[:16]


def test_a_folder_that_cannot_be_listed_fails_its_batch_naming_no_folder(
    tmp_path: Path, refuse_listing: Any
) -> None:
    """A folder of a batch the process may not list (an exporter's per-patient folder with
    other permissions) fails the batch, as an unreadable data file does; the error, which
    Dagster keeps in its event log and the sensor on its tick, names the batch key and the
    folder's depth, never the folder's name or path (it can be a patient's name)."""
    from fhirlake.readers import FolderNotReadableError, walk_batch
    from vault.landing import BatchFolderNotReadableError

    landing = tmp_path / "landing"
    _drop(landing / "2024-05-01")
    secret = landing / "2024-05-01" / "Quillfeather_Marisol"
    _drop(secret, "Observation.ndjson")
    refuse_listing(secret)
    for call in (lambda: discover_batches(landing), lambda: batch_source(landing, "2024-05-01")):
        with pytest.raises(BatchFolderNotReadableError) as caught:
            call()
        text = str(caught.value)
        assert text.startswith("batch 2024-05-01: a folder 1 level down in the batch")
        assert "PermissionError, EACCES" in text
        assert "Quillfeather" not in text and str(tmp_path) not in text
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(FolderNotReadableError) as listed:
        walk_batch(landing / "2024-05-01", nested=True)
    assert listed.value.depth == 1 and "Quillfeather" not in str(listed.value)
    assert listed.value.__suppress_context__


def test_a_batch_that_cannot_be_listed_holds_back_no_other_batch(
    tmp_path: Path, refuse_listing: Any
) -> None:
    """One folder an exporter left unreadable is set aside with its error (the batch key and
    the depth, no name below it); every other batch is found and read as without it. Only
    what asks for every batch (``discover_batches``) or for that one (``batch_source``) fails."""
    from vault.landing import BatchFolderNotReadableError, discover_landing

    landing = tmp_path / "landing"
    _drop(landing / "2024-05-01")
    _drop(landing / "2024-05-02")
    secret = landing / "2024-05-02" / "Quillfeather_Marisol"
    _drop(secret, "Observation.ndjson")
    _drop(landing / "2024-05-03")
    readable = {key: batch_source(landing, key).fingerprint for key in ("2024-05-01", "2024-05-03")}
    refuse_listing(secret)

    found = discover_landing(landing)
    assert {b.key: b.fingerprint for b in found.batches} == readable
    assert list(found.unreadable) == ["2024-05-02"]
    text = str(found.unreadable["2024-05-02"])
    assert text.startswith("batch 2024-05-02: a folder 1 level down in the batch")
    assert "Quillfeather" not in text and str(tmp_path) not in text
    for key, fingerprint in readable.items():
        assert batch_source(landing, key).fingerprint == fingerprint
    with pytest.raises(BatchFolderNotReadableError, match=r"^batch 2024-05-02: "):
        batch_source(landing, "2024-05-02")
    with pytest.raises(BatchFolderNotReadableError, match=r"^batch 2024-05-02: "):
        discover_batches(landing)


def _listing_then(monkeypatch: pytest.MonkeyPatch, act: Any) -> None:
    """Run ``act`` on each batch folder's listing just after it is taken and before its files
    are fingerprinted: what an exporter moving files in the landing folder does meanwhile."""
    import vault.landing as landing_module

    real_walk = landing_module.walk_batch

    def walk_then_act(folder: Path, nested: bool = True) -> Any:
        listing = real_walk(folder, nested=nested)
        act(listing)
        return listing

    monkeypatch.setattr(landing_module, "walk_batch", walk_then_act)


def test_a_file_removed_while_its_batch_is_listed_is_left_out_naming_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file removed (or renamed) between the folder's listing and its fingerprint is
    not the batch's any more: the batch reads as the folder now holds it, and no error quotes
    the file's path (Dagster keeps a failed step's error, a patient's name in a file name
    with it, in its storage)."""
    landing = tmp_path / "landing"
    _drop(landing / "2024-05-01")
    gone = landing / "2024-05-01" / "Quillfeather_Marisol_MRN77123.ndjson"
    expected = batch_source(landing, "2024-05-01").fingerprint
    _drop(gone.parent, gone.name)

    def remove(listing: Any) -> None:
        if any(f.path.name == gone.name for f in listing.files):  # listed: now it goes
            gone.unlink()

    _listing_then(monkeypatch, remove)
    for call in (lambda: discover_batches(landing)[0], lambda: batch_source(landing, "2024-05-01")):
        gone.write_bytes(PATIENT)
        assert call().fingerprint == expected


def test_a_listed_file_that_cannot_be_inspected_fails_its_batch_naming_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vault.landing import BatchFolderNotReadableError

    landing = tmp_path / "landing"
    _drop(landing / "2024-05-01")
    secret = landing / "2024-05-01" / "Quillfeather_Marisol_MRN77123.ndjson"
    _drop(secret.parent, secret.name)
    real_lstat = Path.lstat

    def refusing_lstat(self: Path) -> os.stat_result:
        if self.name == secret.name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_lstat(self)

    def refuse_from_now(listing: Any) -> None:
        if listing.files:  # the batch's own listing (the landing folder's loose files are none)
            monkeypatch.setattr(Path, "lstat", refusing_lstat)

    _listing_then(monkeypatch, refuse_from_now)
    with pytest.raises(BatchFolderNotReadableError) as caught:
        batch_source(landing, "2024-05-01")
    text = str(caught.value)
    assert text == "batch 2024-05-01: a data file could not be inspected (PermissionError, EACCES)"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_folders_holding_no_data_file_are_listed_as_idle_by_what_they_hold(
    tmp_path: Path,
) -> None:
    land = tmp_path / "land"
    _drop(land / "batch")
    (land / "empty" / "export" / "fhir").mkdir(parents=True)
    _drop(land / "csv", "Patient.csv", b"id\np1\n")
    _drop(land / "marker", "_READY", b"")
    _drop(land / ".partial", "x.xml", b"<x/>")  # hidden: neither batch nor idle, as before
    found = scan_landing(land)
    assert [b.key for b in found.batches] == ["batch"]
    idle = {folder.key: folder.not_read for folder in found.idle}
    assert idle == {
        "csv": {"not a FHIR data file extension": 1},
        "empty": {},
        "marker": {"not a data file (export metadata)": 1},
    }  # no root: the landing folder holds no loose entry
    _drop(land, "notes.txt", b"the names inside are the exporter's")
    (land / "linked").symlink_to(land / "batch", target_is_directory=True)
    root = {f.key: f for f in scan_landing(land).idle}[ROOT_BATCH]
    assert root.not_read == {
        "not a FHIR data file extension": 1,
        "symbolic link (not followed)": 1,
    }
    said = describe_idle(scan_landing(land).idle)
    assert said[0].startswith("the landing folder's loose entries: no FHIR data file (.json")
    assert said[1] == (
        "3 folders (names not shown) hold no FHIR data file (.json, .ndjson, .json.gz, "
        ".ndjson.gz) to read, not a batch (not read: not a FHIR data file extension: 1, not a "
        "data file (export metadata): 1)"
    )
    for name in ("notes", "linked", "csv", "empty", "marker", "Patient"):
        assert not any(name in line for line in said)  # counts, never names
