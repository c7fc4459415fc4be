from __future__ import annotations

import gzip
import json
from pathlib import Path

import orjson

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
