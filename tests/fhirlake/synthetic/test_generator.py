"""Tests for the synthetic FHIR R4 generator."""

from __future__ import annotations

import base64
import tracemalloc
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirlake.synthetic import GenerationSummary, generate
from fhirlake.synthetic.defects import DEFECT_KINDS

Resource = dict[str, Any]

PATIENT_TYPES = {
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "Procedure",
    "Immunization",
    "Claim",
    "DocumentReference",
    "Consent",
}
SHARED_TYPES = {"Organization", "Location", "Practitioner"}
HEART_FAILURE = "84114007"
REFERENCE_DATE = datetime(2025, 12, 31, 23, 59)


# -- helpers -------------------------------------------------------------------------------


def _bundle_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("[0-9]*.json") if not p.name.endswith("_corrupt.json"))


def _bundles(out: Path) -> list[list[Resource]]:
    return [
        [e["resource"] for e in orjson.loads(p.read_bytes())["entry"]] for p in _bundle_files(out)
    ]


def _ndjson(out: Path) -> dict[str, list[Resource]]:
    return {
        p.stem: [orjson.loads(line) for line in p.read_bytes().splitlines()]
        for p in sorted(out.glob("*.ndjson"))
    }


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        for value in node.values():
            found += _references(value)
        return found
    if isinstance(node, list):
        return [ref for item in node for ref in _references(item)]
    return []


def _dt(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=None)


def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _validate(resource: Resource) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


@pytest.fixture(scope="module")
def bundle_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenerationSummary]:
    out = tmp_path_factory.mktemp("bundle")
    return out, generate(out, 200, seed=7)


@pytest.fixture(scope="module")
def bundles(bundle_run: tuple[Path, GenerationSummary]) -> list[list[Resource]]:
    return _bundles(bundle_run[0])


@pytest.fixture(scope="module")
def ndjson_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenerationSummary]:
    out = tmp_path_factory.mktemp("ndjson")
    return out, generate(out, 400, seed=11, fmt="ndjson")


@pytest.fixture(scope="module")
def ndjson_files(ndjson_run: tuple[Path, GenerationSummary]) -> dict[str, list[Resource]]:
    return _ndjson(ndjson_run[0])


# -- determinism and summary ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bundle", "ndjson"])
def test_same_seed_gives_identical_bytes(tmp_path: Path, fmt: str) -> None:
    a = generate(tmp_path / "a", 15, seed=3, fmt=fmt, defect_rate=0.05)  # type: ignore[arg-type]
    b = generate(tmp_path / "b", 15, seed=3, fmt=fmt, defect_rate=0.05)  # type: ignore[arg-type]
    c = generate(tmp_path / "c", 15, seed=4, fmt=fmt, defect_rate=0.05)  # type: ignore[arg-type]
    assert a == b
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert _tree(tmp_path / "a") != _tree(tmp_path / "c")
    assert (
        a.resources != c.resources
        or a.resources_by_type != c.resources_by_type
        or (_tree(tmp_path / "a") != _tree(tmp_path / "c"))
    )


def test_summary_file_matches_and_holds_counts_only(
    bundle_run: tuple[Path, GenerationSummary], bundles: list[list[Resource]]
) -> None:
    out, summary = bundle_run
    written = orjson.loads((out / "_generation.json").read_bytes())
    assert written == summary.to_dict()
    assert summary.patients == 200
    assert summary.files == 202  # one bundle per patient + organizations + practitioners
    assert summary.resources == sum(summary.resources_by_type.values()) == summary.records
    assert set(summary.defects_by_kind) == set(DEFECT_KINDS)
    assert not any(summary.defects_by_kind.values())
    entries = sum(len(b) for b in bundles)
    for name in ("organizations.json", "practitioners.json"):
        entries += len(orjson.loads((out / name).read_bytes())["entry"])
    assert entries == summary.resources
    text = (out / "_generation.json").read_text()
    first_patient = bundles[0][0]
    assert first_patient["name"][0]["family"] not in text


def test_rerun_replaces_earlier_output(tmp_path: Path) -> None:
    generate(tmp_path, 6, seed=1, defect_rate=0.3)
    (tmp_path / "notes.txt").write_text("kept")
    generate(tmp_path, 3, seed=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "000000.json",
        "000001.json",
        "000002.json",
        "_generation.json",
        "notes.txt",
        "organizations.json",
        "practitioners.json",
    ]


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, -1)
    with pytest.raises(ValueError):
        generate(tmp_path, 1, defect_rate=1.5)
    with pytest.raises(ValueError):
        generate(tmp_path, 1, fmt="csv")  # type: ignore[arg-type]


# -- content -------------------------------------------------------------------------------


def test_resource_mix_and_demographics(
    bundle_run: tuple[Path, GenerationSummary], bundles: list[list[Resource]]
) -> None:
    _, summary = bundle_run
    assert PATIENT_TYPES | SHARED_TYPES <= set(summary.resources_by_type)
    assert summary.resources_by_type["Organization"] >= 4  # 200 / 50
    over_89 = deny = deceased = contained = 0
    for resources in bundles:
        patient = resources[0]
        assert patient["resourceType"] == "Patient"
        end = _dt(patient.get("deceasedDateTime", "2025-12-31T23:59:00Z"))
        born = datetime.fromisoformat(patient["birthDate"])
        over_89 += (end - born).days / 365.25 >= 90
        deceased += "deceasedDateTime" in patient
        contained += any("contained" in r for r in resources)
        consents = [r for r in resources if r["resourceType"] == "Consent"]
        assert len(consents) == 1
        deny += consents[0]["provision"]["type"] == "deny"
        assert {r["resourceType"] for r in resources} >= {"Encounter", "Claim", "Consent"}
        kinds = {i["type"]["coding"][0]["code"] for i in patient["identifier"] if "type" in i}
        assert {"MR", "SS"} <= kinds
    n = len(bundles)
    assert 0.02 <= over_89 / n
    assert 0.01 <= deny / n <= 0.10
    assert 0.02 <= deceased / n <= 0.15
    assert 0.03 <= contained / n <= 0.2


def test_conditions_carry_snomed_and_icd10(bundles: list[list[Resource]]) -> None:
    expected = {"http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"}
    for resources in bundles:
        for r in resources:
            if r["resourceType"] == "Condition":
                assert {c["system"] for c in r["code"]["coding"]} == expected


def test_bundle_reference_integrity(bundle_run: tuple[Path, GenerationSummary]) -> None:
    out, _ = bundle_run
    identifiers = set()
    shared_refs = []
    for name in ("organizations.json", "practitioners.json"):
        bundle = orjson.loads((out / name).read_bytes())
        assert bundle["type"] == "batch"
        for e in bundle["entry"]:
            r = e["resource"]
            assert e["request"]["method"] == "PUT"
            for ident in r["identifier"]:
                identifiers.add(
                    f"{r['resourceType']}?identifier={ident['system']}|{ident['value']}"
                )
            assert e["request"]["url"] in identifiers
            shared_refs += _references(r)
    for path in _bundle_files(out):
        bundle = orjson.loads(path.read_bytes())
        assert bundle["type"] == "transaction"
        full_urls = {e["fullUrl"] for e in bundle["entry"]}
        assert len(full_urls) == len(bundle["entry"])
        for e in bundle["entry"]:
            r = e["resource"]
            assert e["fullUrl"] == f"urn:uuid:{r['id']}"
            assert e["request"] == {"method": "POST", "url": r["resourceType"]}
            contained = {f"#{c['id']}" for c in r.get("contained", [])}
            for ref in _references(r):
                if ref.startswith("urn:uuid:"):
                    assert ref in full_urls
                elif ref.startswith("#"):
                    assert ref in contained
                else:
                    assert "?identifier=" in ref
                    shared_refs.append(ref)
    assert shared_refs
    assert set(shared_refs) <= identifiers


def test_ndjson_reference_integrity(
    ndjson_run: tuple[Path, GenerationSummary], ndjson_files: dict[str, list[Resource]]
) -> None:
    _, summary = ndjson_run
    files = ndjson_files
    assert set(files) == PATIENT_TYPES | SHARED_TYPES
    assert {rt: len(rs) for rt, rs in files.items()} == summary.resources_by_type
    assert summary.files == len(files)
    ids = {f"{r['resourceType']}/{r['id']}" for rs in files.values() for r in rs}
    assert len(ids) == summary.resources
    for rt, resources in files.items():
        for r in resources:
            assert r["resourceType"] == rt
            contained = {f"#{c['id']}" for c in r.get("contained", [])}
            for ref in _references(r):
                assert ref in ids or ref in contained, ref


@pytest.mark.parametrize("fmt", ["bundle", "ndjson"])
def test_every_resource_validates_as_r4(tmp_path: Path, fmt: str) -> None:
    summary = generate(tmp_path, 40, seed=21, fmt=fmt)  # type: ignore[arg-type]
    count = 0
    if fmt == "bundle":
        resources = [r for b in _bundles(tmp_path) for r in b]
        for name in ("organizations.json", "practitioners.json"):
            resources += [
                e["resource"] for e in orjson.loads((tmp_path / name).read_bytes())["entry"]
            ]
    else:
        resources = [r for rs in _ndjson(tmp_path).values() for r in rs]
    for r in resources:
        _validate(r)
        count += 1
    assert count == summary.resources
    if fmt == "bundle":
        get_fhir_model_class("Bundle").model_validate(
            orjson.loads((tmp_path / "000000.json").read_bytes())
        )


def test_notes_mention_the_patient_by_name(bundles: list[list[Resource]]) -> None:
    checked = 0
    for resources in bundles[:30]:
        name = resources[0]["name"][0]
        full = " ".join([*name["given"], name["family"]])
        for r in resources:
            if r["resourceType"] == "DocumentReference":
                att = r["content"][0]["attachment"]
                assert att["contentType"] == "text/plain"
                assert full in base64.b64decode(att["data"]).decode("utf-8")
                checked += 1
    assert checked > 30


def test_observations_correlate_with_conditions(ndjson_files: dict[str, list[Resource]]) -> None:
    files = ndjson_files
    diabetic = {
        r["subject"]["reference"]
        for r in files["Condition"]
        if r["code"]["coding"][0]["code"] == "44054006"
    }
    a1c: dict[bool, list[float]] = {True: [], False: []}
    for r in files["Observation"]:
        if r["code"]["coding"][0]["code"] == "4548-4":
            assert r["valueQuantity"]["code"] == "%"
            a1c[r["subject"]["reference"] in diabetic].append(r["valueQuantity"]["value"])
    mean = {k: sum(v) / len(v) for k, v in a1c.items()}
    assert mean[True] > mean[False] + 1.0


# -- the readmission outcome ---------------------------------------------------------------


def test_readmission_signal(ndjson_files: dict[str, list[Resource]]) -> None:
    files = ndjson_files
    born = {f"Patient/{p['id']}": datetime.fromisoformat(p["birthDate"]) for p in files["Patient"]}
    heart_failure = {
        r["subject"]["reference"]
        for r in files["Condition"]
        if r["code"]["coding"][0]["code"] == HEART_FAILURE
    }
    stays: dict[str, list[tuple[datetime, datetime]]] = {}
    for e in files["Encounter"]:
        if e["class"]["code"] == "IMP":
            period = (_dt(e["period"]["start"]), _dt(e["period"]["end"]))
            stays.setdefault(e["subject"]["reference"], []).append(period)
    labels: dict[str, list[bool]] = {"all": [], "hf": [], "no_hf": [], "old": [], "young": []}
    for patient, periods in stays.items():
        periods.sort()
        for i, (start, end) in enumerate(periods):
            readmitted = i + 1 < len(periods) and periods[i + 1][0] - end <= timedelta(days=30)
            labels["all"].append(readmitted)
            labels["hf" if patient in heart_failure else "no_hf"].append(readmitted)
            age = (start - born[patient]).days / 365.25
            labels["old" if age >= 75 else "young"].append(readmitted)
    rate = {k: sum(v) / len(v) for k, v in labels.items()}
    assert len(labels["all"]) >= 150
    assert 0.05 <= rate["all"] <= 0.35
    assert rate["hf"] > rate["no_hf"] + 0.05
    assert rate["old"] > rate["young"] + 0.05


# -- defects -------------------------------------------------------------------------------


def test_no_defects_by_default(ndjson_run: tuple[Path, GenerationSummary]) -> None:
    _, summary = ndjson_run
    assert summary.records == summary.resources
    assert set(summary.defects_by_kind.values()) == {0}


def test_ndjson_defects_are_real_and_counted(tmp_path: Path) -> None:
    summary = generate(tmp_path, 150, seed=5, fmt="ndjson", defect_rate=0.05)
    kinds = summary.defects_by_kind
    assert all(kinds[k] > 0 for k in DEFECT_KINDS), kinds
    assert summary.records == summary.resources + kinds["bad_json"]
    bad = 0
    parsed: list[tuple[str, Resource]] = []
    for path in sorted(tmp_path.glob("*.ndjson")):
        for line in path.read_bytes().splitlines():
            try:
                parsed.append((path.stem, orjson.loads(line)))
            except orjson.JSONDecodeError:
                bad += 1
    assert bad == kinds["bad_json"]
    assert len(parsed) == summary.resources
    unknown = sum(1 for rt, r in parsed if r["resourceType"] != rt)
    assert unknown == kinds["unknown_resource_type"]
    copies = Counter((rt, r["id"]) for rt, r in parsed)
    assert sum(n - 1 for n in copies.values()) == kinds["duplicate"]
    ids = {r["id"] for _, r in parsed}
    dangling = sum(
        1
        for _, r in parsed
        for ref in _references(r)
        if "/" in ref and ref.split("/", 1)[1] not in ids
    )
    assert dangling == kinds["dangling_reference"]


def test_invalid_defects_fail_validation(tmp_path: Path) -> None:
    summary = generate(tmp_path, 25, seed=9, fmt="ndjson", defect_rate=0.2)
    invalid = 0
    for path in sorted(tmp_path.glob("*.ndjson")):
        for line in path.read_bytes().splitlines():
            try:
                r = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if r["resourceType"] != path.stem:
                continue
            try:
                _validate(r)
            except Exception:
                invalid += 1
    kinds = summary.defects_by_kind
    assert invalid == kinds["wrong_type"] + kinds["missing_required"] > 0


def test_bundle_defects_keep_bundles_usable(tmp_path: Path) -> None:
    summary = generate(tmp_path, 150, seed=5, defect_rate=0.05)
    kinds = summary.defects_by_kind
    assert all(kinds[k] > 0 for k in DEFECT_KINDS), kinds
    corrupt = sorted(tmp_path.glob("*_corrupt.json"))
    assert corrupt
    assert summary.files == 150 + 2 + len(corrupt)
    for path in corrupt:
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(path.read_bytes())
    bundles = _bundles(tmp_path)
    assert len(bundles) == 150
    for resources in bundles:
        assert resources[0]["resourceType"].lower().startswith("patien")


# -- streaming -----------------------------------------------------------------------------


def _peak(tmp_path: Path, patients: int) -> int:
    tracemalloc.start()
    try:
        generate(tmp_path, patients, seed=1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_patients(tmp_path: Path) -> None:
    small = _peak(tmp_path / "small", 25)
    large = _peak(tmp_path / "large", 100)
    assert large < 2 * small
