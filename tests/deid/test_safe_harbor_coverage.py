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

# kind → the rule paths of the profile that remove it
RULE_COVERAGE = {
    "A names": ["nodesByType('HumanName')"],
    "B geography below state": ["nodesByType('Address')", "nodesByType('Address').postalCode"],
    "C dates and ages over 89": [
        "nodesByType('date')",
        "nodesByType('dateTime')",
        "nodesByType('Age')",
    ],
    "D telephone": ["nodesByType('ContactPoint')"],
    "E fax": ["nodesByType('ContactPoint')"],
    "F email": ["nodesByType('ContactPoint')"],
    "G social security numbers": ["nodesByType('Identifier')"],
    "H medical record numbers": ["nodesByType('Identifier')"],
    "I health plan beneficiary numbers": ["nodesByType('Identifier')", "Coverage.subscriberId"],
    "J account numbers": ["nodesByType('Identifier')"],
    "K certificate/license numbers": ["nodesByType('Identifier')"],
    "L vehicle identifiers": ["nodesByType('Identifier')"],
    "M device identifiers and serials": ["Device.udiCarrier", "Device.serialNumber"],
    "N web URLs": ["nodesByType('Attachment')", "Endpoint.address"],
    "O IP addresses": ["AuditEvent.agent.network", "AuditEvent.source"],
    "P biometric identifiers": ["nodesByType('Attachment')"],
    "Q full-face photographs": ["Patient.photo", "nodesByType('Attachment')"],
    "R any other unique number or code": ["Resource.id", "nodesByType('Reference').reference"],
}


def test_every_kind_is_covered_by_a_rule() -> None:
    paths = {r.path for r in Policy.shipped("safe_harbor").rules}
    rows = []
    for kind, needed in RULE_COVERAGE.items():
        assert set(needed) <= paths, kind
        rows.append(f"  {kind:36s} {', '.join(needed)}")
    print("\nSafe Harbor identifier kinds → profile rules\n" + "\n".join(rows))


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
