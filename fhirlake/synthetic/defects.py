"""Realistic defects injected into generated records, to exercise ingestion error handling."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from random import Random
from typing import Any

import orjson

from fhirlake.synthetic.refs import RefStyle
from fhirlake.synthetic.util import new_id

Resource = dict[str, Any]

BAD_JSON = "bad_json"
UNKNOWN_RESOURCE_TYPE = "unknown_resource_type"
WRONG_TYPE = "wrong_type"
MISSING_REQUIRED = "missing_required"
DANGLING_REFERENCE = "dangling_reference"
DUPLICATE = "duplicate"
DEFECT_KINDS = (
    BAD_JSON,
    UNKNOWN_RESOURCE_TYPE,
    WRONG_TYPE,
    MISSING_REQUIRED,
    DANGLING_REFERENCE,
    DUPLICATE,
)

# Resources others point at: an unreadable one would break the rest of the patient's record.
_REFERENCED_TYPES = frozenset({"Patient", "Encounter"})
# Required elements (cardinality 1..) whose absence makes the resource invalid in R4.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "Observation": ("code", "status"),
    "Encounter": ("class", "status"),
    "Condition": ("subject",),
    "MedicationRequest": ("status", "intent"),
    "Procedure": ("status",),
    "Immunization": ("vaccineCode", "status"),
    "Claim": ("provider", "insurance", "priority"),
    "DocumentReference": ("content", "status"),
    "Consent": ("scope", "category"),
}
# A later state of the same resource, written again without a new meta.versionId.
_AMENDED_STATUS: dict[str, tuple[str, str]] = {
    "Encounter": ("finished", "in-progress"),
    "MedicationRequest": ("active", "stopped"),
    "Procedure": ("completed", "in-progress"),
    "Immunization": ("completed", "not-done"),
    "Claim": ("active", "draft"),
    "DocumentReference": ("current", "superseded"),
    "Consent": ("active", "inactive"),
}
_NON_NUMERIC = ("pending", "see note", "n/a", "<5", "12,5", "HEMOLYZED")
# Bundle files hold a whole patient, so corrupt JSON is split off into rare extra files.
_BUNDLE_BAD_JSON_WEIGHT = 0.25


@dataclass
class Emitted:
    """One written record: a resource, or (``corrupt`` set) the bytes of an unreadable one."""

    resource_type: str
    resource: Resource
    corrupt: bytes | None = None


def misspell(resource_type: str, rng: Random) -> str:
    options = (
        resource_type + resource_type[-1],
        resource_type[:-1],
        resource_type.lower(),
        resource_type[0].lower() + resource_type[1:],
    )
    return rng.choice(options)


def corrupt_json(resource: Resource, rng: Random) -> bytes:
    """Serialized resource made unparseable: truncated, or with a broken token."""
    text = orjson.dumps(resource).decode("utf-8")
    if rng.random() < 0.7:
        cut = rng.randint(len(text) // 5, max(len(text) // 5, len(text) * 9 // 10))
        return text[:cut].encode("utf-8")
    broken = text.replace('":', '" ', 1) if rng.random() < 0.5 else text.replace(",", ",,", 1)
    data = broken.encode("utf-8")
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    return text[: len(text) // 2].encode("utf-8")


def _copy(resource: Resource) -> Resource:
    loaded: Resource = orjson.loads(orjson.dumps(resource))
    return loaded


class DefectInjector:
    """Gives each record, independently, probability ``rate`` of carrying one defect."""

    def __init__(self, rate: float, refs: RefStyle, bundle: bool) -> None:
        self.rate = rate
        self.refs = refs
        self.bundle = bundle
        self.counts: Counter[str] = Counter({k: 0 for k in DEFECT_KINDS})

    def _kinds(self, resource_type: str) -> tuple[list[str], list[float]]:
        kinds = [UNKNOWN_RESOURCE_TYPE, WRONG_TYPE, DUPLICATE]
        weights = [1.0, 1.0, 1.0]
        if resource_type not in _REFERENCED_TYPES:
            kinds.append(BAD_JSON)
            weights.append(_BUNDLE_BAD_JSON_WEIGHT if self.bundle else 1.0)
        if resource_type in _REQUIRED:
            kinds.append(MISSING_REQUIRED)
            weights.append(1.0)
        if resource_type != "Patient":
            kinds.append(DANGLING_REFERENCE)
            weights.append(1.0)
        return kinds, weights

    def apply(self, resources: list[Resource], rng: Random) -> list[Emitted]:
        out: list[Emitted] = []
        for res in resources:
            rt = res["resourceType"]
            if self.rate <= 0.0 or rng.random() >= self.rate:
                out.append(Emitted(rt, res))
                continue
            kinds, weights = self._kinds(rt)
            kind = rng.choices(kinds, weights)[0]
            self.counts[kind] += 1
            if kind == BAD_JSON:
                out.append(Emitted(rt, res, corrupt_json(res, rng)))
            elif kind == DUPLICATE:
                out.append(Emitted(rt, res))
                out.append(Emitted(rt, self._amended(res, rng)))
            else:
                self._alter(kind, res, rng)
                out.append(Emitted(rt, res))
        return out

    def _alter(self, kind: str, res: Resource, rng: Random) -> None:
        rt = res["resourceType"]
        if kind == UNKNOWN_RESOURCE_TYPE:
            res["resourceType"] = misspell(rt, rng)
        elif kind == MISSING_REQUIRED:
            del res[rng.choice([k for k in _REQUIRED[rt] if k in res])]
        elif kind == DANGLING_REFERENCE:
            key = "patient" if "patient" in res else "subject"
            res[key] = self.refs.local("Patient", new_id(rng))
        else:
            _wrong_type(res, rng)

    def _amended(self, res: Resource, rng: Random) -> Resource:
        copy = _copy(res)
        rt = res["resourceType"]
        if rt == "Observation" and "valueQuantity" in copy:
            copy["valueQuantity"]["value"] = round(copy["valueQuantity"]["value"] * 1.1 + 1, 1)
        elif rt == "Observation" and "component" in copy:
            copy["component"][0]["valueQuantity"]["value"] += rng.randint(3, 15)
        elif rt == "Patient":
            copy["telecom"][0]["value"] = f"555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
        elif rt == "Condition":
            copy["verificationStatus"]["coding"][0].update(
                code="provisional", display="Provisional"
            )
            copy["verificationStatus"]["text"] = "Provisional"
        else:
            old, new = _AMENDED_STATUS[rt]
            copy["status"] = new if copy.get("status") == old else old
        return copy


def _wrong_type(res: Resource, rng: Random) -> None:
    rt = res["resourceType"]
    if rt == "Patient":
        if rng.random() < 0.5:
            res["birthDate"] = int(res["birthDate"].replace("-", ""))
        else:
            name = res["name"][0]
            res["name"] = f"{name['family']}, {' '.join(name['given'])}"
    elif rt == "Observation" and rng.random() < 0.7:
        quantity = (
            res["valueQuantity"]
            if "valueQuantity" in res
            else (res["component"][0]["valueQuantity"])
        )
        quantity["value"] = rng.choice(_NON_NUMERIC)
    elif rt == "Condition":
        res["clinicalStatus"] = res["clinicalStatus"]["coding"][0]["code"]
    else:
        res["status"] = [res["status"]]
