"""FHIR R4 resources for one patient, built from the simulated timeline."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from random import Random
from typing import Any

from fhirlake.synthetic import codes
from fhirlake.synthetic.codes import Dx
from fhirlake.synthetic.person import Person, patient_resource
from fhirlake.synthetic.refs import Reference, RefStyle
from fhirlake.synthetic.timeline import Chronic, Timeline, Visit
from fhirlake.synthetic.util import age_at, iso, new_id

Resource = dict[str, Any]

CONSENT_DENY_SHARE = 0.04
CONTAINED_ORG_SHARE = 0.06
CONTAINED_MED_SHARE = 0.06
NOTE_TYPES = {
    "hp": ("34117-2", "History and physical note"),
    "progress": ("11506-3", "Progress note"),
}
_FINISHED_ACUTE = timedelta(days=30)
_STATUS_DISPLAY = {"active": "Active", "resolved": "Resolved", "remission": "Remission"}
_PHYSICIAN_PLANS = (
    "Continue current medications and follow up in 3 months.",
    "Reviewed labs with the patient. Follow up in 6 months.",
    "Counseled on diet and exercise. Return if symptoms worsen.",
    "Medication adherence discussed. Recheck labs at next visit.",
)


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _dx_concept(dx: Dx) -> dict[str, Any]:
    coding = [{"system": codes.SNOMED, "code": dx.snomed, "display": dx.snomed_display}]
    if dx.broader_snomed:
        code, display = dx.broader_snomed
        coding.append({"system": codes.SNOMED, "code": code, "display": display})
    coding.append({"system": codes.ICD10CM, "code": dx.icd10, "display": dx.icd10_display})
    return {"coding": coding, "text": dx.snomed_display}


def _plain(display: str) -> str:
    """Display text without its SNOMED semantic tag, e.g. "(disorder)", for prose."""
    return display.rsplit(" (", 1)[0] if display.endswith(")") else display


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": codes.UCUM, "code": unit}


def _money(value: float) -> dict[str, Any]:
    return {"value": round(value, 2), "currency": "USD"}


def _child_height(age: float, adult: float) -> float:
    if age < 1:
        return 50.0 + 25.0 * age
    if age < 2:
        return 75.0 + 12.0 * (age - 1)
    return min(adult, 87.0 + 6.2 * (age - 2))


def egfr_to_creatinine(egfr: float, age: int, female: bool) -> float:
    """Serum creatinine consistent with an eGFR, by inverting CKD-EPI (2009) above kappa."""
    kappa = 0.7 if female else 0.9
    factor = 141.0 * 0.993**age * (1.018 if female else 1.0)
    return min(12.0, max(0.3, kappa * (factor / max(egfr, 3.0)) ** (1 / 1.209)))


class PatientRecord:
    """Builds every resource of one patient, in Synthea's order (Patient, then per encounter)."""

    def __init__(self, rng: Random, person: Person, timeline: Timeline, refs: RefStyle) -> None:
        self.rng = rng
        self.person = person
        self.tl = timeline
        self.refs = refs
        self.patient_ref = refs.local("Patient", person.id)
        self.female = person.gender == "female"
        self.drugs: dict[str, datetime] = {}
        self.once: set[str] = set()  # vaccines and screenings given only once
        self.contained_med = rng.random() < CONTAINED_MED_SHARE
        self.resources: list[Resource] = []

    # -- top level -------------------------------------------------------------------------

    def build(self) -> list[Resource]:
        rng = self.rng
        contained_org = None
        if rng.random() < CONTAINED_ORG_SHARE:
            contained_org = rng.choice(
                ("Acme Employer Health Plan", "Community Care Network", "Riverside Health Alliance")
            )
        self.resources.append(
            patient_resource(self.person, self.refs, self.tl.clinic, self.tl.pcp, contained_org)
        )
        self.resources.append(self._consent())
        for visit in self.tl.visits:
            self._visit(visit)
        return self.resources

    def _age(self, when: datetime) -> int:
        return age_at(self.person.birth_date, when.date())

    def _active(self, when: datetime) -> list[Chronic]:
        return [
            c
            for c in self.tl.chronic
            if c.onset <= when and (c.abatement is None or c.abatement > when)
        ]

    def _consent(self) -> Resource:
        deny = self.rng.random() < CONSENT_DENY_SHARE
        when = self.tl.visits[0].start if self.tl.visits else self.tl.start
        return {
            "resourceType": "Consent",
            "id": new_id(self.rng),
            "status": "active",
            "scope": _concept(codes.CONSENT_SCOPE, "research", "Research"),
            "category": [_concept(codes.LOINC, "59284-0", "Patient Consent")],
            "patient": self.patient_ref,
            "dateTime": iso(when),
            "performer": [self.patient_ref],
            "organization": [self.refs.organization(self.tl.clinic)],
            "policyRule": {
                "coding": [
                    {
                        "system": codes.ACT_CODE,
                        "code": "OPTOUT" if deny else "OPTIN",
                        "display": "opt-out" if deny else "opt-in",
                    }
                ]
            },
            "provision": {
                "type": "deny" if deny else "permit",
                "period": {"start": iso(when)},
                "purpose": [
                    {"system": codes.ACT_REASON, "code": "HRESCH", "display": "healthcare research"}
                ],
            },
        }

    # -- one encounter ---------------------------------------------------------------------

    def _visit(self, v: Visit) -> None:
        enc_id = new_id(self.rng)
        enc_ref = self.refs.local("Encounter", enc_id)
        self.resources.append(self._encounter(v, enc_id))
        for c in v.diagnosed:
            self.resources.append(self._chronic_condition(c, v, enc_ref))
        acute = v.reason is not None and v.reason_key not in codes.CHRONIC
        if acute and v.reason is not None:
            self.resources.append(self._acute_condition(v, enc_ref))
        self._observations(v, enc_ref)
        procs = self._procedures(v, enc_ref)
        if v.kind.startswith("wellness"):
            self._immunizations(v, enc_ref)
        self._medications(v, enc_ref)
        self.resources.append(self._document(v, enc_ref))
        self.resources.append(self._claim(v, enc_ref, procs))

    def _encounter(self, v: Visit, enc_id: str) -> Resource:
        code, display = codes.ENCOUNTER_TYPES[v.kind]
        cls_code, cls_display = codes.ENCOUNTER_CLASS[v.cls]
        period = {"start": iso(v.start), "end": iso(v.end)}
        subject = dict(self.patient_ref)
        subject["display"] = f"{self.person.prefix + ' ' if self.person.prefix else ''}" + (
            self.person.full_name
        )
        res: Resource = {
            "resourceType": "Encounter",
            "id": enc_id,
            "status": "finished",
            "class": {"system": codes.ACT_CODE, "code": cls_code, "display": cls_display},
            "type": [_concept(codes.SNOMED, code, display)],
            "subject": subject,
            "participant": [
                {
                    "type": [_concept(codes.PARTICIPATION_TYPE, "PPRF", "primary performer")],
                    "period": period,
                    "individual": self.refs.practitioner(v.practitioner),
                }
            ],
            "period": period,
        }
        if v.reason is not None:
            res["reasonCode"] = [_dx_concept(v.reason)]
        if v.cls == "IMP" and v.admit_source and v.disposition:
            res["hospitalization"] = {
                "admitSource": _concept(codes.ADMIT_SOURCE, *v.admit_source),
                "dischargeDisposition": _concept(codes.DISCHARGE_DISPOSITION, *v.disposition),
            }
        res["location"] = [{"location": self.refs.location(v.org)}]
        res["serviceProvider"] = self.refs.organization(v.org)
        return res

    def _condition(
        self,
        dx: Dx,
        category: tuple[str, str],
        enc_ref: Reference,
        onset: datetime,
        recorded: datetime,
        abatement: datetime | None,
        abated_status: str,
    ) -> Resource:
        status = abated_status if abatement is not None else "active"
        res: Resource = {
            "resourceType": "Condition",
            "id": new_id(self.rng),
            "clinicalStatus": _concept(codes.CONDITION_CLINICAL, status, _STATUS_DISPLAY[status]),
            "verificationStatus": _concept(codes.CONDITION_VER, "confirmed", "Confirmed"),
            "category": [_concept(codes.CONDITION_CATEGORY, *category)],
            "code": _dx_concept(dx),
            "subject": self.patient_ref,
            "encounter": enc_ref,
            "onsetDateTime": iso(onset),
        }
        if abatement is not None:
            res["abatementDateTime"] = iso(abatement)
        res["recordedDate"] = iso(recorded)
        return res

    def _chronic_condition(self, c: Chronic, v: Visit, enc_ref: Reference) -> Resource:
        abatement = c.abatement if c.abatement and c.abatement < self.tl.end else None
        status = "remission" if c.key in codes.CANCERS else "resolved"
        category = ("problem-list-item", "Problem List Item")
        return self._condition(
            c.dx, category, enc_ref, c.onset, max(v.start, c.onset), abatement, status
        )

    def _acute_condition(self, v: Visit, enc_ref: Reference) -> Resource:
        assert v.reason is not None
        resolved = v.end + timedelta(days=self.rng.randint(5, 21))
        # Still ongoing when the record ends.
        abatement = resolved if resolved < self.tl.end else None
        category = ("encounter-diagnosis", "Encounter Diagnosis")
        return self._condition(v.reason, category, enc_ref, v.start, v.start, abatement, "resolved")

    # -- observations ----------------------------------------------------------------------

    def _observation(self, key: str, value: float, when: datetime, enc_ref: Reference) -> Resource:
        vital = codes.VITALS[key]
        cat_display = "Vital signs" if vital.category == "vital-signs" else "Laboratory"
        return {
            "resourceType": "Observation",
            "id": new_id(self.rng),
            "status": "final",
            "category": [_concept(codes.OBS_CATEGORY, vital.category, cat_display)],
            "code": _concept(codes.LOINC, vital.loinc, vital.display),
            "subject": self.patient_ref,
            "encounter": enc_ref,
            "effectiveDateTime": iso(when),
            "issued": iso(when),
            "valueQuantity": _quantity(value, vital.unit),
        }

    def _blood_pressure(
        self, systolic: float, diastolic: float, when: datetime, enc_ref: Reference
    ) -> Resource:
        return {
            "resourceType": "Observation",
            "id": new_id(self.rng),
            "status": "final",
            "category": [_concept(codes.OBS_CATEGORY, "vital-signs", "Vital signs")],
            "code": _concept(codes.LOINC, *codes.BP_PANEL),
            "subject": self.patient_ref,
            "encounter": enc_ref,
            "effectiveDateTime": iso(when),
            "issued": iso(when),
            "component": [
                {
                    "code": _concept(codes.LOINC, *codes.SYSTOLIC),
                    "valueQuantity": _quantity(systolic, "mm[Hg]"),
                },
                {
                    "code": _concept(codes.LOINC, *codes.DIASTOLIC),
                    "valueQuantity": _quantity(diastolic, "mm[Hg]"),
                },
            ],
        }

    def _vitals(self, v: Visit, when: datetime, enc_ref: Reference, full: bool) -> None:
        rng = self.rng
        phys = self.tl.physiology
        years = (when.date() - self.person.birth_date).days / 365.25
        out = self.resources
        if full and years >= 0.0:
            height = round(_child_height(years, phys.adult_height) + rng.gauss(0, 0.4), 1)
            if years >= 18:
                bmi = phys.bmi + rng.gauss(0, 0.6)
            else:
                bmi = 16.0 + 0.1 * years + (6.0 if phys.bmi >= 30 else 0.0) + rng.gauss(0, 0.8)
            weight = round(bmi * (height / 100.0) ** 2, 1)
            out.append(self._observation("height", height, when, enc_ref))
            out.append(self._observation("weight", weight, when, enc_ref))
            if years >= 2:
                out.append(
                    self._observation(
                        "bmi", round(weight / (height / 100.0) ** 2, 1), when, enc_ref
                    )
                )
        if years >= 3:
            if years >= 18:
                systolic = phys.systolic + rng.gauss(0, 6)
            else:
                systolic = 92 + years + rng.gauss(0, 5)
            diastolic = 0.55 * systolic + 10 + rng.gauss(0, 4)
            out.append(self._blood_pressure(round(systolic), round(diastolic), when, enc_ref))
        hr = phys.heart_rate + max(0.0, 40 - 3 * years) + rng.gauss(0, 5)
        if v.cls != "AMB":
            hr += 8
        out.append(self._observation("heart_rate", round(hr), when, enc_ref))

    def _labs(self, v: Visit, when: datetime, enc_ref: Reference, keys: set[str]) -> None:
        rng = self.rng
        phys = self.tl.physiology
        out = self.resources
        hba1c = v.hba1c if v.hba1c is not None else round(max(4.2, rng.gauss(phys.hba1c, 0.35)), 1)
        if "hba1c" in keys:
            out.append(self._observation("hba1c", hba1c, when, enc_ref))
        if "glucose" in keys:
            glucose = 28.7 * hba1c - 46.7 + rng.gauss(0, 12) + (20 if v.cls == "IMP" else 0)
            out.append(self._observation("glucose", round(max(55.0, glucose)), when, enc_ref))
        if "renal" in keys:
            egfr = phys.egfr + rng.gauss(0, 4) - (0.35 * phys.egfr if v.reason_key == "aki" else 0)
            egfr = round(min(150.0, max(5.0, egfr)))
            creat = egfr_to_creatinine(egfr, self._age(when), self.female)
            out.append(self._observation("creatinine", round(creat, 2), when, enc_ref))
            out.append(self._observation("egfr", egfr, when, enc_ref))
        if "ldl" in keys:
            ldl = phys.ldl * (0.7 if "atorvastatin" in self.drugs else 1.0) + rng.gauss(0, 8)
            out.append(self._observation("ldl", round(max(30.0, ldl)), when, enc_ref))

    def _observations(self, v: Visit, enc_ref: Reference) -> None:
        rng = self.rng
        when = v.start + timedelta(minutes=5)
        active = {c.key for c in self._active(v.start)}
        adult = self._age(v.start) >= 18
        labs: set[str] = set()
        if "diabetes" in active and v.kind in ("wellness_adult", "followup", "diagnosis"):
            labs |= {"hba1c", "glucose"}
        if active & {"ckd", "diabetes", "hypertension", "heart_failure"} and (
            v.kind in ("wellness_adult", "diagnosis") or rng.random() < 0.5
        ):
            labs.add("renal")
        if v.kind == "wellness_adult":
            self._vitals(v, when, enc_ref, full=True)
            if rng.random() < 0.5 or "hyperlipidemia" in active:
                labs.add("ldl")
            if rng.random() < 0.4:
                labs.add("glucose")
            if self._age(v.start) >= 50 and rng.random() < 0.5:
                labs.add("renal")
        elif v.kind == "wellness_child":
            self._vitals(v, when, enc_ref, full=True)
        elif v.kind in ("followup", "diagnosis"):
            self._vitals(v, when, enc_ref, full=False)
            if "hyperlipidemia" in active and rng.random() < 0.5:
                labs.add("ldl")
        elif v.cls == "IMP":
            self._vitals(v, when, enc_ref, full=adult)
            labs |= {"hba1c", "glucose", "renal"}
        else:
            self._vitals(v, when, enc_ref, full=False)
        if labs:
            self._labs(v, when + timedelta(minutes=10), enc_ref, labs)

    # -- procedures, immunizations, medications ----------------------------------------------

    def _procedure(self, key: str, v: Visit, enc_ref: Reference, reason: Dx | None) -> Resource:
        proc = codes.PROCEDURES[key]
        start = v.start + timedelta(minutes=15)
        end = min(v.end, start + timedelta(minutes=30))
        res: Resource = {
            "resourceType": "Procedure",
            "id": new_id(self.rng),
            "status": "completed",
            "code": _concept(codes.SNOMED, proc.snomed, proc.display),
            "subject": self.patient_ref,
            "encounter": enc_ref,
            "performedPeriod": {"start": iso(start), "end": iso(max(start, end))},
            "location": self.refs.location(v.org),
        }
        if reason is not None:
            res["reasonCode"] = [_dx_concept(reason)]
        return res

    def _procedure_keys(self, v: Visit) -> list[tuple[str, Dx | None]]:
        rng = self.rng
        age = self._age(v.start)
        active = {c.key for c in self._active(v.start)}
        keys: list[tuple[str, Dx | None]] = []
        if v.kind == "wellness_adult":
            if rng.random() < 0.5:
                keys.append(("needs_assessment", None))
            if rng.random() < 0.5:
                keys.append(("depression_screening", None))
            if self.drugs and rng.random() < 0.7:
                keys.append(("med_reconciliation", None))
            if self.female and 50 <= age <= 74 and rng.random() < 0.5:
                keys.append(("mammography", None))
            if 45 <= age <= 75 and "colonoscopy" not in self.once and rng.random() < 0.12:
                self.once.add("colonoscopy")
                keys.append(("colonoscopy", None))
        elif v.kind in ("followup", "diagnosis"):
            chances = {
                "copd": ("spirometry", 0.3),
                "asthma": ("spirometry", 0.2),
                "heart_failure": ("echocardiography", 0.15),
                "afib": ("ecg", 0.4),
            }
            for cond, (proc, p) in chances.items():
                if cond in active and rng.random() < p:
                    keys.append((proc, codes.CHRONIC[cond]))
            if "ckd" in active and self.tl.physiology.egfr < 20 and rng.random() < 0.3:
                keys.append(("dialysis", codes.CHRONIC["ckd"]))
            for c in v.diagnosed:
                first = {
                    "heart_failure": "echocardiography",
                    "afib": "ecg",
                    "copd": "spirometry",
                    "colon_cancer": "colonoscopy",
                    "breast_cancer": "mammography",
                }.get(c.key)
                if first:
                    keys.append((first, c.dx))
        elif v.kind == "acute" and v.reason_key == "pharyngitis":
            keys.append(("throat_culture", v.reason))
        elif v.kind == "emergency" and v.reason_key in ("chest_pain", "syncope"):
            keys.append(("ecg", v.reason))
        elif v.cls == "IMP" and v.reason_key:
            keys.extend((k, v.reason) for k in codes.INPATIENT_PROCEDURES.get(v.reason_key, ()))
        return keys

    def _procedures(self, v: Visit, enc_ref: Reference) -> list[str]:
        keys = self._procedure_keys(v)
        for key, reason in keys:
            self.resources.append(self._procedure(key, v, enc_ref, reason))
        return [k for k, _ in keys]

    def _vaccine_keys(self, v: Visit) -> list[str]:
        rng = self.rng
        years = (v.start.date() - self.person.birth_date).days / 365.25
        keys = []
        if years < 2.2:
            months = years * 12
            if months < 1:
                keys.append("hep_b")
            elif months < 7.5:
                keys += ["dtap", "ipv", "hep_b"] if months > 5 else ["dtap", "ipv"]
            elif 11 <= months < 16:
                keys += ["mmr", "varicella"] if months < 13.5 else ["dtap"]
        elif 4 <= years < 7 and "dtap_booster" not in self.once:
            self.once.add("dtap_booster")
            keys += ["dtap", "ipv", "mmr", "varicella"]
        elif 11 <= years < 13 and "tdap" not in self.once:
            self.once.add("tdap")
            keys += ["tdap", "hpv"]
        if years >= 0.5 and rng.random() < 0.55:
            keys.append("influenza")
        if years >= 19 and rng.random() < 0.08:
            keys.append("td")
        if years >= 65 and "pcv13" not in self.once and rng.random() < 0.7:
            self.once.add("pcv13")
            keys.append("pcv13")
        if years >= 50 and "zoster" not in self.once and rng.random() < 0.3:
            self.once.add("zoster")
            keys.append("zoster")
        if (
            v.start.year >= 2021
            and years >= 12
            and "covid" not in self.once
            and (rng.random() < 0.5)
        ):
            self.once.add("covid")
            keys.append("covid")
        return keys

    def _immunizations(self, v: Visit, enc_ref: Reference) -> None:
        when = iso(v.start + timedelta(minutes=20))
        for key in self._vaccine_keys(v):
            vac = codes.VACCINES[key]
            self.resources.append(
                {
                    "resourceType": "Immunization",
                    "id": new_id(self.rng),
                    "status": "completed",
                    "vaccineCode": _concept(codes.CVX, vac.cvx, vac.display),
                    "patient": self.patient_ref,
                    "encounter": enc_ref,
                    "occurrenceDateTime": when,
                    "primarySource": True,
                    "location": self.refs.location(v.org),
                }
            )

    def _medication(
        self, drug_key: str, v: Visit, enc_ref: Reference, reason: Dx, status: str
    ) -> Resource:
        drug = codes.DRUGS[drug_key]
        res: Resource = {"resourceType": "MedicationRequest", "id": new_id(self.rng)}
        concept = _concept(codes.RXNORM, drug.rxnorm, drug.display)
        if self.contained_med:
            # Some systems send the drug as a contained Medication instead of a code.
            self.contained_med = False
            res["contained"] = [
                {"resourceType": "Medication", "id": "med1", "code": concept, "status": "active"}
            ]
        res["status"] = status
        res["intent"] = "order"
        if "contained" in res:
            res["medicationReference"] = {"reference": "#med1", "display": drug.display}
        else:
            res["medicationCodeableConcept"] = concept
        res["subject"] = self.patient_ref
        res["encounter"] = enc_ref
        res["authoredOn"] = iso(v.end - timedelta(minutes=5))
        res["requester"] = self.refs.practitioner(v.practitioner)
        res["reasonCode"] = [_dx_concept(reason)]
        res["dosageInstruction"] = [{"sequence": 1, "text": drug.instructions}]
        return res

    def _medications(self, v: Visit, enc_ref: Reference) -> None:
        rng = self.rng
        for c in v.diagnosed:
            ended = c.abatement is not None and c.abatement < self.tl.end
            for drug_key, p in codes.CHRONIC_DRUGS.get(c.key, ()):
                if drug_key in self.drugs or rng.random() >= p:
                    continue
                self.drugs[drug_key] = v.start
                status = "stopped" if ended or rng.random() < 0.1 else "active"
                self.resources.append(self._medication(drug_key, v, enc_ref, c.dx, status))
        if v.reason is not None and v.reason_key in codes.ACUTE_DRUGS:
            recent = self.tl.end - v.end < _FINISHED_ACUTE
            for drug_key in codes.ACUTE_DRUGS[v.reason_key]:
                status = "active" if recent else "completed"
                self.resources.append(self._medication(drug_key, v, enc_ref, v.reason, status))

    # -- documents and claims ----------------------------------------------------------------

    def _note(self, v: Visit) -> str:
        p = self.person
        age = self._age(v.start)
        active = self._active(v.end)
        problems = "\n".join(f"- {c.dx.snomed_display} ({c.dx.icd10})" for c in active) or "- None"
        meds = "\n".join(f"- {codes.DRUGS[k].display}" for k in sorted(self.drugs)) or "- None"
        title = "History and physical" if v.cls == "IMP" else "Progress note"
        reason = _plain(v.reason.snomed_display).lower() if v.reason else "a routine visit"
        lines = [
            f"{v.start:%Y-%m-%d}",
            "",
            f"# {title}",
            "",
            f"Patient: {p.full_name}   DOB: {p.birth_date:%Y-%m-%d}   MRN: {p.mrn}",
            f"{p.full_name} is a {age}-year-old {p.gender} seen today for {reason}.",
            f"Address on file: {p.address.line}, {p.address.city}, {p.address.state}. "
            f"Phone {p.home_phone}.",
            "",
            "## Active problems",
            problems,
            "",
            "## Medications",
            meds,
            "",
            "## Plan",
            self.rng.choice(_PHYSICIAN_PLANS),
            f"Seen by {v.practitioner.display} at {v.org.name}.",
        ]
        return "\n".join(lines) + "\n"

    def _document(self, v: Visit, enc_ref: Reference) -> Resource:
        code, display = NOTE_TYPES["hp" if v.cls == "IMP" else "progress"]
        data = base64.b64encode(self._note(v).encode("utf-8")).decode("ascii")
        return {
            "resourceType": "DocumentReference",
            "id": new_id(self.rng),
            "status": "current",
            "type": _concept(codes.LOINC, code, display),
            "category": [_concept(codes.US_CORE_DOC_CATEGORY, "clinical-note", "Clinical Note")],
            "subject": self.patient_ref,
            "date": iso(v.end),
            "author": [self.refs.practitioner(v.practitioner)],
            "custodian": self.refs.organization(v.org),
            "content": [
                {"attachment": {"contentType": "text/plain", "data": data, "title": display}}
            ],
            "context": {
                "encounter": [enc_ref],
                "period": {"start": iso(v.start), "end": iso(v.end)},
            },
        }

    def _encounter_cost(self, v: Visit) -> float:
        if v.cls == "IMP":
            return 2800.0 * max(1, (v.end - v.start).days) + self.rng.uniform(0, 900)
        if v.cls == "EMER":
            return self.rng.uniform(900, 3000)
        return self.rng.uniform(110, 260)

    def _claim(self, v: Visit, enc_ref: Reference, procs: list[str]) -> Resource:
        code, display = codes.ENCOUNTER_TYPES[v.kind]
        institutional = v.cls != "AMB"
        cost = self._encounter_cost(v)
        items: list[dict[str, Any]] = [
            {
                "sequence": 1,
                "productOrService": _concept(codes.SNOMED, code, display),
                "encounter": [enc_ref],
                "net": _money(cost),
            }
        ]
        for key in procs:
            proc = codes.PROCEDURES[key]
            items.append(
                {
                    "sequence": len(items) + 1,
                    "productOrService": _concept(codes.SNOMED, proc.snomed, proc.display),
                    "net": _money(proc.cost),
                }
            )
        dxs = [c.dx for c in v.diagnosed] + ([v.reason] if v.reason else [])
        res: Resource = {
            "resourceType": "Claim",
            "id": new_id(self.rng),
            "status": "active",
            "type": _concept(
                codes.CLAIM_TYPE,
                *(
                    ("institutional", "Institutional")
                    if institutional
                    else ("professional", "Professional")
                ),
            ),
            "use": "claim",
            "patient": self.patient_ref,
            "billablePeriod": {"start": iso(v.start), "end": iso(v.end)},
            "created": iso(v.end),
            "provider": self.refs.organization(v.org),
            "priority": _concept(codes.PROCESS_PRIORITY, "normal", "Normal"),
            "facility": self.refs.location(v.org),
        }
        if dxs:
            res["diagnosis"] = [
                {
                    "sequence": i,
                    "diagnosisCodeableConcept": _concept(codes.ICD10CM, d.icd10, d.icd10_display),
                }
                for i, d in enumerate(dxs, start=1)
            ]
        res["insurance"] = [
            {"sequence": 1, "focal": True, "coverage": {"display": self.person.payer}}
        ]
        res["item"] = items
        res["total"] = _money(sum(i["net"]["value"] for i in items))
        return res
