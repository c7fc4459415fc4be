from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from fhirlake.readers import iter_records, list_batch_files
from fhirlake.validation import check_record


def _records(folder: Path):
    files, _ = list_batch_files(folder)
    return [r for f in files for r in iter_records(f)]


def test_synthea_bundles_read_every_entry(shared_data: Path) -> None:
    folder = shared_data / "synthea_small"
    expected = sum(
        len(json.loads(p.read_text(encoding="utf-8"))["entry"]) for p in folder.glob("*.json")
    )
    records = _records(folder)
    assert len(records) == expected
    assert all(r.error is None and r.bundle is not None for r in records)
    # every transaction entry is findable by its urn:uuid
    assert all(any(k.startswith("urn:uuid:") for k in r.bundle.urn_map) for r in records[:50])


def test_bulk_ndjson_counts_match_lines(shared_data: Path) -> None:
    folder = shared_data / "bulk_ndjson_10"
    files, skipped = list_batch_files(folder)
    assert {s.path.name for s in skipped} == {"log.ndjson", "_MISSING.txt"}
    for source in files:
        lines = [ln for ln in source.path.read_bytes().splitlines() if ln.strip()]
        assert sum(1 for _ in iter_records(source)) == len(lines)


def test_curated_examples_read_and_validate(shared_data: Path) -> None:
    """Every record is read; the few that are not valid R4 are known and named here."""
    folder = shared_data / "fhir_examples" / "curated_r4"
    outcomes = {}
    for record in _records(folder):
        files, _ = list_batch_files(folder)
        name = files[record.file_index].path.name
        if record.error is not None:
            outcomes[(name, record.position)] = record.error[0]
        else:
            checked = check_record(record.raw or b"")
            if checked.code:
                outcomes[(name, record.position)] = checked.code
    known_invalid = {
        # STU3-shaped single interpretation; R4 makes it a list
        ("ms__Observation-For-Patient-f001.json", 1): "schema_violation",
        ("ms__ObservationWithBloodPressure.json", 1): "schema_violation",
        ("ms__ObservationWithTemperature.json", 1): "schema_violation",
        # lastUpdated without a time zone is not an R4 instant
        ("ms__Patient.json", 1): "schema_violation",
        # HL7's test-modified questionnaire omits required linkIds
        ("hl7tc__bundle-questionnaire.json", 1): "schema_violation",
    }
    for name in ("ms__Bundle-Batch.json", "ms__Bundle-Transaction.json"):
        for position in (6, 7, 9, 10):  # DELETE and GET requests carry no resource
            known_invalid[(name, position)] = "unsupported_entry"
    known_invalid[("ms__Bundle-Batch.json", 5)] = "duplicate_full_url"
    assert outcomes == known_invalid


def test_gzip_bom_and_blank_lines(tmp_path: Path) -> None:
    lines = [
        orjson.dumps({"resourceType": "Patient", "id": "p1"}),
        b"",
        orjson.dumps({"resourceType": "Patient", "id": "p2"}),
    ]
    payload = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"
    with gzip.open(tmp_path / "Patient.ndjson.gz", "wb") as handle:
        handle.write(payload)
    (tmp_path / "single.json").write_bytes(
        b"\xef\xbb\xbf" + orjson.dumps({"resourceType": "Patient", "id": "p3"})
    )
    records = _records(tmp_path)
    assert [(r.position, orjson.loads(r.raw)["id"]) for r in records] == [
        (1, "p1"),
        (3, "p2"),
        (1, "p3"),
    ]


def test_broken_bundle_accounts_for_every_entry(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "not-a-type",
        "entry": [{"resource": {"resourceType": "Patient", "id": str(i)}} for i in range(3)],
    }
    (tmp_path / "b.json").write_bytes(orjson.dumps(bundle))
    (tmp_path / "bad.json").write_bytes(b'{"resourceType": "Patient", "id": ')
    records = _records(tmp_path)
    assert [r.error[0] if r.error else None for r in records] == [
        "invalid_bundle",
        "invalid_bundle",
        "invalid_bundle",
        "invalid_json",
    ]


def test_running_out_of_memory_checking_a_bundle_fails_the_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MemoryError while the Bundle's envelope was validated made every entry of the file an
    ``invalid_bundle`` record, quarantined for good with its batch marked ingested. It says
    nothing of the file: the read fails, and the batch with it, to be ingested again."""
    from fhirlake import readers

    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise MemoryError

    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"resourceType": "Patient", "id": "1"}}],
    }
    (tmp_path / "b.json").write_bytes(orjson.dumps(bundle))
    monkeypatch.setattr(readers.Bundle, "model_validate", exhausted)
    with pytest.raises(MemoryError):
        _records(tmp_path)


def test_large_bundles_stream_to_the_same_records(shared_data: Path) -> None:
    from fhirlake.readers import SourceFile

    path = next(iter(sorted((shared_data / "synthea_small").glob("*.json"))))
    source = SourceFile(0, path, "json")
    whole = list(iter_records(source))
    streamed = list(iter_records(source, stream_above=0))  # force the ijson path
    assert len(streamed) == len(whole)
    for a, b in zip(whole, streamed, strict=True):
        assert (a.position, a.error) == (b.position, b.error)
        assert orjson.loads(a.raw) == orjson.loads(b.raw)
        assert a.bundle is not None and b.bundle is not None
        assert a.bundle.urn_map == b.bundle.urn_map


def test_streamed_bundle_defects(tmp_path: Path) -> None:
    from fhirlake.readers import SourceFile

    bad_type = {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient"}}]}
    (tmp_path / "a.json").write_bytes(orjson.dumps(bad_type))
    (tmp_path / "b.json").write_bytes(b'{"resourceType": "Bundle", "type": "batch", "entry": [')
    a = list(iter_records(SourceFile(0, tmp_path / "a.json", "json"), stream_above=0))
    assert [r.error[0] for r in a if r.error] == ["invalid_bundle"]
    b = list(iter_records(SourceFile(1, tmp_path / "b.json", "json"), stream_above=0))
    assert [r.error[0] for r in b if r.error] == ["invalid_json"]


@pytest.mark.parametrize("stream_above", [None, 0])
def test_a_bundle_entry_is_named_from_zero_as_fhirpath_names_it(
    tmp_path: Path, stream_above: int | None
) -> None:
    """The second entry's fullUrl is empty: the message names ``Bundle.entry[1]``, as FHIRPath
    and the schema's messages name the second element (it said ``Bundle.entry[2]``)."""
    from fhirlake.readers import SourceFile

    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Basic", "id": "a"}},
            {"fullUrl": " ", "resource": {"resourceType": "Basic", "id": "b"}},
        ],
    }
    (tmp_path / "a.json").write_bytes(orjson.dumps(bundle))
    source = SourceFile(0, tmp_path / "a.json", "json")
    kwargs = {} if stream_above is None else {"stream_above": stream_above}
    messages = {r.error[1] for r in iter_records(source, **kwargs) if r.error}
    assert messages == {"Bundle.entry[1].fullUrl: not a non-empty uri"}


MARK = "Zq7MarkerValue"


def _gz(data: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as handle:
        handle.write(data)
    return buf.getvalue()


def _lines(n: int) -> bytes:
    return b"\n".join(
        orjson.dumps({"resourceType": "Patient", "id": f"p{i}", "name": [{"text": MARK * 50}]})
        for i in range(n)
    )


def test_files_that_fail_before_or_after_their_first_record(tmp_path: Path) -> None:
    """A file that cannot be read to its end yields one more record with its reason: every
    file counts at least one record in, and the records read before the failure stand."""
    whole = _gz(_lines(200))
    (tmp_path / "a_truncated_early.ndjson.gz").write_bytes(whole[:15])
    (tmp_path / "b_truncated_late.ndjson.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "c_not_gzip.json.gz").write_bytes(MARK.encode() * 10)
    (tmp_path / "d_truncated.json.gz").write_bytes(_gz(orjson.dumps(PATIENT_BUNDLE))[:-12])
    (tmp_path / "e_bad_utf8.json").write_bytes(b'{"resourceType": "Patient", "id": "\xff\xfe"}')
    (tmp_path / "f_not_json.json").write_bytes(b"\x00\x01" + MARK.encode())
    (tmp_path / "g_bad_utf8.ndjson").write_bytes(b'{"a": "\xc3\x28"}\n' + _lines(1))
    by_file: dict[str, list] = {}
    files, _ = list_batch_files(tmp_path)
    for record in _records(tmp_path):
        by_file.setdefault(files[record.file_index].path.name[:1], []).append(record)
    assert [r.error[0] for r in by_file["a"] if r.error] == ["unreadable_file"]
    assert len(by_file["a"]) == 1 and by_file["a"][0].position == 1
    late = by_file["b"]
    assert late[-1].error and late[-1].error[0] == "unreadable_file"
    assert all(r.error is None for r in late[:-1]) and 0 < len(late) - 1 < 200
    assert late[-1].position == late[-2].position + 1
    assert [r.error[0] for r in by_file["c"] if r.error] == ["unreadable_file"]
    assert [r.error[0] for r in by_file["d"] if r.error] == ["unreadable_file"]
    assert [r.error[0] for r in by_file["e"] if r.error] == ["invalid_json"]
    assert [r.error[0] for r in by_file["f"] if r.error] == ["invalid_json"]
    assert len(by_file["g"]) == 2  # NDJSON: one record per line, the bad one fails on its own
    assert check_record(by_file["g"][0].raw or b"").code == "invalid_json"
    for records in by_file.values():
        for record in records:
            assert record.error is None or MARK not in record.error[1]


@pytest.mark.parametrize("name", ["a.ndjson.gz", "a.json.gz"])
def test_an_empty_gz_file_is_one_unreadable_record(tmp_path: Path, name: str) -> None:
    """A ``.gz`` file of no bytes is no gzip (gzip writes 20 bytes for no data; an export that
    failed writes none) and counts one ``unreadable_file`` record, as a gzip cut after its
    first byte does. An empty ``.ndjson.gz`` counted no record at all, so the failed file went
    unseen; a gzip of no data still holds no record."""
    from fhirlake.readers import SourceFile

    path = tmp_path / name
    path.write_bytes(b"")
    records = list(iter_records(SourceFile(0, path, "ndjson" if "ndjson" in name else "json")))
    assert [(r.position, r.raw, r.error and r.error[0]) for r in records] == [
        (1, None, "unreadable_file")
    ]
    path.write_bytes(_gz(b""))
    empty_data = list(iter_records(SourceFile(0, path, "ndjson")))
    assert empty_data == []


def test_streamed_bundle_in_truncated_gzip(tmp_path: Path) -> None:
    from fhirlake.readers import SourceFile

    path = tmp_path / "big.json.gz"
    path.write_bytes(_gz(orjson.dumps(PATIENT_BUNDLE))[:-12])
    records = list(iter_records(SourceFile(0, path, "json"), stream_above=0))
    assert records[-1].error is not None and records[-1].error[0] == "unreadable_file"


PATIENT_BUNDLE = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [{"resource": {"resourceType": "Patient", "id": f"p{i}"}} for i in range(300)],
}


def test_odd_bundle_shells_are_reasons_not_crashes(tmp_path: Path) -> None:
    deep: object = MARK
    for _ in range(400):  # orjson reads 1024 levels but writes only 255
        deep = [deep]
    bundles = {
        "a": {"resourceType": "Bundle", "type": ["batch"], "entry": [{"resource": {}}]},
        "b": {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"request": {"method": [MARK], "url": "x"}}],
        },
        "c": {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"request": {"method": MARK, "url": "x"}}],
        },
        "d": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {
                    "fullUrl": "urn:uuid:1",
                    "resource": {"resourceType": "Patient", "meta": {"versionId": [1]}},
                },
                {"resource": {"resourceType": "Patient", "name": deep}},
            ],
        },
        "e": {"resourceType": "Bundle", "type": "collection", "entry": [], "total": deep},
    }
    for name, bundle in bundles.items():
        (tmp_path / f"{name}.json").write_bytes(json.dumps(bundle).encode())
    records = _records(tmp_path)
    codes = [r.error[0] if r.error else None for r in records]
    # a: type not a code; b, c: request.method not an HTTP verb; d: the deep entry cannot be
    # carried as bytes; e: a shell that deep, reported once for the file
    assert codes == [
        "invalid_bundle",
        "invalid_bundle",
        "invalid_bundle",
        None,
        "schema_violation",
        "invalid_bundle",
    ]
    assert all(MARK not in r.error[1] for r in records if r.error)


def test_symlinks_and_fifos_are_skipped_never_opened(tmp_path: Path) -> None:
    import os

    outside = tmp_path / "outside.ndjson"
    outside.write_bytes(_lines(1))
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "link.ndjson").symlink_to(outside)
    os.mkfifo(batch / "fifo.ndjson")
    (batch / "sub").mkdir()
    files, skipped = list_batch_files(batch)
    assert files == []
    assert sorted((s.path.name, s.reason) for s in skipped) == [
        ("fifo.ndjson", "special file (fifo, socket or device)"),
        ("link.ndjson", "symbolic link (not followed)"),
    ]


def test_an_overlong_ndjson_line_is_one_record_quarantined_unread(tmp_path: Path) -> None:
    from fhirlake.readers import SourceFile

    small = orjson.dumps({"resourceType": "Patient", "id": "p1"})
    huge = orjson.dumps({"resourceType": "Patient", "id": "p2", "note": "x" * 5_000})
    body = b"\n".join([small, huge, small, huge]) + b"\n" + small  # the last line has no end
    plain = tmp_path / "a.ndjson"
    plain.write_bytes(body)
    packed = tmp_path / "b.ndjson.gz"
    packed.write_bytes(gzip.compress(body))
    for index, path in enumerate((plain, packed)):
        records = list(iter_records(SourceFile(index, path, "ndjson"), max_line_bytes=1_000))
        assert [(r.position, r.raw, r.error and r.error[0]) for r in records] == [
            (1, small, None),
            (2, None, "record_too_large"),
            (3, small, None),
            (4, None, "record_too_large"),
            (5, small, None),
        ]
        assert all("x" * 10 not in (r.error or ("", ""))[1] for r in records)
    # a line of exactly the limit is read; one byte more is not
    exact = tmp_path / "c.ndjson"
    exact.write_bytes(small + b"\n" + small)
    at_limit = list(iter_records(SourceFile(2, exact, "ndjson"), max_line_bytes=len(small)))
    assert [r.raw for r in at_limit] == [small, small]
    over = list(iter_records(SourceFile(2, exact, "ndjson"), max_line_bytes=len(small) - 1))
    assert [r.error and r.error[0] for r in over] == ["record_too_large", "record_too_large"]
    # so is a line of the limit ended by CRLF (it was refused: its CR counted), and one byte
    # more still is not
    crlf = tmp_path / "d.ndjson"
    crlf.write_bytes(small + b"\r\n" + small + b"\r\n" + b"\r\n" + small)
    at_limit = list(iter_records(SourceFile(3, crlf, "ndjson"), max_line_bytes=len(small)))
    assert [(r.position, r.raw) for r in at_limit] == [(1, small), (2, small), (4, small)]
    over = list(iter_records(SourceFile(3, crlf, "ndjson"), max_line_bytes=len(small) - 1))
    assert [(r.position, r.error and r.error[0]) for r in over] == [
        (1, "record_too_large"),
        (2, "record_too_large"),
        (4, "record_too_large"),
    ]


@pytest.mark.parametrize("packed", [False, True])
def test_an_overlong_blank_ndjson_line_is_skipped_uncounted(tmp_path: Path, packed: bool) -> None:
    """A line of JSON whitespace alone is blank however long it is: skipped and uncounted, as a
    short one is. Longer than the line limit, it was one ``record_too_large`` record, a record
    in that no record came in as; a long line with anything else in it still is one."""
    from fhirlake.readers import BOM, SourceFile

    small = orjson.dumps({"resourceType": "Patient", "id": "p1"})
    blank = b" \t\r" * 3_000
    body = b"\n".join(
        [BOM + blank, small, blank + b"\r", blank + b"x", small, b"\t" * 5_000 + b"\r", blank]
    )
    path = tmp_path / ("a.ndjson.gz" if packed else "a.ndjson")
    path.write_bytes(gzip.compress(body) if packed else body)
    records = list(iter_records(SourceFile(0, path, "ndjson"), max_line_bytes=1_000))
    assert [(r.position, r.raw, r.error and r.error[0]) for r in records] == [
        (2, small, None),
        (4, None, "record_too_large"),
        (5, small, None),
    ]


def test_a_landing_batch_reads_its_sub_folders_and_says_what_it_passes_over(
    tmp_path: Path,
) -> None:
    """An export dropped with its own folders (Synthea's ``output/fhir``): nested, every data
    file down to the depth limit is the batch's, named by its path within the batch; hidden and
    ``_`` folders, linked folders and folders nested deeper are listed as skipped, unread."""
    import os

    from fhirlake.readers import MAX_FOLDER_DEPTH, walk_batch

    batch = tmp_path / "export"
    for folder in ("fhir", "fhir/more", "other", ".cache", "_tmp"):
        (batch / folder).mkdir(parents=True)
    for name in ("top.ndjson", "fhir/a.ndjson", "fhir/more/b.ndjson", "other/a.ndjson"):
        (batch / name).write_bytes(_lines(1))
    (batch / ".cache" / "c.ndjson").write_bytes(_lines(1))
    (batch / "_tmp" / "d.ndjson").write_bytes(_lines(1))
    (batch / "linked").symlink_to(batch / "fhir", target_is_directory=True)
    deep = batch / "deep"
    for _ in range(MAX_FOLDER_DEPTH):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "e.ndjson").write_bytes(_lines(1))  # MAX_FOLDER_DEPTH + 1 folders down

    files, skipped = list_batch_files(batch, nested=True)
    assert [(f.index, f.name) for f in files] == [
        (0, "fhir/a.ndjson"),
        (1, "fhir/more/b.ndjson"),
        (2, "other/a.ndjson"),
        (3, "top.ndjson"),
    ]
    assert sorted((s.path.relative_to(batch).as_posix(), s.reason) for s in skipped) == [
        (".cache", "hidden or _ folder (not read)"),
        ("_tmp", "hidden or _ folder (not read)"),
        (
            "deep/" + "/".join(["d"] * MAX_FOLDER_DEPTH),
            f"folder nested deeper than {MAX_FOLDER_DEPTH}",
        ),
        ("linked", "symbolic link (not followed)"),
    ]
    read = sorted(p.relative_to(batch).as_posix() for p in walk_batch(batch, nested=True).folders)
    assert read[:4] == [".", "deep", "deep/d", "deep/d/d"] and "fhir/more" in read
    assert ".cache" not in read and "linked" not in read

    # not nested (the landing folder's loose files): sub-folders are other batches, not read
    flat, flat_skipped = list_batch_files(batch)
    assert [f.name for f in flat] == ["top.ndjson"]
    assert [s.path.name for s in flat_skipped] == ["linked"]
    assert walk_batch(batch).folders == [batch]
    assert os.path.isdir(batch / "linked")  # the link itself is left alone


def _crc_broken(data: bytes) -> bytes:
    packed = bytearray(_gz(data))
    packed[-8] ^= 0xFF  # the first byte of the trailer's CRC-32
    return bytes(packed)


@pytest.mark.parametrize("final_newline", [True, False])
def test_a_bad_gzip_trailer_loses_no_record_and_counts_none_more(
    tmp_path: Path, final_newline: bool
) -> None:
    """All data decompresses, only the trailer's CRC is wrong: every line is a record read as
    usual (the last one too when no newline ends it), nothing stands for a rest that is not
    there, and the file gets a note."""
    from fhirlake.readers import FileNote, SourceFile

    data = _lines(3) + (b"\n" if final_newline else b"")
    lines = [line for line in data.split(b"\n") if line]
    path = tmp_path / "a.ndjson.gz"
    path.write_bytes(_crc_broken(data))
    notes: list[FileNote] = []
    records = list(iter_records(SourceFile(0, path, "ndjson"), notes=notes))
    assert [(r.position, r.raw, r.error) for r in records] == [
        (i, line, None) for i, line in enumerate(lines, 1)
    ]
    assert len(notes) == 1 and "CRC" in notes[0].message


def test_a_bad_gzip_trailer_with_more_after_it_quarantines_the_rest(tmp_path: Path) -> None:
    from fhirlake.readers import SourceFile

    first = _lines(2) + b"\n"
    path = tmp_path / "a.ndjson.gz"
    path.write_bytes(_crc_broken(first) + _gz(_lines(1) + b"\n"))
    records = list(iter_records(SourceFile(0, path, "ndjson")))
    expected = len(first.splitlines()) + 1
    assert len(records) == expected
    assert [r.error for r in records[:-1]] == [None] * (expected - 1)
    assert records[-1].error and records[-1].error[0] == "unreadable_file"
    assert records[-1].position == expected and records[-1].raw is None


def test_a_bad_gzip_trailer_on_a_json_document_keeps_it(tmp_path: Path) -> None:
    from fhirlake.readers import FileNote, SourceFile

    path = tmp_path / "a.json.gz"
    path.write_bytes(_crc_broken(orjson.dumps(PATIENT_BUNDLE)))
    for stream_above in (None, 0):
        notes: list[FileNote] = []
        records = list(iter_records(SourceFile(0, path, "json"), stream_above, notes=notes))
        assert len(records) == len(PATIENT_BUNDLE["entry"])  # type: ignore[arg-type]
        assert all(r.error is None for r in records) and len(notes) == 1


def test_gzip_cut_inside_a_line_quarantines_that_lines_bytes(tmp_path: Path) -> None:
    """The rest of a file that fails inside its compressed data is quarantined with the bytes
    of it that could be read (never an empty record standing for them)."""
    import zlib

    from fhirlake.readers import SourceFile

    whole = _gz(_lines(200) + b"\n")
    cut = whole[: len(whole) // 2]
    readable = zlib.decompressobj(31).decompress(cut)
    *complete, partial = readable.split(b"\n")
    assert partial  # the cut falls inside a line
    path = tmp_path / "a.ndjson.gz"
    path.write_bytes(cut)
    records = list(iter_records(SourceFile(0, path, "ndjson")))
    assert [r.raw for r in records[:-1]] == complete
    assert records[-1].error and records[-1].error[0] == "unreadable_file"
    assert records[-1].raw == partial and records[-1].position == len(complete) + 1


_P = {"resourceType": "Patient", "id": "p1"}
_STREAM_CASES = {
    "entry_is_object": {"resourceType": "Bundle", "type": "collection", "entry": {"resource": _P}},
    "no_entry": {"resourceType": "Bundle", "type": "collection", "identifier": {"value": "x"}},
    "empty_entry_bad_type": {"resourceType": "Bundle", "type": "nonsense", "entry": []},
    "empty_entry": {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []},
    # written below with a second ``resourceType`` after its entries: the last one stands
    "resource_type_twice": {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": _P}, {"resource": dict(_P, id="p2")}],
    },
    "entry_null": {"resourceType": "Bundle", "type": "collection", "entry": None},
    "duplicate_full_url": {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "http://x/Patient/p1", "resource": _P},
            {"fullUrl": "http://x/Patient/p1", "resource": _P},
            {"fullUrl": "http://x/Patient/p1", "resource": dict(_P, meta={"versionId": "2"})},
        ],
    },
    "one_bad_envelope": {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": _P}, {"resource": _P, "bogus": 1}, "text", [1]],
    },
    "bad_shell": {"resourceType": "Bundle", "type": "collection", "total": "x", "entry": [{}]},
    # written below with its ``entry`` key twice: the last one stands, as for a whole read
    "entry_twice": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": _P}]},
    "urn_ids": {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry.item": {"not": "an entry"},
        "entry": [
            {
                "fullUrl": "urn:uuid:6f1b9d3c-0000-4000-8000-000000000009",
                "resource": {"resourceType": "Patient", "meta": {"versionId": ["a"]}},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"request": {"method": "DELETE", "url": "Patient/p2"}},
            {"fullUrl": "Patient/p3", "resource": {"resourceType": "Patient", "id": 3}},
            {"resource": "not an object"},
        ],
    },
}


@pytest.mark.parametrize("name", sorted(_STREAM_CASES))
@pytest.mark.parametrize("packed", [False, True])
def test_a_streamed_bundle_is_accounted_as_one_read_whole(
    tmp_path: Path, name: str, packed: bool
) -> None:
    """The streamed path (above STREAM_JSON_BYTES, here forced with stream_above=0) yields the
    records, reasons, bytes and urn maps the whole-file path does."""
    from fhirlake.readers import SourceFile

    data = orjson.dumps(_STREAM_CASES[name])
    if name == "entry_twice":
        earlier = b'"entry":[{"resource":{"resourceType":"Patient","id":"p0"}},{}],'
        data = data.replace(b'"entry":', earlier + b'"entry":')
    if name == "resource_type_twice":
        data = data[:-1] + b',"resourceType":"Patient"}'
    path = tmp_path / ("a.json.gz" if packed else "a.json")
    path.write_bytes(_gz(data) if packed else data)
    source = SourceFile(0, path, "json")

    def seen(stream_above: int | None) -> list[Any]:
        return [
            (r.position, r.raw, r.error, r.bundle.urn_map if r.bundle else None)
            for r in iter_records(source, stream_above)
        ]

    whole = seen(None)
    assert whole  # every case holds at least one record
    assert seen(0) == whole


def test_a_bundle_with_no_entry_to_report_on_is_one_record(tmp_path: Path) -> None:
    """A Bundle whose ``entry`` is an empty array came in as one record, as one without
    ``entry`` does: it is checked as the resource it is, and fails ele-1, never dropped
    unaccounted. A document whose last ``resourceType`` is not Bundle is one record too, read
    whole or streamed."""
    (tmp_path / "empty.json").write_bytes(
        orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": []})
    )
    (tmp_path / "none.json").write_bytes(
        orjson.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0})
    )
    (tmp_path / "twice.json").write_bytes(
        b'{"resourceType":"Bundle","type":"collection","entry":[{"resource":'
        + orjson.dumps(_P)
        + b'}],"resourceType":"Patient"}'
    )
    files, _ = list_batch_files(tmp_path)
    for stream_above in (None, 0):
        records = {f.path.name: list(iter_records(f, stream_above)) for f in files}
        assert {name: len(found) for name, found in records.items()} == {
            "empty.json": 1,
            "none.json": 1,
            "twice.json": 1,
        }
        empty = records["empty.json"][0]
        assert empty.error is None and empty.raw is not None
        checked = check_record(empty.raw)
        assert checked.code == "schema_violation"
        assert checked.message == "Bundle.entry: empty element (ele-1)"
        assert check_record(records["none.json"][0].raw or b"").code is None
        twice = records["twice.json"][0]
        assert twice.error is None and check_record(twice.raw or b"").code == "schema_violation"


# Bundles whose numbers orjson cannot write: an integer beyond 64 bits (a double to orjson),
# the largest and smallest it keeps as integers, decimals with more digits than a double holds,
# and (its own file) a number beyond a double's range, which no read takes as JSON
_OBS = b'{"resourceType":"Observation","id":"o%d","valueInteger":%b}'
_NUMBER_CASES = {
    "integers": b'{"resourceType":"Bundle","type":"collection","entry":['
    + b",".join(
        b'{"resource":' + _OBS % (i, number) + b"}"
        for i, number in enumerate(
            [
                b"123456789012345678901234567890",
                b"18446744073709551615",
                b"18446744073709551616",
                b"-9223372036854775808",
                b"-9223372036854775809",
                b"0.1000000000000000055511151231257827",
                b"1.50",
                b"-0.0",
                b"2e5",
            ]
        )
    )
    + b"]}",
    "infinite": b'{"resourceType":"Bundle","type":"collection","entry":['
    + b'{"resource":'
    + _OBS % (0, b"7")
    + b"},"
    + b'{"resource":'
    + _OBS % (1, b"1e400")
    + b"}]}",
    # an integer literal beyond a double's range: float() raises on it, where 1e400 is inf
    "infinite_integer": b'{"resourceType":"Bundle","type":"collection","entry":['
    + b'{"resource":'
    + _OBS % (0, b"7")
    + b"},"
    + b'{"resource":'
    + _OBS % (1, b"1" + b"0" * 400)
    + b"}]}",
}


@pytest.mark.parametrize("name", sorted(_NUMBER_CASES))
def test_a_streamed_bundle_reads_numbers_as_a_whole_read_does(tmp_path: Path, name: str) -> None:
    """An integer beyond 64 bits stopped the streamed read (ijson's floats overflow), and the
    whole Bundle became one unreadable record where a whole read keeps every entry; the bytes
    of each entry, the reasons and the positions are the whole read's."""
    from fhirlake.readers import SourceFile

    path = tmp_path / "a.json"
    path.write_bytes(_NUMBER_CASES[name])
    source = SourceFile(0, path, "json")

    def seen(stream_above: int | None) -> list[Any]:
        return [(r.position, r.raw, r.error) for r in iter_records(source, stream_above)]

    whole = seen(None)
    if name == "integers":
        assert [orjson.loads(raw or b"")["valueInteger"] for _, raw, _ in whole] == [
            1.2345678901234568e29,
            18446744073709551615,
            1.8446744073709552e19,
            -9223372036854775808,
            -9.223372036854776e18,
            0.1,
            1.5,
            -0.0,
            200000.0,
        ]
    else:
        assert [error[0] for _, _, error in whole if error] == ["invalid_json"]
    streamed = seen(0)
    assert [bool(error) and error[0] for _, _, error in streamed] == [
        bool(error) and error[0] for _, _, error in whole
    ]
    if name == "integers":  # an unreadable file's one record holds its bytes in a whole read only
        assert [(position, raw) for position, raw, _ in streamed] == [
            (position, raw) for position, raw, _ in whole
        ]


def test_lines_of_vertical_tab_or_form_feed_are_records_not_blanks(tmp_path: Path) -> None:
    """An NDJSON line is blank when it holds JSON whitespace only (space, tab, CR, LF)."""
    from fhirlake.readers import SourceFile

    data = _lines(1) + b"\n\x0b\n\x0c\n \t\r\n\n"
    expected = [line for line in data.split(b"\n") if line.strip(b" \t\r\n")]
    path = tmp_path / "a.ndjson"
    path.write_bytes(data)
    records = list(iter_records(SourceFile(0, path, "ndjson")))
    assert [r.raw for r in records] == expected == [_lines(1), b"\x0b", b"\x0c"]
    assert [check_record(r.raw or b"").code for r in records] == [
        None,
        "invalid_json",
        "invalid_json",
    ]


def test_a_utf16_ndjson_file_is_one_record(tmp_path: Path) -> None:
    from fhirlake.readers import SourceFile

    data = "".join(line + "\n" for line in _lines(3).decode().split("\n")).encode("utf-16")
    path = tmp_path / "a.ndjson"
    path.write_bytes(data)
    records = list(iter_records(SourceFile(0, path, "ndjson")))
    assert [(r.position, r.raw) for r in records] == [(1, data)]
    assert records[0].error and records[0].error[0] == "invalid_json"
    assert "UTF-16" in records[0].error[1] and MARK not in records[0].error[1]
    too_long = list(iter_records(SourceFile(0, path, "ndjson"), max_line_bytes=len(data) - 1))
    assert [(r.position, r.raw) for r in too_long] == [(1, None)]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_utf16_or_utf32_ndjson_file_without_a_mark_is_one_record(
    tmp_path: Path, codec: str
) -> None:
    """Without a byte-order mark too (``bcp -w``, ``iconv -t UTF-16LE``), told by its first
    character's zero bytes: cut at each 0x0a byte, it was a record a line, every later line a
    byte off, and a name holding U+040A (Њ, 0x0a in UTF-16) cut in two."""
    from fhirlake.readers import SourceFile

    text = "".join(line + "\n" for line in _lines(3).decode().split("\n"))
    data = text.replace('"', '"Њ', 1).encode(codec)
    path = tmp_path / "a.ndjson"
    path.write_bytes(data)
    records = list(iter_records(SourceFile(0, path, "ndjson")))
    assert [(r.position, r.raw) for r in records] == [(1, data)]
    assert records[0].error and records[0].error[0] == "invalid_json"
    assert "no byte-order mark" in records[0].error[1]


def test_gzip_data_in_a_file_read_as_text_is_one_record_saying_so(tmp_path: Path) -> None:
    """Compressed bytes in a file not named .gz, or a .gz file compressed twice: its 0x0a
    bytes end no line, so it is one record (as a UTF-16 file is), whose reason names gzip, not
    as many records as the compressed bytes hold 0x0a bytes, each with a UTF-8 error."""
    from fhirlake.readers import SourceFile

    text = b"".join(_lines(200).split(b"\n")[i] + b"\n" for i in range(200))
    packed = gzip.compress(text, mtime=0)
    assert packed.count(b"\n") > 1  # read as lines, it would be several records
    (tmp_path / "named_plain.ndjson").write_bytes(packed)
    (tmp_path / "twice.ndjson.gz").write_bytes(gzip.compress(packed, mtime=0))
    (tmp_path / "named_plain.json").write_bytes(packed)
    files, _ = list_batch_files(tmp_path)
    for source in files:
        records = list(iter_records(SourceFile(source.index, source.path, source.kind)))
        assert [(r.position, r.raw) for r in records] == [(1, packed)], source.name
        (record,) = records
        assert record.error and record.error[0] == "invalid_json"
        assert "gzip data" in record.error[1] and MARK not in record.error[1]


def test_a_utf16_ndjson_file_cut_short_is_its_one_record_with_every_byte_read(
    tmp_path: Path,
) -> None:
    """A gzip of a UTF-16 NDJSON file, cut inside its data: the file is one record, so the
    record for the rest of it is that record (position 1), holding every byte decompressed,
    its first line included (which the first 0x0a byte of its first newline ends)."""
    from fhirlake.readers import SourceFile

    data = "".join(line + "\n" for line in _lines(40).decode().split("\n")).encode("utf-16")
    packed = _gz(data)
    path = tmp_path / "a.ndjson.gz"
    path.write_bytes(packed[: len(packed) // 2])
    records = list(iter_records(SourceFile(0, path, "ndjson")))
    assert len(records) == 1
    (record,) = records
    assert record.error and record.error[0] == "unreadable_file"
    assert record.position == 1
    assert record.raw and len(record.raw) > data.index(b"\n\x00") + 2
    assert data.startswith(record.raw)


def test_a_file_the_process_may_not_read_fails_naming_its_index_not_quarantined(
    tmp_path: Path, refuse_reading: Any
) -> None:
    """A permission error says nothing of the file's content: no record is made up for it (it
    would be accounted for as bad input and never read again); the reader raises, naming the
    file by its index in the batch, not by its name (names can hold PHI)."""
    from fhirlake.readers import FileNotReadableError

    folder = tmp_path / "batch"
    folder.mkdir()
    line = b'{"resourceType": "Patient", "id": "p1"}\n'
    (folder / "a.ndjson").write_bytes(line * 3)
    secret = folder / "Quillfeather_Marisol.ndjson.gz"
    secret.write_bytes(gzip.compress(line * 5))
    allow = refuse_reading(secret)
    files, _ = list_batch_files(folder)
    assert [f.path.name for f in files] == ["Quillfeather_Marisol.ndjson.gz", "a.ndjson"]
    with pytest.raises(FileNotReadableError) as caught:
        list(iter_records(files[0]))
    assert caught.value.file_index == 0
    assert (caught.value.error_type, caught.value.errno_name) == ("PermissionError", "EACCES")
    assert "Quillfeather" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert len(list(iter_records(files[1]))) == 3
    # what tells the environment from the content is the errno: a cut gzip (EOFError) and one
    # that is no gzip (BadGzipFile, an OSError without errno) stay the file's unreadable rest
    whole = gzip.compress(line * 50)
    (folder / "c.ndjson.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "d.ndjson.gz").write_bytes(b"not gzip at all\n")
    files, _ = list_batch_files(folder)
    for source in files[2:]:
        last = list(iter_records(source))[-1]
        assert last.error is not None and last.error[0] == "unreadable_file"
    allow()
    assert [r.error for r in iter_records(files[0])] == [None] * 5


@pytest.mark.parametrize("packed", [False, True])
def test_a_bundle_above_the_threshold_is_never_held_whole(tmp_path: Path, packed: bool) -> None:
    """Above ``stream_above`` a Bundle is read entry by entry: what reading one holds at once
    does not grow with its entries (it was parsed whole: 58 MB of memory for 2.8 MB here, 1.1
    GiB for a Bundle of 93 MB). A gzip's threshold is its data's size, not its own (a 3.6 MB
    gzip of that Bundle was parsed whole)."""
    import tracemalloc

    from fhirlake.readers import SourceFile

    entry = {"resource": {"resourceType": "Observation", "id": "o", "status": "final"}}

    def peak_reading(entries: int) -> tuple[int, int, int]:
        data = orjson.dumps(
            {"resourceType": "Bundle", "type": "collection", "entry": [entry] * entries}
        )
        path = tmp_path / (f"{entries}.json.gz" if packed else f"{entries}.json")
        path.write_bytes(_gz(data) if packed else data)
        list(iter_records(SourceFile(0, path, "json"), 0))  # what the first read loads, once
        tracemalloc.start()
        try:
            count = sum(1 for _ in iter_records(SourceFile(0, path, "json"), len(data) // 8))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return count, peak, len(data)

    count, peak, size = peak_reading(20_000)
    assert count == 20_000
    count, double_peak, _ = peak_reading(40_000)
    assert count == 40_000
    assert double_peak < peak + size // 8


def _bundle_of(*values: bytes) -> bytes:
    """A Bundle of Patients whose ``name[0].family`` are ``values`` (JSON string bodies)."""
    entries = (
        b'{"resource":{"resourceType":"Patient","id":"p%d","name":[{"family":"%b"}]}}' % (i, v)
        for i, v in enumerate(values)
    )
    return b'{"resourceType":"Bundle","type":"collection","entry":[' + b",".join(entries) + b"]}"


def _nested(depth: int) -> bytes:
    """A Bundle whose first entry's extension nests arrays until the document is ``depth``
    levels deep (the Bundle, entry, entry item, resource: four levels before it)."""
    arrays = depth - 4
    extension = b"[" * arrays + b"]" * arrays
    return (
        b'{"resourceType":"Bundle","type":"collection","entry":['
        b'{"resource":{"resourceType":"Patient","id":"p0","extension":%b}},'
        b'{"resource":{"resourceType":"Patient","id":"p1"}}]}' % extension
    )


# documents a whole read (orjson) refuses, and controls it takes
_REFUSED_WHOLE = {
    "lone_high_surrogate": _bundle_of(b"Ada\\ud800", b"Bo"),
    "lone_low_surrogate": _bundle_of(b"Ada\\udc00", b"Bo"),
    "high_then_no_low": _bundle_of(b"Ada\\ud800\\u0041", b"Bo"),
    "high_then_high": _bundle_of(b"Ada\\ud800\\ud800", b"Bo"),
    "high_at_end_of_string": _bundle_of(b"Ada\\ud83d", b"\\ude00"),
    "surrogate_bytes": _bundle_of(b"Ada\xed\xa0\x80", b"Bo"),
    "integer_beyond_double": _bundle_of(b"Ada", b"Bo").replace(
        b'"id":"p1"', b'"id":"p1","multipleBirthInteger":1' + b"0" * 400
    ),
    "nested_too_deeply": _nested(1025),
}
_TAKEN_WHOLE = {
    "surrogate_pair": _bundle_of(b"Ada\\ud83d\\ude00", b"Bo"),
    "escaped_backslash_then_text": _bundle_of(b"Ada\\\\ud800", b"Bo\\\\\\udbff\\udfff"),
    "nested_to_the_limit": _nested(1024),
}


@pytest.mark.parametrize("name", sorted(_REFUSED_WHOLE) + sorted(_TAKEN_WHOLE))
def test_a_streamed_bundle_refuses_what_a_whole_read_refuses(tmp_path: Path, name: str) -> None:
    """A lone UTF-16 surrogate escape, surrogate bytes, an integer beyond a double's range and
    nesting beyond 1,024 levels make a whole read one ``invalid_json`` record. Streamed, the
    integer and the surrogate bytes raised out of the read (the batch's ingest failed, no
    record accounted for), a lone high surrogate was read as ``?`` (the record accepted, its
    text changed) and the nesting gave each entry a record: now the streamed read is one
    ``invalid_json`` record too, and takes what a whole read takes, as it reads it."""
    from fhirlake.readers import SourceFile

    data = _REFUSED_WHOLE.get(name) or _TAKEN_WHOLE[name]
    path = tmp_path / "a.json"
    path.write_bytes(data)
    source = SourceFile(0, path, "json")
    whole = [(r.position, r.raw, r.error) for r in iter_records(source)]
    streamed = [(r.position, r.raw, r.error) for r in iter_records(source, stream_above=0)]
    if name in _REFUSED_WHOLE:
        assert [(p, e and e[0]) for p, _, e in whole] == [(1, "invalid_json")]
        assert [(p, e) for p, _, e in streamed] == [
            (1, ("invalid_json", "not valid JSON (streamed)"))
        ]
    else:
        assert streamed == whole and len(whole) == 2


@pytest.mark.parametrize("shift", range(-7, 8))
@pytest.mark.parametrize("pair", [True, False])
def test_surrogate_escapes_across_a_read_boundary(tmp_path: Path, shift: int, pair: bool) -> None:
    """The escapes are checked as the parser reads the file, 64 KiB at a time: a pair cut by
    a read's end is still a pair, and a lone surrogate cut by it still refused."""
    from fhirlake.readers import SourceFile

    head = _bundle_of(b"", b"Bo").split(b'"family":"')[0] + b'"family":"'
    escape = b"\\ud83d\\ude00" if pair else b"\\ud83d\\u0041"
    pad = b"a" * (64 * 1024 - len(head) - 6 + shift)  # the boundary moves across the escape
    path = tmp_path / "a.json"
    path.write_bytes(_bundle_of(pad + escape, b"Bo"))
    records = list(iter_records(SourceFile(0, path, "json"), stream_above=0))
    assert [r.error and r.error[0] for r in records] == ([None, None] if pair else ["invalid_json"])


def test_a_json_document_longer_than_a_record_may_be_is_one_record_unread(
    tmp_path: Path,
) -> None:
    """A ``.json`` document that is no Bundle to stream (one resource, a JSON array of
    resources, a Bundle without entries, invalid JSON) and longer than ``max_line_bytes`` is
    one ``record_too_large`` record, its bytes not kept: it was read and parsed whole, and
    carried whole to validation and the quarantine, whatever its size. Reading stops at the
    limit: the cut gzip below fails after it, and is still too large, not unreadable."""
    from fhirlake.readers import SourceFile

    note = "x" * 5_000
    documents = {
        "one.json": orjson.dumps({"resourceType": "Patient", "id": "p1", "note": note}),
        "array.json": orjson.dumps(
            [{"resourceType": "Patient", "id": f"p{i}"} for i in range(300)]
        ),
        "no_entry.json": orjson.dumps({"resourceType": "Bundle", "type": "collection", "x": note}),
        "invalid.json": b'{"resourceType": "Patient", "note": "' + note.encode(),
    }
    cut = _gz(documents["one.json"] + b" " * 200_000)
    for name, data in documents.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / f"{name}.gz").write_bytes(_gz(data))
    (tmp_path / "cut.json.gz").write_bytes(cut[: len(cut) - 40])
    files, _ = list_batch_files(tmp_path)
    assert len(files) == 9
    for stream_above in (None, 0):
        for source in files:
            records = list(iter_records(source, stream_above, max_line_bytes=1_000))
            assert [(r.position, r.raw, r.error and r.error[0]) for r in records] == [
                (1, None, "record_too_large")
            ], source.path.name
            assert records[0].error is not None and "x" * 10 not in records[0].error[1]
    # a document of the limit is read whole, as before
    small = tmp_path / "small" / "p.json"
    small.parent.mkdir()
    small.write_bytes(orjson.dumps({"resourceType": "Patient", "id": "p1"}))
    at_limit = SourceFile(0, small, "json")
    size = small.stat().st_size
    assert [r.raw for r in iter_records(at_limit, max_line_bytes=size)] == [small.read_bytes()]
    over = list(iter_records(at_limit, max_line_bytes=size - 1))
    assert [r.error and r.error[0] for r in over] == ["record_too_large"]


def test_a_bundle_entry_longer_than_a_record_may_be_is_one_record_unread(
    tmp_path: Path,
) -> None:
    """An entry of a Bundle longer than ``max_bytes`` is a ``record_too_large`` record, its
    bytes dropped as it is read, as an NDJSON line is: a streamed Bundle carried a 100 MB
    entry whole to validation and the vault (874 MiB of memory, where the same resource on
    an NDJSON line is refused at 322 MiB). The entries around it are read as usual, and a
    Bundle longer than a record may be is streamed whatever ``stream_above`` says."""
    from fhirlake.readers import SourceFile

    big = {"resourceType": "Binary", "id": "b1", "contentType": "text/plain", "data": "x" * 5_000}
    small = [{"resourceType": "Patient", "id": f"p{i}"} for i in range(2)]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": small[0]}, {"resource": big}, {"resource": small[1]}],
    }
    data = orjson.dumps(bundle)
    (tmp_path / "a.json").write_bytes(data)
    (tmp_path / "b.json.gz").write_bytes(_gz(data))
    for name in ("a.json", "b.json.gz"):
        for stream_above in (None, 0):
            source = SourceFile(0, tmp_path / name, "json")
            records = list(iter_records(source, stream_above, max_line_bytes=1_000))
            assert [(r.position, r.raw, r.error and r.error[0]) for r in records] == [
                (1, orjson.dumps(small[0]), None),
                (2, None, "record_too_large"),
                (3, orjson.dumps(small[1]), None),
            ], (name, stream_above)
            assert records[1].error is not None and "x" * 10 not in records[1].error[1]
    # with the limit above the entry, it is read
    records = list(iter_records(SourceFile(0, tmp_path / "a.json", "json"), 0))
    assert [r.raw for r in records][1] == orjson.dumps(big)


@pytest.mark.parametrize(
    ("name", "resource"),
    [
        # under the limit in characters, over it in bytes: é is two bytes, 😀 four, \u00e9 six
        ("two-byte", {"resourceType": "Basic", "id": "b", "code": {"text": "é" * 6_000}}),
        ("four-byte", {"resourceType": "Basic", "id": "b", "code": {"text": "😀" * 3_000}}),
        ("escaped", {"resourceType": "Basic", "id": "b", "code": {"text": "\u0001" * 2_000}}),
        # under the limit in bytes: many short keys and objects, no more than their text
        (
            "structured",
            {
                "resourceType": "Basic",
                "id": "b",
                "code": {"coding": [{"system": "s", "code": str(i)} for i in range(170)]},
                "extension": [{"url": "u", "valueInteger": 1} for _ in range(80)],
            },
        ),
    ],
)
def test_a_streamed_bundle_entry_is_held_to_the_limit_an_ndjson_line_is(
    tmp_path: Path, name: str, resource: dict[str, Any]
) -> None:
    """The same resource is refused as ``record_too_large`` in a streamed Bundle exactly when
    it is on an NDJSON line: an entry was measured by its characters and 8 for every other
    parser event, so non-ASCII text (and escapes) passed at up to 4 (6) times the limit in
    bytes, while short keys and objects (FHIR's usual shape: 1.23 times its bytes over
    Synthea's entries) were refused well below it."""
    from fhirlake.readers import SourceFile

    limit = 10_000
    text = json.dumps(resource, ensure_ascii=name == "escaped")
    line = text.encode()
    (tmp_path / "r.ndjson").write_bytes(line + b"\n")
    padding = {"resourceType": "Basic", "id": "pad"}
    bundle = {"resourceType": "Bundle", "type": "collection"}
    entries = [orjson.dumps({"resource": padding}), b'{"resource":' + line + b"}"]
    data = orjson.dumps(bundle)[:-1] + b',"entry":[' + b",".join(entries) + b"]}"
    (tmp_path / "b.json").write_bytes(data)
    line_verdict = [
        r.error and r.error[0]
        for r in iter_records(SourceFile(0, tmp_path / "r.ndjson", "ndjson"), max_line_bytes=limit)
    ]
    entry_verdict = [
        r.error and r.error[0]
        for r in iter_records(SourceFile(0, tmp_path / "b.json", "json"), 0, limit)
    ]
    over = len(line) > limit
    assert abs(len(line) - limit) > 1_000, len(line)  # clear of the measure's tolerance
    assert line_verdict == ["record_too_large" if over else None]
    assert entry_verdict == [None, line_verdict[0]], name
