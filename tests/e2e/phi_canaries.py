"""PHI canaries taken from input files: the strings no file written by the platform may hold."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

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
    """Names, identifier values, address lines, phone numbers, emails, full birth dates and
    resource ids of every Patient in the input."""
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
            found.add(str(resource.get("birthDate", "")))
    return {c for c in found if len(c) >= MIN_LEN}


def scan_for_canaries(root: Path, canaries: set[str]) -> dict[str, list[str]]:
    """Files under ``root`` holding any canary (case-folded), with the first hits."""
    folded = [c.casefold().encode() for c in canaries]
    hits: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes().decode("utf-8", "replace").casefold().encode()
        found = [c.decode() for c in folded if c in data]
        if found:
            hits[str(path.relative_to(root))] = found[:5]
    return hits
