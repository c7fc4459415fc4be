"""Clinical simulation of one patient's history: conditions, visits and the readmission process.

Nothing here is FHIR: the resources are built from the timeline in ``clinical.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from random import Random

from fhirlake.synthetic import codes
from fhirlake.synthetic.codes import Dx
from fhirlake.synthetic.person import Person
from fhirlake.synthetic.providers import Directory, Organization, Practitioner
from fhirlake.synthetic.util import add_years, age_at, clinic_time, random_datetime

DAY = timedelta(days=1)
READMISSION_WINDOW = timedelta(days=30)

# (key, max prevalence, age at half prevalence, age scale, minimum onset age)
_PREVALENCE: tuple[tuple[str, float, float, float, int], ...] = (
    ("obesity", 0.32, 30.0, 8.0, 6),
    ("hypertension", 0.72, 57.0, 10.0, 20),
    ("hyperlipidemia", 0.55, 52.0, 10.0, 25),
    ("diabetes", 0.30, 57.0, 10.0, 25),
    ("afib", 0.22, 78.0, 7.0, 45),
    ("heart_failure", 0.26, 76.0, 8.0, 40),
    ("copd", 0.20, 66.0, 8.0, 40),
    ("ckd", 0.35, 72.0, 9.0, 30),
    ("asthma", 0.09, 5.0, 2.0, 2),
    ("depression", 0.14, 25.0, 5.0, 12),
    ("breast_cancer", 0.10, 62.0, 8.0, 35),
    ("colon_cancer", 0.04, 65.0, 8.0, 40),
    ("lung_cancer", 0.03, 68.0, 7.0, 40),
)
# Multipliers on a condition's prevalence given an earlier condition.
_RISK: dict[str, tuple[tuple[str, float], ...]] = {
    "diabetes": (("obesity", 1.9),),
    "hypertension": (("obesity", 1.3),),
    "heart_failure": (("hypertension", 1.8), ("afib", 1.6), ("diabetes", 1.3)),
    "ckd": (("diabetes", 1.7), ("hypertension", 1.4)),
    "afib": (("hypertension", 1.3),),
}
_CANCER_SEX = {"breast_cancer": "female"}


@dataclass
class Chronic:
    key: str
    dx: Dx
    onset: datetime
    abatement: datetime | None = None
    stage: int | None = None


@dataclass
class Physiology:
    """Per-patient latent values that observations scatter around."""

    adult_height: float
    bmi: float
    systolic: float
    heart_rate: float
    hba1c: float
    ldl: float
    egfr: float
    frailty: float


@dataclass
class Visit:
    kind: str
    cls: str
    start: datetime
    end: datetime
    org: Organization
    practitioner: Practitioner
    reason_key: str | None = None
    reason: Dx | None = None
    hba1c: float | None = None
    disposition: tuple[str, str] | None = None
    admit_source: tuple[str, str] | None = None
    diagnosed: list[Chronic] = field(default_factory=list)


@dataclass
class Timeline:
    start: datetime
    end: datetime
    chronic: list[Chronic]
    visits: list[Visit]
    physiology: Physiology
    clinic: Organization
    pcp: Practitioner


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _sample_chronic(rng: Random, person: Person) -> list[Chronic]:
    age = person.age()
    birth = datetime(person.birth_date.year, person.birth_date.month, person.birth_date.day)
    present: dict[str, Chronic] = {}
    for key, pmax, mid, scale, min_age in _PREVALENCE:
        if age < min_age or _CANCER_SEX.get(key, person.gender) != person.gender:
            continue
        p = pmax * _logistic((age - mid) / scale)
        for other, factor in _RISK.get(key, ()):
            if other in present:
                p *= factor
        if key == "lung_cancer" and "copd" in present:
            p *= 3.0
        if rng.random() >= min(p, 0.95):
            continue
        onset_age = min_age + (age - min_age) * rng.random() ** 0.6
        onset = birth + timedelta(days=onset_age * 365.25) + timedelta(minutes=rng.randint(0, 1439))
        onset = min(onset, person.end - DAY)
        dx = codes.CHRONIC[key]
        stage = None
        if key == "ckd":
            stage = rng.choices((2, 3, 4), (0.4, 0.45, 0.15))[0]
            dx = codes.CKD_STAGES[stage]
        present[key] = Chronic(key, dx, onset, stage=stage)
    for key in ("depression", *codes.CANCERS):
        c = present.get(key)
        if c and rng.random() < 0.4:
            c.abatement = c.onset + timedelta(days=rng.randint(180, 1500))
            if c.abatement >= person.end:
                c.abatement = None
    return list(present.values())


def _physiology(rng: Random, person: Person, chronic: list[Chronic]) -> Physiology:
    keys = {c.key for c in chronic}
    male = person.gender == "male"
    height = rng.gauss(176.0 if male else 162.0, 7.0)
    bmi = rng.uniform(30.5, 42.0) if "obesity" in keys else min(29.5, max(18.6, rng.gauss(25, 3)))
    systolic = rng.gauss(145, 9) if "hypertension" in keys else rng.gauss(118, 8)
    hr = rng.gauss(74, 7) + (14 if "afib" in keys else 0)
    if "diabetes" in keys:
        hba1c = min(12.5, max(6.5, rng.gauss(7.8, 1.1)))
    else:
        hba1c = min(6.4, max(4.4, rng.gauss(5.4, 0.35)))
    ldl = rng.gauss(160, 18) if "hyperlipidemia" in keys else rng.gauss(105, 18)
    ckd = next((c for c in chronic if c.key == "ckd"), None)
    if ckd is not None and ckd.stage is not None:
        egfr = {2: rng.uniform(62, 88), 3: rng.uniform(32, 58), 4: rng.uniform(16, 29)}[ckd.stage]
    else:
        egfr = max(62.0, rng.gauss(122 - 0.75 * person.age(), 8))
    return Physiology(height, bmi, systolic, hr, hba1c, ldl, egfr, rng.gauss(0.0, 0.4))


def _active(chronic: list[Chronic], when: datetime) -> set[str]:
    return {
        c.key for c in chronic if c.onset <= when and (c.abatement is None or c.abatement > when)
    }


_RATE_CAP = timedelta(days=90)  # re-evaluate a changing rate at least quarterly


def _next_event(
    rng: Random, t: datetime, end: datetime, rate: Callable[[datetime], float]
) -> datetime | None:
    """Next event time after t of a Poisson process whose yearly rate may change over time."""
    while t < end:
        r = rate(t)
        gap = timedelta(days=rng.expovariate(r) * 365.25) if r > 0 else _RATE_CAP * 2
        if gap > _RATE_CAP:
            t += _RATE_CAP
            continue
        t += gap
        return t if t < end else None
    return None


def _poisson_times(
    rng: Random, start: datetime, end: datetime, rate: Callable[[datetime], float]
) -> list[datetime]:
    out = []
    t: datetime | None = start
    while t is not None:
        t = _next_event(rng, t, end, rate)
        if t is not None:
            out.append(t)
    return out


@dataclass
class _Context:
    rng: Random
    person: Person
    directory: Directory
    clinic: Organization
    pcp: Practitioner
    chronic: list[Chronic]
    phys: Physiology
    start: datetime
    end: datetime

    def age(self, when: datetime) -> int:
        return age_at(self.person.birth_date, when.date())

    def hospital(self) -> tuple[Organization, Practitioner]:
        org = self.rng.choice(self.directory.hospitals)
        return org, self.rng.choice(org.practitioners)

    def ambulatory(self, kind: str, when: datetime, minutes: int = 30) -> Visit:
        start = clinic_time(self.rng, when)
        end = start + timedelta(minutes=minutes + self.rng.choice((0, 15, 30)))
        return Visit(kind, "AMB", start, end, self.clinic, self.pcp)


def _wellness(ctx: _Context) -> list[Visit]:
    rng = ctx.rng
    birth = datetime(
        ctx.person.birth_date.year, ctx.person.birth_date.month, ctx.person.birth_date.day
    )
    days: list[datetime] = [
        birth + timedelta(days=d) for d in (3, 60, 120, 180, 270, 365, 455, 545, 730)
    ]
    first_year = max(ctx.start.year, birth.year + 3)
    for year in range(first_year, ctx.end.year + 1):
        month = ctx.person.birth_date.month
        day = datetime(year, month, 1) + timedelta(days=rng.randint(0, 27))
        if rng.random() < (0.95 if ctx.age(day) < 18 else 0.85):
            days.append(day)
    visits = []
    for day in days:
        if ctx.start <= day < ctx.end - timedelta(hours=18):
            kind = "wellness_child" if ctx.age(day) < 18 else "wellness_adult"
            visits.append(ctx.ambulatory(kind, day, 30))
    return visits


def _followups(ctx: _Context) -> list[Visit]:
    def rate(t: datetime) -> float:
        return min(3.0, 0.55 * len(_active(ctx.chronic, t)))

    return [
        ctx.ambulatory("followup", t, 20)
        for t in _poisson_times(ctx.rng, ctx.start, ctx.end - DAY, rate)
    ]


def _diagnoses(ctx: _Context, first: Visit | None, stays: list[Visit]) -> list[Visit]:
    """Visits at which conditions first appear; onsets before the history go to the first visit."""
    visits = []
    for c in ctx.chronic:
        during = next((s for s in stays if s.start <= c.onset <= s.end), None)
        if c.onset < ctx.start and first is not None:
            first.diagnosed.append(c)
        elif during is not None:
            during.diagnosed.append(c)
        elif c.onset >= ctx.start:
            v = ctx.ambulatory("diagnosis", c.onset, 30)
            v.start = max(v.start, c.onset)
            v.end = v.start + timedelta(minutes=30)
            if v.end >= ctx.end:
                continue
            v.diagnosed.append(c)
            visits.append(v)
    return visits


def _acute(ctx: _Context) -> list[Visit]:
    rng = ctx.rng
    visits = []
    for t in _poisson_times(rng, ctx.start, ctx.end - DAY, lambda t: 0.35):
        age = ctx.age(t)
        options = (
            ("otitis", "pharyngitis", "bronchitis")
            if age < 12
            else ("pharyngitis", "bronchitis", "sinusitis", "cystitis")
        )
        key = rng.choice(options)
        v = ctx.ambulatory("acute", t, 20)
        v.reason_key, v.reason = key, codes.ACUTE_AMBULATORY[key]
        visits.append(v)
    return visits


def _emergencies(ctx: _Context) -> list[Visit]:
    rng = ctx.rng
    visits = []

    def rate(t: datetime) -> float:
        return 0.07 + 0.05 * len(_active(ctx.chronic, t))

    for t in _poisson_times(rng, ctx.start, ctx.end - DAY, rate):
        older = ctx.age(t) >= 50
        options = (
            ("chest_pain", "syncope", "ankle_sprain")
            if older
            else ("ankle_sprain", "hand_laceration", "concussion", "chest_pain")
        )
        key = rng.choice(options)
        org, doc = ctx.hospital()
        end = t + timedelta(minutes=rng.randint(120, 480))
        visits.append(Visit("emergency", "EMER", t, end, org, doc, key, codes.EMERGENCY[key]))
    return visits


def _admission_rate(ctx: _Context, t: datetime) -> float:
    age = ctx.age(t)
    if age < 18:
        return 0.006
    active = _active(ctx.chronic, t)
    weight = (
        1.0
        + 1.0 * ("heart_failure" in active)
        + 0.8 * ("copd" in active)
        + 0.6 * ("ckd" in active)
        + 0.4 * ("diabetes" in active)
        + 0.5 * any(k in active for k in codes.CANCERS)
        + 0.1 * len(active)
    )
    return 0.028 * math.exp(0.035 * (age - 50) + ctx.phys.frailty) * weight


def readmission_probability(
    age: int, active: set[str], prior_admissions_365d: int, hba1c: float, noise: float
) -> float:
    """Probability that an inpatient discharge is followed by an admission within 30 days."""
    x = (
        -3.9
        + 0.03 * (age - 65)
        + 0.75 * ("heart_failure" in active)
        + 0.45 * ("copd" in active)
        + 0.45 * ("ckd" in active)
        + 0.3 * ("diabetes" in active)
        + 0.1 * len(active - set(codes.MAJOR_COMORBIDITIES))
        + 0.4 * min(prior_admissions_365d, 3)
        + 0.35 * max(0.0, hba1c - 7.0)
        + noise
    )
    return _logistic(x)


def _inpatient_reason(rng: Random, active: set[str], age: int) -> str:
    options: list[tuple[str, float]] = [
        ("pneumonia", 1.0),
        ("sepsis", 0.5),
        ("mi", 0.4),
        ("stroke", 0.3),
    ]
    if age >= 70:
        options.append(("hip_fracture", 0.4))
    if "heart_failure" in active:
        options.append(("heart_failure", 2.0))
    if "copd" in active:
        options.append(("copd_exacerbation", 1.5))
    if "ckd" in active:
        options.append(("aki", 0.8))
    if "diabetes" in active:
        options.append(("hyperglycemia", 0.7))
    keys, weights = zip(*options, strict=True)
    return rng.choices(keys, weights)[0]


def _stay(ctx: _Context, admit: datetime, readmission: bool, reason_key: str | None) -> Visit:
    rng = ctx.rng
    age = ctx.age(admit)
    active = _active(ctx.chronic, admit)
    mean_los = 2.5 + 0.03 * max(0, age - 50) + 1.0 * ("heart_failure" in active)
    los = min(21, 1 + int(rng.expovariate(1.0 / mean_los)))
    discharge = (admit + timedelta(days=los)).replace(
        hour=rng.randint(9, 15), minute=rng.randint(0, 59)
    )
    key = reason_key or _inpatient_reason(rng, active, age)
    reason = codes.CHRONIC["heart_failure"] if key == "heart_failure" else codes.INPATIENT[key]
    org, doc = ctx.hospital()
    v = Visit("inpatient", "IMP", admit, discharge, org, doc, key, reason)
    v.hba1c = round(max(4.2, rng.gauss(ctx.phys.hba1c, 0.35)), 1)
    v.admit_source = (
        ("emd", "From accident/emergency department")
        if rng.random() < 0.75
        else ("gp", "General Practitioner referral")
    )
    p_post_acute = 0.1 + 0.3 * (age >= 75)
    if rng.random() < p_post_acute:
        v.disposition = rng.choice(codes.DISCHARGE_DISPOSITIONS[1:4])
    elif rng.random() < 0.03:
        v.disposition = codes.DISCHARGE_DISPOSITIONS[4]
    else:
        v.disposition = codes.DISCHARGE_DISPOSITIONS[0]
    if readmission:
        v.admit_source = ("emd", "From accident/emergency department")
    return v


def _inpatient(ctx: _Context) -> list[Visit]:
    """Admissions as a Poisson process, with each discharge possibly followed by a readmission.

    Outside readmissions, no admission starts within 30 days of a discharge, so the 30-day
    readmission label computed from Encounters is exactly the outcome drawn here.
    """
    rng = ctx.rng
    stays: list[Visit] = []
    t = ctx.start
    pending: datetime | None = None
    pending_reason: str | None = None
    while True:
        if pending is None:
            nxt = _next_event(rng, t, ctx.end - DAY, lambda s: _admission_rate(ctx, s))
            if nxt is None:
                break
            admit = nxt
        else:
            admit = pending
        if admit >= ctx.end - 2 * DAY:
            break
        stay = _stay(ctx, admit, pending is not None, pending_reason)
        if stay.end >= ctx.end:
            break
        stays.append(stay)
        age = ctx.age(stay.end)
        prior = sum(1 for s in stays[:-1] if s.start >= stay.start - timedelta(days=365))
        p = readmission_probability(
            age,
            _active(ctx.chronic, stay.start),
            prior,
            stay.hba1c or 5.4,
            rng.gauss(ctx.phys.frailty, 0.5),
        )
        if rng.random() < p:
            pending = stay.end + timedelta(days=rng.randint(1, 27), hours=rng.randint(0, 23))
            pending_reason = stay.reason_key if rng.random() < 0.5 else None
        else:
            pending, pending_reason = None, None
            t = stay.end + READMISSION_WINDOW + DAY
    return stays


def _overlaps(v: Visit, stays: list[Visit]) -> bool:
    return any(s.start - DAY <= v.start <= s.end + DAY for s in stays)


def simulate(rng: Random, person: Person, directory: Directory, history_years: int) -> Timeline:
    end = person.end
    birth = datetime(person.birth_date.year, person.birth_date.month, person.birth_date.day)
    start = max(birth, datetime.combine(add_years(end.date(), -history_years), datetime.min.time()))
    clinic = rng.choice(directory.clinics or directory.organizations)
    pcp = clinic.practitioners[0]
    chronic = _sample_chronic(rng, person)
    phys = _physiology(rng, person, chronic)
    ctx = _Context(rng, person, directory, clinic, pcp, chronic, phys, start, end)
    stays = _inpatient(ctx)
    others = _wellness(ctx) + _followups(ctx) + _acute(ctx) + _emergencies(ctx)
    others = [v for v in others if not _overlaps(v, stays)]
    if not others and not stays:
        others.append(
            ctx.ambulatory(
                "wellness_adult" if person.age() >= 18 else "wellness_child",
                random_datetime(rng, start, end - DAY),
            )
        )
    visits = sorted(others + stays, key=lambda v: v.start)
    visits += _diagnoses(ctx, visits[0] if visits else None, stays)
    visits.sort(key=lambda v: v.start)
    return Timeline(start, end, chronic, visits, phys, clinic, pcp)
