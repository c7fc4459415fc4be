"""Output formats: per-patient transaction bundles, or bulk-export NDJSON by resource type."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Protocol

import orjson

from fhirlake.synthetic import codes
from fhirlake.synthetic.defects import Emitted

Resource = dict[str, Any]

ORGANIZATIONS_FILE = "organizations.json"
PRACTITIONERS_FILE = "practitioners.json"
_BUFFER = 1 << 18


class Writer(Protocol):
    files: int

    def write_shared(
        self, organizations: list[Resource], practitioners: list[Resource]
    ) -> None: ...

    def write_patient(self, index: int, records: list[Emitted]) -> None: ...

    def close(self) -> None: ...


def _conditional_url(resource: Resource) -> str:
    system = (
        codes.NPI_SYSTEM if resource["resourceType"] == "Practitioner" else (codes.SYNTHEA_SYSTEM)
    )
    value = next(i["value"] for i in resource["identifier"] if i["system"] == system)
    return f"{resource['resourceType']}?identifier={system}|{value}"


def _entry(resource: Resource) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{resource['id']}",
        "resource": resource,
        "request": {"method": "POST", "url": str(resource["resourceType"])},
    }


class BundleWriter:
    """One transaction Bundle per patient; shared resources in two batch Bundles (Synthea style).

    Unreadable records go to a small ``<index>_corrupt.json`` beside the patient's bundle, so
    the bundle itself stays usable.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files = 0

    def _write(self, name: str, data: bytes) -> None:
        (self.out_dir / name).write_bytes(data)
        self.files += 1

    def _batch(self, resources: list[Resource]) -> bytes:
        entries = [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": _conditional_url(r)},
            }
            for r in resources
        ]
        return orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries})

    def write_shared(self, organizations: list[Resource], practitioners: list[Resource]) -> None:
        self._write(ORGANIZATIONS_FILE, self._batch(organizations))
        self._write(PRACTITIONERS_FILE, self._batch(practitioners))

    def write_patient(self, index: int, records: list[Emitted]) -> None:
        entries = [_entry(r.resource) for r in records if r.corrupt is None]
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        self._write(f"{index:06d}.json", orjson.dumps(bundle))
        broken = [_entry(r.resource) for r in records if r.corrupt is not None]
        if broken:
            data = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": broken})
            # Any strict prefix of a JSON object is invalid JSON.
            self._write(f"{index:06d}_corrupt.json", data[: len(data) * 3 // 5])

    def close(self) -> None:
        return None


class NdjsonWriter:
    """Bulk-export layout: ``<Type>.ndjson`` per resource type, appended to as patients stream."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files = 0
        self._handles: dict[str, BinaryIO] = {}

    def _handle(self, resource_type: str) -> BinaryIO:
        handle = self._handles.get(resource_type)
        if handle is None:
            path = self.out_dir / f"{resource_type}.ndjson"
            handle = open(path, "wb", buffering=_BUFFER)
            self._handles[resource_type] = handle
            self.files += 1
        return handle

    def _write(self, resource_type: str, line: bytes) -> None:
        self._handle(resource_type).write(line + b"\n")

    def write_shared(self, organizations: list[Resource], practitioners: list[Resource]) -> None:
        for r in [*organizations, *practitioners]:
            self._write(r["resourceType"], orjson.dumps(r))

    def write_patient(self, index: int, records: list[Emitted]) -> None:
        for r in records:
            line = r.corrupt if r.corrupt is not None else orjson.dumps(r.resource)
            self._write(r.resource_type, line)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
