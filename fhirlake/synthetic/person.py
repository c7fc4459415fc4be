"""Demographics (with full PHI, as a real export has it) and the Patient resource."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from random import Random
from typing import Any

from faker import Faker

from fhirlake.synthetic import codes
from fhirlake.synthetic.providers import Organization, Practitioner
from fhirlake.synthetic.refs import RefStyle
from fhirlake.synthetic.util import REFERENCE_DATE, age_at, iso, iso_date, new_id

Resource = dict[str, Any]

# (low age, high age, share): a visible tail over 89 so age-based de-identification is exercised.
AGE_BANDS: tuple[tuple[int, int, float], ...] = (
    (0, 18, 0.17),
    (18, 40, 0.23),
    (40, 65, 0.30),
    (65, 80, 0.17),
    (80, 90, 0.08),
    (90, 106, 0.05),
)
_MRN_MULTIPLIER = 7_654_321  # coprime with 9e7, so MRNs are distinct within a run

# A hospital's patients live in its catchment (Synthea, too, simulates one state): most in a
# handful of ZIP3 areas around it, a few just across the state line. Spreading patients over
# the whole country instead makes nearly every ZIP3 unique, which no real release looks like.
# (state, ZIP3, share)
CATCHMENT: tuple[tuple[str, str, float], ...] = (
    ("MA", "021", 0.34),
    ("MA", "024", 0.20),
    ("MA", "019", 0.16),
    ("MA", "018", 0.14),
    ("MA", "017", 0.14),
    ("NH", "030", 0.02),
)
_NON_ALNUM = re.compile(r"[^a-z0-9]")


@dataclass(frozen=True)
class Address:
    line: str
    city: str
    state: str
    postal_code: str
    latitude: float | None
    longitude: float | None


@dataclass(frozen=True)
class Person:
    id: str
    mrn: str
    gender: str
    given: tuple[str, ...]
    family: str
    prefix: str | None
    maiden_family: str | None
    birth_date: date
    deceased: datetime | None
    marital: str
    race: tuple[str, str]
    hispanic: bool
    language: tuple[str, str]
    address: Address
    home_phone: str
    mobile_phone: str | None
    email: str | None
    ssn: str
    drivers_license: str | None
    passport: str | None
    mothers_maiden_name: str
    birth_city: str
    birth_state: str
    multiple_birth: bool
    payer: str

    @property
    def full_name(self) -> str:
        return " ".join((*self.given, self.family))

    @property
    def end(self) -> datetime:
        """Last moment of the record: death or the reference date."""
        return self.deceased or REFERENCE_DATE

    def age(self, when: datetime | None = None) -> int:
        return age_at(self.birth_date, (when or self.end).date())


def _sample_age(rng: Random) -> int:
    u = rng.random()
    for low, high, share in AGE_BANDS:
        if u < share:
            return rng.randint(low, high - 1)
        u -= share
    return rng.randint(AGE_BANDS[-1][0], AGE_BANDS[-1][1] - 1)


def death_probability(age: int) -> float:
    return 0.03 + 0.4 / (1.0 + math.exp(-(age - 85) / 5.0))


def _weighted(rng: Random, items: tuple[tuple[str, str, float], ...]) -> tuple[str, str]:
    u = rng.random()
    for code, display, weight in items:
        if u < weight:
            return code, display
        u -= weight
    return items[-1][0], items[-1][1]


def _catchment_area(rng: Random) -> tuple[str, str]:
    """(state, ZIP3) of a patient's home, drawn from :data:`CATCHMENT`."""
    u = rng.random()
    for state, zip3, share in CATCHMENT:
        if u < share:
            return state, zip3
        u -= share
    return CATCHMENT[-1][0], CATCHMENT[-1][1]


def _phone(fake: Faker) -> str:
    # Drop extensions ("x123"): they are rare on patient records.
    return str(fake.phone_number()).split("x")[0].strip()


def _payer(rng: Random, age: int) -> str:
    if age >= 65:
        return "Medicare"
    u = rng.random()
    if u < 0.15:
        return "Medicaid"
    if u < 0.20:
        return "NO_INSURANCE"
    return rng.choice(codes.PAYERS)


def sample_person(rng: Random, fake: Faker, index: int, seed: int, history_years: int) -> Person:
    """Draw one person; ``history_years`` is used to place a death inside the history window."""
    age = _sample_age(rng)
    gender = rng.choice(("female", "male"))
    deceased: datetime | None = None
    if rng.random() < death_probability(age):
        back = timedelta(days=rng.randint(1, 365 * history_years - 1), minutes=rng.randint(0, 1439))
        deceased = REFERENCE_DATE - back
    end = deceased or REFERENCE_DATE
    birth = end.date() - timedelta(days=age * 365 + rng.randint(0, 364) + age // 4)
    if birth >= end.date():
        birth = end.date() - timedelta(days=1)
    first = fake.first_name_female() if gender == "female" else fake.first_name_male()
    given = [first]
    if rng.random() < 0.7:
        given.append(fake.first_name_female() if gender == "female" else fake.first_name_male())
    family = fake.last_name()
    real_age = age_at(birth, end.date())
    marital = "S"
    if real_age >= 18:
        marital = rng.choices(("M", "S", "D", "W"), (0.5, 0.3, 0.12, 0.08 + real_age / 1000))[0]
    maiden = None
    if gender == "female" and marital in ("M", "W", "D") and rng.random() < 0.75:
        maiden, family = family, fake.last_name()
    prefix = None
    if real_age >= 18:
        prefix = "Mr." if gender == "male" else ("Mrs." if marital == "M" else "Ms.")
    state, zip3 = _catchment_area(rng)
    geo = rng.random() < 0.6
    address = Address(
        line=str(fake.street_address()),
        city=str(fake.city()),
        state=state,
        postal_code=f"{zip3}{rng.randint(0, 99):02d}",
        latitude=round(rng.uniform(30.0, 47.0), 6) if geo else None,
        longitude=round(rng.uniform(-122.0, -71.0), 6) if geo else None,
    )
    email = None
    if real_age >= 13 and rng.random() < 0.85:
        local = _NON_ALNUM.sub("", first.lower()) + "." + _NON_ALNUM.sub("", family.lower())
        email = f"{local}{rng.randint(1, 99)}@{fake.free_email_domain()}"
    birth_state = state if rng.random() < 0.6 else rng.choice(codes.STATES)
    return Person(
        id=new_id(rng),
        mrn=f"{10_000_000 + (index * _MRN_MULTIPLIER + seed * 131) % 90_000_000}",
        gender=gender,
        given=tuple(given),
        family=family,
        prefix=prefix,
        maiden_family=maiden,
        birth_date=birth,
        deceased=deceased,
        marital=marital,
        race=_weighted(rng, codes.RACES),
        hispanic=rng.random() < 0.16,
        language=_weighted(rng, codes.LANGUAGES),
        address=address,
        home_phone=_phone(fake),
        mobile_phone=_phone(fake) if real_age >= 12 and rng.random() < 0.7 else None,
        email=email,
        ssn=str(fake.ssn()),
        drivers_license=fake.bothify("S99######") if real_age >= 16 else None,
        passport=str(fake.passport_number()) if rng.random() < 0.3 else None,
        mothers_maiden_name=f"{fake.first_name_female()} {fake.last_name()}",
        birth_city=str(fake.city()),
        birth_state=birth_state,
        multiple_birth=rng.random() < 0.02,
        payer=_payer(rng, real_age),
    )


def _identifier(code: str, display: str, system: str, value: str) -> dict[str, Any]:
    return {
        "type": {
            "coding": [{"system": codes.V2_0203, "code": code, "display": display}],
            "text": display,
        },
        "system": system,
        "value": value,
    }


def _identifiers(p: Person) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"system": codes.SYNTHEA_SYSTEM, "value": p.id},
        _identifier("MR", "Medical Record Number", codes.MRN_SYSTEM, p.mrn),
        _identifier("SS", "Social Security Number", codes.SSN_SYSTEM, p.ssn),
    ]
    if p.drivers_license:
        out.append(_identifier("DL", "Driver's license number", codes.DL_SYSTEM, p.drivers_license))
    if p.passport:
        out.append(_identifier("PPN", "Passport Number", codes.PASSPORT_SYSTEM, p.passport))
    return out


def _extensions(p: Person) -> list[dict[str, Any]]:
    race_code, race_display = p.race
    eth_code, eth_display = codes.ETHNICITIES[0 if p.hispanic else 1]
    return [
        {
            "url": codes.EXT_RACE,
            "extension": [
                {
                    "url": "ombCategory",
                    "valueCoding": {
                        "system": codes.OMB_RACE,
                        "code": race_code,
                        "display": race_display,
                    },
                },
                {"url": "text", "valueString": race_display},
            ],
        },
        {
            "url": codes.EXT_ETHNICITY,
            "extension": [
                {
                    "url": "ombCategory",
                    "valueCoding": {
                        "system": codes.OMB_RACE,
                        "code": eth_code,
                        "display": eth_display,
                    },
                },
                {"url": "text", "valueString": eth_display},
            ],
        },
        {"url": codes.EXT_MAIDEN, "valueString": p.mothers_maiden_name},
        {"url": codes.EXT_BIRTHSEX, "valueCode": "F" if p.gender == "female" else "M"},
        {
            "url": codes.EXT_BIRTHPLACE,
            "valueAddress": {"city": p.birth_city, "state": p.birth_state, "country": "US"},
        },
    ]


def _names(p: Person) -> list[dict[str, Any]]:
    official: dict[str, Any] = {"use": "official", "family": p.family, "given": list(p.given)}
    if p.prefix:
        official["prefix"] = [p.prefix]
    names = [official]
    if p.maiden_family:
        names.append({"use": "maiden", "family": p.maiden_family, "given": list(p.given)})
    return names


def _telecom(p: Person) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"system": "phone", "value": p.home_phone, "use": "home"}]
    if p.mobile_phone:
        out.append({"system": "phone", "value": p.mobile_phone, "use": "mobile"})
    if p.email:
        out.append({"system": "email", "value": p.email, "use": "home"})
    return out


def _address(a: Address) -> dict[str, Any]:
    out: dict[str, Any] = {
        "line": [a.line],
        "city": a.city,
        "state": a.state,
        "postalCode": a.postal_code,
        "country": "US",
    }
    if a.latitude is not None and a.longitude is not None:
        out["extension"] = [
            {
                "url": codes.EXT_GEOLOCATION,
                "extension": [
                    {"url": "latitude", "valueDecimal": a.latitude},
                    {"url": "longitude", "valueDecimal": a.longitude},
                ],
            }
        ]
    return out


def _narrative(p: Person) -> dict[str, str]:
    name = html.escape(f"{p.prefix + ' ' if p.prefix else ''}{p.full_name}")
    div = (
        '<div xmlns="http://www.w3.org/1999/xhtml">'
        f"<p>Patient: <b>{name}</b>, {p.gender}, born {iso_date(p.birth_date)}. "
        f"MRN {html.escape(p.mrn)}.</p></div>"
    )
    return {"status": "generated", "div": div}


def patient_resource(
    p: Person,
    refs: RefStyle,
    clinic: Organization,
    pcp: Practitioner,
    contained_org_name: str | None,
) -> Resource:
    """The Patient; ``contained_org_name`` makes the managing organization a contained one."""
    res: Resource = {"resourceType": "Patient", "id": p.id, "text": _narrative(p)}
    if contained_org_name:
        res["contained"] = [
            {
                "resourceType": "Organization",
                "id": "org1",
                "active": True,
                "name": contained_org_name,
            }
        ]
    res["extension"] = _extensions(p)
    res["identifier"] = _identifiers(p)
    res["name"] = _names(p)
    res["telecom"] = _telecom(p)
    res["gender"] = p.gender
    res["birthDate"] = iso_date(p.birth_date)
    if p.deceased:
        res["deceasedDateTime"] = iso(p.deceased)
    res["address"] = [_address(p.address)]
    res["maritalStatus"] = {
        "coding": [
            {
                "system": codes.MARITAL,
                "code": p.marital,
                "display": codes.MARITAL_STATUSES[p.marital],
            }
        ],
        "text": codes.MARITAL_STATUSES[p.marital],
    }
    res["multipleBirthBoolean"] = p.multiple_birth
    lang_code, lang_display = p.language
    res["communication"] = [
        {
            "language": {
                "coding": [
                    {"system": "urn:ietf:bcp:47", "code": lang_code, "display": lang_display}
                ],
                "text": lang_display,
            }
        }
    ]
    res["generalPractitioner"] = [refs.practitioner(pcp)]
    if contained_org_name:
        res["managingOrganization"] = {"reference": "#org1", "display": contained_org_name}
    else:
        res["managingOrganization"] = refs.organization(clinic)
    return res
