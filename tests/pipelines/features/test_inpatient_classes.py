"""An inpatient stay is an encounter of class IMP or one of its v3-ActCode specialisations,
ACUTE and NONAC (the release keeps them as sent), in the readmission label and the features'
prior stays alike: an IMP stay followed by an ACUTE one is a readmission, two ACUTE stays are
two index discharges, and each is a prior stay.

FHIR Encounters go through the shipped ViewDefinitions; the expected labels and counts are
worked out here in Python from the encounters' classes and periods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.models.labels import readmission_labels_with_counts
from tests.pipelines.features.crafted import features_from_fhir, value_at

# v3-ActCode: ACUTE and NONAC are kinds of IMP (inpatient encounter)
INPATIENT = {"IMP", "ACUTE", "NONAC"}

# (id, patient, class, start, end), all with times (UTC)
STAYS = [
    (1, "p1", "IMP", "2024-01-01T08:00:00Z", "2024-01-05T16:00:00Z"),
    (2, "p1", "ACUTE", "2024-01-15T08:00:00Z", "2024-01-18T16:00:00Z"),  # 10 days later
    (3, "p2", "ACUTE", "2024-02-01T08:00:00Z", "2024-02-03T16:00:00Z"),
    (4, "p2", "ACUTE", "2024-02-20T08:00:00Z", "2024-02-22T16:00:00Z"),
    (5, "p3", "NONAC", "2024-03-01T08:00:00Z", "2024-03-04T16:00:00Z"),
    (6, "p3", "EMER", "2024-03-20T08:00:00Z", "2024-03-20T16:00:00Z"),  # no stay
    (7, "p3", "AMB", "2024-12-01T08:00:00Z", "2024-12-01T09:00:00Z"),  # the data's end
]


def _encounter(n: int, patient: str, cls: str, start: str, end: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": f"e{n}",
        "status": "finished",
        "class": {"code": cls},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": start, "end": end},
    }


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_inpatient_sub_classes_are_stays_in_the_label_and_the_features(tmp_path: Path) -> None:
    patients = sorted({p for _, p, _, _, _ in STAYS})
    resources: list[dict[str, Any]] = [{"resourceType": "Patient", "id": p} for p in patients]
    resources += [_encounter(*row) for row in STAYS]
    con = features_from_fhir(resources, tmp_path)
    labels, _ = readmission_labels_with_counts(con)

    last = max(_at(t) for _, _, _, s, e in STAYS for t in (s, e))
    stays = [row for row in STAYS if row[2] in INPATIENT]
    expected = {}
    for n, patient, _, _, end in stays:
        discharge = _at(end)
        if discharge + timedelta(days=30) > last:
            continue
        readmitted = any(
            discharge < _at(start) <= discharge + timedelta(days=30)
            for m, other, _, start, _ in stays
            if other == patient and m != n
        )
        expected[(patient, discharge)] = int(readmitted)
    got = {
        (r.patient_id, r.event_timestamp.to_pydatetime()): int(r.label) for r in labels.itertuples()
    }
    assert got == expected
    assert got[("p1", _at(STAYS[0][4]))] == 1  # IMP, then ACUTE 10 days later
    assert len([key for key in got if key[0] == "p2"]) == 2  # two ACUTE stays, two rows

    at = datetime(2024, 6, 1, tzinfo=UTC)
    for patient in patients:
        prior = sum(
            1 for _, p, _, _, end in stays if p == patient and at - timedelta(days=365) < _at(end)
        )
        assert value_at(con, "patient_utilisation", "prior_inpatient_stays_365d", at, patient) == (
            prior
        ), patient
    assert value_at(con, "patient_utilisation", "prior_inpatient_stays_365d", at, "p2") == 2
