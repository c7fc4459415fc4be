"""Synthetic, Synthea-shaped FHIR R4 data: deterministic for a seed, streamed one patient at a time.

The only outcome carried by the data is 30-day readmission after inpatient discharge, and it can
only be seen from the Encounters themselves.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any, Literal

import orjson
from faker import Faker

from fhirlake.synthetic.clinical import PatientRecord
from fhirlake.synthetic.defects import DefectInjector
from fhirlake.synthetic.person import sample_person
from fhirlake.synthetic.providers import (
    build_directory,
    organization_resources,
    practitioner_resources,
)
from fhirlake.synthetic.refs import BundleRefs, NdjsonRefs, RefStyle
from fhirlake.synthetic.timeline import simulate
from fhirlake.synthetic.util import (
    REFERENCE_DATE,
    STREAM_DEFECTS,
    STREAM_FAKER,
    STREAM_PATIENT,
    derive_seed,
)
from fhirlake.synthetic.writers import (
    ORGANIZATIONS_FILE,
    PRACTITIONERS_FILE,
    BundleWriter,
    NdjsonWriter,
    Writer,
)

Format = Literal["bundle", "ndjson"]
SUMMARY_FILE = "_generation.json"
MIN_HISTORY_YEARS = 2
MAX_HISTORY_YEARS = 10
RESOURCE_TYPES = (
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
    "Organization",
    "Location",
    "Practitioner",
)
_PATIENT_FILE = re.compile(r"^\d{6,}(_corrupt)?\.json$")


@dataclass(frozen=True)
class GenerationSummary:
    """Counts only (no PHI). ``records`` = ``resources`` + unreadable records (bad JSON)."""

    patients: int
    resources: int
    resources_by_type: dict[str, int]
    files: int
    defects_by_kind: dict[str, int]
    records: int
    fmt: str = "bundle"
    seed: int = 0
    defect_rate: float = 0.0
    reference_date: str = REFERENCE_DATE.date().isoformat()

    def to_dict(self) -> dict[str, Any]:
        return {
            "patients": self.patients,
            "resources": self.resources,
            "resources_by_type": dict(sorted(self.resources_by_type.items())),
            "files": self.files,
            "defects_by_kind": dict(sorted(self.defects_by_kind.items())),
            "records": self.records,
            "format": self.fmt,
            "seed": self.seed,
            "defect_rate": self.defect_rate,
            "reference_date": self.reference_date,
        }


def _check(patients: int, fmt: str, defect_rate: float) -> None:
    if patients < 0:
        raise ValueError(f"patients must be >= 0, got {patients}")
    if fmt not in ("bundle", "ndjson"):
        raise ValueError(f"fmt must be 'bundle' or 'ndjson', got {fmt!r}")
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be within [0, 1], got {defect_rate}")


def _remove_previous_output(out: Path) -> None:
    """Delete files an earlier run wrote here, which would otherwise mix with this run's."""
    fixed = {ORGANIZATIONS_FILE, PRACTITIONERS_FILE, SUMMARY_FILE}
    fixed.update(f"{rt}.ndjson" for rt in RESOURCE_TYPES)
    for path in out.iterdir():
        if path.is_file() and (path.name in fixed or _PATIENT_FILE.match(path.name)):
            path.unlink()


def generate(
    out_dir: Path,
    patients: int,
    seed: int = 0,
    fmt: Format = "bundle",
    defect_rate: float = 0.0,
) -> GenerationSummary:
    """Write ``patients`` synthetic patients to ``out_dir`` and a ``_generation.json`` summary.

    Same arguments give byte-identical files. Memory does not grow with ``patients``.
    """
    _check(patients, fmt, defect_rate)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_output(out)
    bundle = fmt == "bundle"
    refs: RefStyle = BundleRefs() if bundle else NdjsonRefs()
    writer: Writer = BundleWriter(out) if bundle else NdjsonWriter(out)
    directory = build_directory(seed, patients)
    injector = DefectInjector(defect_rate, refs, bundle)
    by_type: Counter[str] = Counter()
    records = 0
    fake = Faker("en_US")
    try:
        organizations = organization_resources(directory, refs)
        practitioners = practitioner_resources(directory)
        writer.write_shared(organizations, practitioners)
        for r in (*organizations, *practitioners):
            by_type[r["resourceType"]] += 1
        records += len(organizations) + len(practitioners)
        for index in range(patients):
            rng = Random(derive_seed(seed, index, STREAM_PATIENT))
            fake.seed_instance(derive_seed(seed, index, STREAM_FAKER))
            years = rng.randint(MIN_HISTORY_YEARS, MAX_HISTORY_YEARS)
            person = sample_person(rng, fake, index, seed, years)
            timeline = simulate(rng, person, directory, years)
            resources = PatientRecord(rng, person, timeline, refs).build()
            emitted = injector.apply(resources, Random(derive_seed(seed, index, STREAM_DEFECTS)))
            writer.write_patient(index, emitted)
            records += len(emitted)
            for e in emitted:
                if e.corrupt is None:
                    by_type[e.resource_type] += 1
    finally:
        writer.close()
    summary = GenerationSummary(
        patients=patients,
        resources=sum(by_type.values()),
        resources_by_type=dict(by_type),
        files=writer.files,
        defects_by_kind=dict(injector.counts),
        records=records,
        fmt=fmt,
        seed=seed,
        defect_rate=defect_rate,
    )
    (out / SUMMARY_FILE).write_bytes(
        orjson.dumps(summary.to_dict(), option=orjson.OPT_INDENT_2) + b"\n"
    )
    return summary
