"""Fuzzing ingest and de-identification with mutated synthetic records.

Seeds come from the project's synthetic generator (one patient's Bundle, Bulk-export NDJSON
lines). Hypothesis mutates some of them (wrong types, unknown resource types nested in
``contained``, extreme and partial dates, huge strings, deep nesting, unknown elements, bad ids,
references to other servers, invalid UTF-8, truncated lines, truncated gzip) and every
example goes through ``ingest_batch`` and ``deidentify_batch`` (research profile). Each
mutated value carries a marker string: it must never reach a quarantine message, a log
record, a report or a de-identification error, and every record must be accounted for.
"""

from __future__ import annotations

import copy
import gzip
import itertools
import logging
import re
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from deid.policy import Policy
from deid.release import deidentify_batch
from fhirlake.synthetic import generate
from vault import warehouse
from vault.ingest import ingest_batch, reconcile_batch
from vault.keys import FileKeyProvider, init_keyring

MARK = "Qz9FuzzMarker"
TODAY = date(2026, 1, 1)
EXTREME_DATES = [
    "9999-12-31",
    "0001-01-01",
    "9999-12-31T23:59:59+14:00",
    "0001-01-01T00:00:00-12:00",
    "9999-12-31T23:59:59.999999Z",
    "0001",
    "9999",
    "0001-01",
    "9999-12",
    "2020",
    "2020-02",
    "2020-02-30",
    "2020-13-01",
    "0000-00-00",
    "2016-12-31T23:59:60Z",
    f"2020-01-01{MARK}",
]
_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?(T.*)?$")
BUNDLE_ENTRIES = 40
NDJSON_LINES = {"Patient": 2, "Encounter": 15, "Observation": 15, "Condition": 5, "Claim": 3}


@dataclass
class Seeds:
    bundle: dict[str, Any]
    lines: list[bytes]
    names: list[str]  # the seed patients' family names: PHI that must not leak either


class World:
    """The module's seeds, warehouse and keys (a plain class: Hypothesis prints the arguments
    of a failing example, and a dataclass would print every seed)."""

    def __init__(self, seeds: Seeds, wh: Path, provider: FileKeyProvider, root: Path) -> None:
        self.seeds, self.warehouse, self.provider, self.root = seeds, wh, provider, root
        self.counter = itertools.count()

    def __repr__(self) -> str:
        return f"World({self.root})"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("fuzz")
    generate(tmp / "bundle", 2, seed=11, fmt="bundle")
    generate(tmp / "ndjson", 2, seed=11, fmt="ndjson")
    bundle = orjson.loads((tmp / "bundle" / "000000.json").read_bytes())
    bundle["entry"] = bundle["entry"][:BUNDLE_ENTRIES]
    lines: list[bytes] = []
    for rtype, count in NDJSON_LINES.items():
        lines += (tmp / "ndjson" / f"{rtype}.ndjson").read_bytes().splitlines()[:count]
    names = [
        name["family"]
        for line in (tmp / "ndjson" / "Patient.ndjson").read_bytes().splitlines()
        for name in orjson.loads(line).get("name", [])
        if len(name.get("family", "")) >= 5
    ]
    init_keyring(tmp / "keyring.json")
    provider = FileKeyProvider.load(tmp / "keyring.json")
    return World(Seeds(bundle, lines, names), tmp / "w.duckdb", provider, tmp)


# -- mutations of one resource ------------------------------------------------------------


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) of a resource below its top level keys and ``resourceType``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "resourceType":
                out.append((node, key))
            _slots(value, out)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.append((node, index))
            _slots(value, out)
    return out


@dataclass
class Planted:
    # placeholder → the JSON text it stands for (nesting no encoder writes, 128-bit integers)
    raw: dict[str, bytes] = field(default_factory=dict)
    extreme_date: bool = False
    # deeper than the JSON parser reads (1024 levels): a Bundle file then fails as a whole
    beyond_parser: bool = False

    def text(self, value: bytes) -> str:
        placeholder = f"raw{len(self.raw)}{MARK}"
        self.raw[placeholder] = value
        return placeholder


def _mutate(data: st.DataObject, resource: dict[str, Any], planted: Planted) -> None:
    kind = data.draw(
        st.sampled_from(
            [
                "wrong_type",
                "contained",
                "date",
                "huge",
                "deep",
                "element",
                "resource_type",
                "id",
                "reference",
            ]
        )
    )
    slots = _slots(resource, [])
    slot = slots[data.draw(st.integers(0, len(slots) - 1))] if slots else (resource, MARK)
    container, key = slot
    if kind == "wrong_type":
        value = data.draw(
            st.sampled_from([12345, 1.5e308, "bigint", True, MARK, [], {}, [MARK], {MARK: 1}])
        )
        container[key] = planted.text(b"-1180591620717411303424") if value == "bigint" else value
    elif kind == "contained":
        inner = {"resourceType": data.draw(st.sampled_from([MARK, "Money", "Patientt"])), "x": MARK}
        nested = data.draw(st.booleans())
        resource["contained"] = [
            {"resourceType": "Patient", "id": "c0", "contained": [inner]} if nested else inner
        ]
    elif kind == "date":
        dates = [(c, k) for c, k in slots if isinstance(c[k], str) and _DATE.match(c[k])]
        target = dates[data.draw(st.integers(0, len(dates) - 1))] if dates else None
        value = data.draw(st.sampled_from(EXTREME_DATES))
        if target is None:
            resource["meta"] = {"lastUpdated": value}
        else:
            target[0][target[1]] = value
        planted.extreme_date = True
    elif kind == "huge":
        container[key] = MARK * data.draw(st.integers(1_000, 40_000))
    elif kind == "deep":
        depth = data.draw(st.sampled_from([30, 120, 300, 1100]))
        planted.beyond_parser |= depth > 1024
        container[key] = planted.text(b"[" * depth + orjson.dumps(MARK) + b"]" * depth)
    elif kind == "element":
        container[key] = {MARK: MARK} if data.draw(st.booleans()) else container[key]
        resource[MARK] = MARK
    elif kind == "resource_type":
        resource["resourceType"] = data.draw(st.sampled_from([MARK, "Money", 5, "", None]))
    elif kind == "id":
        resource["id"] = data.draw(st.sampled_from([f"{MARK}!", MARK * 10, 42, [MARK]]))
    else:
        resource["subject"] = {
            "reference": data.draw(
                st.sampled_from(
                    [
                        "http://other.example/fhir/Patient/1",
                        f"urn:uuid:{MARK}",
                        f"Patient?identifier=x|{MARK}",
                        f"Patient/{MARK}",
                    ]
                )
            )
        }


def _dumps(obj: Any, planted: Planted) -> bytes:
    """JSON bytes with each placeholder expanded: orjson writes neither more than 255 levels
    nor integers beyond 64 bits, and readers must cope with both."""
    raw = orjson.dumps(obj)
    for placeholder, text in planted.raw.items():
        raw = raw.replace(orjson.dumps(placeholder), text)
    return raw


# -- one example: a batch folder ----------------------------------------------------------


@dataclass
class Batch:
    folder: Path
    expected_records: int | None  # None when a file is cut short
    planted: Planted


def _bundle_file(data: st.DataObject, seeds: Seeds, folder: Path, planted: Planted) -> int | None:
    bundle = copy.deepcopy(seeds.bundle)
    entries = bundle["entry"]
    for index in data.draw(st.sets(st.integers(0, len(entries) - 1), max_size=4)):
        _mutate(data, entries[index]["resource"], planted)
    raw = _dumps(bundle, planted)
    damage = data.draw(st.sampled_from(["none", "none", "gzip", "cut_gzip", "cut", "utf8"]))
    if damage == "cut":
        raw = raw[: data.draw(st.integers(1, len(raw) - 1))]
    elif damage == "utf8":
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + b"\xff\xfe\xc3" + raw[at:]
    if damage in ("gzip", "cut_gzip"):
        packed = gzip.compress(raw, mtime=0)
        if damage == "cut_gzip":
            packed = packed[: data.draw(st.integers(1, len(packed) - 1))]
        (folder / "bundle.json.gz").write_bytes(packed)
    else:
        (folder / "bundle.json").write_bytes(raw)
    whole = damage in ("none", "gzip") and not planted.beyond_parser
    return len(entries) if whole else None


def _ndjson_file(data: st.DataObject, seeds: Seeds, folder: Path, planted: Planted) -> int | None:
    lines = list(seeds.lines)
    for index in data.draw(st.sets(st.integers(0, len(lines) - 1), max_size=6)):
        damage = data.draw(st.sampled_from(["resource", "resource", "utf8", "cut"]))
        if damage == "resource":
            resource = orjson.loads(lines[index])
            _mutate(data, resource, planted)
            lines[index] = _dumps(resource, planted)
        elif damage == "utf8":
            at = data.draw(st.integers(0, len(lines[index])))
            lines[index] = lines[index][:at] + MARK.encode() + b"\xff" + lines[index][at:]
        else:
            lines[index] = lines[index][: data.draw(st.integers(1, len(lines[index]) - 1))]
    raw = b"\n".join(lines) + b"\n"
    if data.draw(st.booleans()):
        (folder / "Resources.ndjson").write_bytes(raw)
        return len(lines)
    packed = gzip.compress(raw, mtime=0)
    if data.draw(st.booleans()):
        (folder / "Resources.ndjson.gz").write_bytes(packed)
        return len(lines)
    (folder / "Resources.ndjson.gz").write_bytes(packed[: data.draw(st.integers(1, len(packed)))])
    return None


def _batch(data: st.DataObject, world: World) -> Batch:
    folder = Path(tempfile.mkdtemp(dir=world.root))
    planted = Planted()
    counts = [
        _bundle_file(data, world.seeds, folder, planted),
        _ndjson_file(data, world.seeds, folder, planted),
    ]
    expected = None if None in counts else sum(c or 0 for c in counts)
    return Batch(folder, expected, planted)


# -- the property ---------------------------------------------------------------------------


def _leaks(text: str, seeds: Seeds) -> list[str]:
    return [s for s in (MARK, *seeds.names) if s.lower() in text.lower()]


def _release(world: World, batch_id: str) -> tuple[str, list[str]]:
    """De-identify the batch; the report and the error messages, as text to scan."""
    con = warehouse.connect(world.warehouse)
    try:
        report = deidentify_batch(
            con, world.provider, batch_id, Policy.shipped("research"), today=TODAY
        )
        errors = con.execute(
            "SELECT reason_code || ' ' || message FROM deid_errors WHERE batch_id = ?",
            [batch_id],
        ).fetchall()
    finally:
        con.close()
    return orjson.dumps(report.to_dict()).decode(), [m for (m,) in errors]


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    # no shrinking: an example costs a second, and the printed draws name the mutations
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_input_never_stops_or_leaks(
    data: st.DataObject, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    batch = _batch(data, world)
    batch_id = f"fuzz{next(world.counter)}"
    report = ingest_batch(world.warehouse, batch_id, batch.folder, world.provider, workers=1)
    assert report.records_in == report.accepted + report.quarantined
    if batch.expected_records is not None:
        assert report.records_in == batch.expected_records
    con = warehouse.connect(world.warehouse, read_only=True)
    try:
        assert reconcile_batch(con, batch_id).passed
        messages = [
            f"{code} {message}"
            for code, message in con.execute(
                "SELECT reason_code, message FROM quarantine WHERE batch_id = ?", [batch_id]
            ).fetchall()
        ]
    finally:
        con.close()
    for reason in report.quarantine_reasons:
        event(f"quarantined: {reason}")  # shown by --hypothesis-show-statistics
    deid_report, deid_errors = _release(world, batch_id)
    texts = [*messages, orjson.dumps(report.to_dict()).decode(), deid_report, *deid_errors]
    texts += [caplog.text]
    assert [leak for text in texts for leak in _leaks(text, world.seeds)] == []


@pytest.mark.parametrize("value", ["0001-01-01", "9999-12-31T23:59:59+14:00", "0001", "9999-12"])
def test_release_survives_extreme_dates(value: str, tmp_path: Path) -> None:
    """Valid R4 dates next to year 1 or 9999 are accepted at ingest; the release shifts,
    clamps or withholds them, and never fails on them (it once overflowed)."""
    init_keyring(tmp_path / "keyring.json")
    provider = FileKeyProvider.load(tmp_path / "keyring.json")
    land = tmp_path / "land"
    land.mkdir()
    records = []
    for i in range(6):  # both signs of the per-patient shift, whatever the keys
        records.append({"resourceType": "Patient", "id": f"p{i}", "birthDate": value[:10]})
        encounter = {
            "resourceType": "Encounter",
            "id": f"e{i}",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/p{i}"},
            "period": {"start": value, "end": value},
        }
        records.append(encounter)
    (land / "r.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in records))
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b", land, provider, workers=1)
    assert report.accepted == len(records)  # valid R4 dates: accepted at ingest
    con = warehouse.connect(wh)
    try:
        released = deidentify_batch(con, provider, "b", Policy.shipped("research"), today=TODAY)
    finally:
        con.close()
    assert released.released + released.withheld == len(records)


def test_release_keeps_other_servers_references_apart(tmp_path: Path) -> None:
    init_keyring(tmp_path / "keyring.json")
    provider = FileKeyProvider.load(tmp_path / "keyring.json")
    land = tmp_path / "land"
    land.mkdir()
    records = [{"resourceType": "Patient", "id": "1", "gender": "female"}]
    for rid, ref in (
        ("e-local", "Patient/1"),
        ("e-foreign", "http://other.example/fhir/Patient/1"),
    ):
        records.append(
            {
                "resourceType": "Encounter",
                "id": rid,
                "status": "finished",
                "class": {"code": "AMB"},
                "subject": {"reference": ref},
            }
        )
    (land / "r.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in records))
    wh = tmp_path / "w.duckdb"
    assert ingest_batch(wh, "b", land, provider, workers=1).external_references == 1
    con = warehouse.connect(wh)
    try:
        deidentify_batch(con, provider, "b", Policy.shipped("research"), today=TODAY)
        rows = con.execute(
            "SELECT patient_id, resource FROM deid_resources WHERE resource_type = 'Encounter'"
        ).fetchall()
    finally:
        con.close()
    subjects = {pid: orjson.loads(resource).get("subject") for pid, resource in rows}
    local = next(s for pid, s in subjects.items() if pid is not None)
    assert subjects[None] != local  # removed, or anything but the local patient's pseudonym
