"""HIPAA §164.514(b)(2): the 18 identifier kinds against the generator's PHI and the shipped
safe_harbor profile. Kinds the generator produces are checked in the released data; the others
are checked to be covered by a rule of the profile."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import orjson

from deid.leakscan import CanarySet, scan_rows
from deid.policy import Policy
from deid.release import deidentify_batch, scan_released_batch
from fhirlake.synthetic import generate
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.read import iter_current_resources

TODAY = date(2026, 11, 28)

# kind -> element names (or Type.name) that carry it; the allow-list must name none of them
# (the profile releases an element only where a path names it, so an unnamed one cannot leave)
KIND_ELEMENTS = {
    "A names": {"name", "family", "given", "alias", "contact"},
    "B geography below state": {"line", "city", "district", "position", "postalCode"},
    "C dates and ages over 89": set(),  # checked in the release below
    "D telephone": {"telecom"},
    "E fax": {"telecom"},
    "F email": {"telecom"},
    "G social security numbers": {"identifier"},
    "H medical record numbers": {"identifier"},
    "I health plan beneficiary numbers": {"identifier", "subscriberId", "Coverage.class"},
    "J account numbers": {"identifier", "account"},
    "K certificate/license numbers": {"identifier", "qualification"},
    "L vehicle identifiers": {"identifier"},
    "M device identifiers and serials": {
        "udiCarrier",
        "serialNumber",
        "lotNumber",
        "distinctIdentifier",
        "partNumber",
        "deviceName",
        "version",
    },
    "N web URLs": {"url", "Endpoint.address", "content", "attachment", "implicitRules"},
    "O IP addresses": {"network", "AuditEvent.source", "meta"},
    "P biometric identifiers": {"attachment", "content", "photo", "signature"},
    "Q full-face photographs": {"photo", "attachment"},
    "R any other unique number or code": {"uid", "identifier", "text", "note", "display"},
}


def test_no_kind_is_named_by_the_allow_list() -> None:
    profile = Policy.shipped("safe_harbor").release
    assert profile is not None
    rows = []
    for kind, elements in KIND_ELEMENTS.items():
        for rtype, paths in profile.resources.items():
            for path, method in paths.items():
                segments = path.split(".")
                if segments[-1] == "postalCode":  # released as its ZIP3 only
                    assert method == "zip3", path
                    continue
                named = set(segments) | {f"{rtype}.{segment}" for segment in segments}
                assert not named & elements, f"{kind}: {rtype}.{path}"
        rows.append(f"  {kind:36s} none of {', '.join(sorted(elements)) or '(dates: below)'}")
    print("\nSafe Harbor identifier kinds: elements the allow-list never names\n" + "\n".join(rows))


def test_generator_phi_is_gone_from_the_safe_harbor_release(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    generate(tmp_path / "land", 30, seed=8)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", tmp_path / "land", key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        deidentify_batch(con, key_provider, "b", Policy.shipped("safe_harbor"), today=TODAY)
        assert scan_released_batch(con, key_provider, "b").passed
        originals = list(iter_current_resources(con, key_provider))
        released = [
            orjson.loads(r)
            for (r,) in con.execute("SELECT resource FROM deid_resources").fetchall()
        ]
    finally:
        con.close()
    blob = orjson.dumps(released).decode().casefold()
    patients = [p for p in originals if p["resourceType"] == "Patient"]
    found = {kind: 0 for kind in ("A", "B", "C", "D", "F", "G", "H", "K", "R")}
    for p in patients:
        names = CanarySet()  # whole-word, outside terminology text (a surname can be "White")
        names.add_patient({"name": p.get("name", [])})
        found["A"] += len(names)
        assert scan_rows(names, [(r["id"], r) for r in released]).passed
        for addr in p.get("address", []):
            for line in addr.get("line", []):
                found["B"] += 1
                assert line.casefold() not in blob
            if addr.get("postalCode"):
                assert f'"postalcode":"{addr["postalCode"].casefold()}"' not in blob
        found["C"] += 1
        assert p["birthDate"] not in blob
        for t in p.get("telecom", []):
            found["D" if t.get("system") == "phone" else "F"] += 1
            assert t["value"].casefold() not in blob
        for ident in p.get("identifier", []):
            code = (ident.get("type", {}).get("coding") or [{}])[0].get("code")
            found["G" if code == "SS" else "K" if code == "DL" else "H"] += 1
            assert ident["value"].casefold() not in blob
        found["R"] += 1
        assert p["id"].casefold() not in blob
    assert all(found.values()), found  # the generator exercised each kind checked here
    dates = re.findall(r'"(?:start|end|date|birthdate|authoredon|issued|created)":"([^"]+)"', blob)
    assert dates and all(re.fullmatch(r"\d{4}", d) for d in dates)
    over_89 = [p for p in patients if TODAY.year - int(p["birthDate"][:4]) > 90]
    assert over_89  # the generator makes some; their birth year is gone entirely
    print(f"\nchecked in the release: {found}")
