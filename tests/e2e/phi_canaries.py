"""PHI canaries taken from input files: the strings no file written by the platform may hold."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson

from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer

MIN_LEN = 5  # shorter strings (e.g. "Ann", a ZIP) appear by chance in binary files


def _resources(path: Path) -> Iterator[dict[str, Any]]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    data = data.removeprefix(b"\xef\xbb\xbf")
    if path.name.endswith((".ndjson", ".ndjson.gz")):
        for line in data.splitlines():
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj
        return
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(obj, dict) and obj.get("resourceType") == "Bundle":
        for entry in obj.get("entry") or []:
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                yield entry["resource"]
    elif isinstance(obj, dict):
        yield obj


def patient_canaries(folder: Path) -> set[str]:
    """Names, identifier values, address lines, phone numbers, emails and resource ids of
    every Patient in the input."""
    found: set[str] = set()
    for path in folder.rglob("*"):
        if not path.is_file() or not path.name.endswith((".json", ".ndjson", ".gz")):
            continue
        for resource in _resources(path):
            if resource.get("resourceType") != "Patient":
                continue
            found.add(str(resource.get("id", "")))
            for name in resource.get("name") or []:
                found.update(str(n) for n in name.get("given") or [])
                found.add(str(name.get("family", "")))
            for ident in resource.get("identifier") or []:
                found.add(str(ident.get("value", "")))
            for addr in resource.get("address") or []:
                found.update(str(line) for line in addr.get("line") or [])
            for telecom in resource.get("telecom") or []:
                found.add(str(telecom.get("value", "")))
    return {c for c in found if len(c) >= MIN_LEN}


def patient_birth_dates(folder: Path) -> dict[str, str]:
    """Full birth date of every Patient in the input, by resource id."""
    found: dict[str, str] = {}
    for path in folder.rglob("*"):
        if not path.is_file() or not path.name.endswith((".json", ".ndjson", ".gz")):
            continue
        for resource in _resources(path):
            birth = resource.get("birthDate")
            if resource.get("resourceType") == "Patient" and isinstance(birth, str):
                if len(birth) == 10:
                    found[str(resource.get("id", ""))] = birth
    return found


def released_birth_date_leaks(workdir: Path, key_file: Path, births: dict[str, str]) -> list[str]:
    """Pseudonyms of patients whose released Patient still carries the original birth date.

    Shifted dates are still dates: one patient's shifted visit can land on another patient's
    birthday, so a byte scan of the warehouse cannot tell a leak from chance. The check that
    can is per patient: the released birthDate of that very patient must differ."""
    pseudo = Pseudonymizer(FileKeyProvider.load(key_file).pseudonym_key())
    by_pseudonym = {pseudo.resource_key("Patient", pid): birth for pid, birth in births.items()}
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT patient_id, resource->>'birthDate' FROM deid_resources "
            "WHERE resource_type = 'Patient'"
        ).fetchall()
    finally:
        con.close()
    return [pid for pid, birth in rows if birth is not None and by_pseudonym.get(pid) == birth]


def _pattern(canaries: set[str] | frozenset[str]) -> re.Pattern[str] | None:
    if not canaries:
        return None
    words = sorted((re.escape(c.casefold()) for c in canaries), key=len, reverse=True)
    # whole words: a given name such as "Erica" inside "American" is not that name
    return re.compile(r"(?<![0-9a-z])(?:" + "|".join(words) + r")(?![0-9a-z])")


def scan_for_canaries(
    root: Path, canaries: set[str], outside_warehouse: frozenset[str] | set[str] = frozenset()
) -> dict[str, list[str]]:
    """Files under ``root`` holding any canary as a whole word (case-folded), with the first
    hits. The ``outside_warehouse`` canaries (dates) are searched in every file but the
    warehouse and the released tables, which hold shifted dates by design."""
    everywhere = _pattern(canaries)
    with_dates = _pattern(set(canaries) | set(outside_warehouse))
    hits: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", "replace").casefold()
        released = path.suffix in (".duckdb", ".wal", ".parquet")
        pattern = everywhere if released else with_dates
        if pattern is None:
            continue
        found = sorted({m.group(0) for m in pattern.finditer(text)})
        if found:
            hits[str(path.relative_to(root))] = found[:5]
    return hits
