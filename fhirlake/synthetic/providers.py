"""Shared provider directory: organizations, their locations and practitioners."""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from typing import Any

from faker import Faker

from fhirlake.synthetic import codes
from fhirlake.synthetic.refs import RefStyle
from fhirlake.synthetic.util import STREAM_DIRECTORY, derive_seed, new_id

Resource = dict[str, Any]

PATIENTS_PER_ORGANIZATION = 50
MIN_ORGANIZATIONS = 3


@dataclass(frozen=True)
class Practitioner:
    id: str
    npi: str
    given: str
    family: str
    gender: str

    @property
    def display(self) -> str:
        return f"Dr. {self.given} {self.family}"


@dataclass(frozen=True)
class Organization:
    id: str
    name: str
    is_hospital: bool
    location_id: str
    phone: str
    line: str
    city: str
    state: str
    postal_code: str
    latitude: float
    longitude: float
    practitioners: tuple[Practitioner, ...]


@dataclass(frozen=True)
class Directory:
    organizations: tuple[Organization, ...]
    clinics: tuple[Organization, ...]
    hospitals: tuple[Organization, ...]


def organization_count(patients: int) -> int:
    return max(MIN_ORGANIZATIONS, -(-patients // PATIENTS_PER_ORGANIZATION))


def build_directory(seed: int, patients: int) -> Directory:
    """Deterministic directory sized for the number of patients (every third org is a hospital)."""
    rng = Random(derive_seed(seed, 0, STREAM_DIRECTORY))
    fake = Faker("en_US")
    fake.seed_instance(derive_seed(seed, 1, STREAM_DIRECTORY))
    orgs = []
    npi = 9_999_000_000
    for k in range(organization_count(patients)):
        state = rng.choice(codes.STATES)
        city = fake.city()
        is_hospital = k % 3 == 0
        practitioners = []
        for _ in range(rng.randint(1, 3)):
            npi += 1
            gender = rng.choice(("female", "male"))
            given = fake.first_name_female() if gender == "female" else fake.first_name_male()
            practitioners.append(
                Practitioner(new_id(rng), str(npi), given, fake.last_name(), gender)
            )
        suffix = rng.choice(("General Hospital", "Medical Center", "Regional Hospital"))
        if not is_hospital:
            suffix = rng.choice(("Family Practice", "Primary Care", "Health Center", "Clinic"))
        orgs.append(
            Organization(
                id=new_id(rng),
                name=f"{city} {suffix}",
                is_hospital=is_hospital,
                location_id=new_id(rng),
                phone=fake.numerify("###-###-####"),
                line=fake.street_address(),
                city=city,
                state=state,
                postal_code=fake.zipcode_in_state(state),
                latitude=round(rng.uniform(30.0, 47.0), 6),
                longitude=round(rng.uniform(-122.0, -71.0), 6),
                practitioners=tuple(practitioners),
            )
        )
    clinics = tuple(o for o in orgs if not o.is_hospital)
    hospitals = tuple(o for o in orgs if o.is_hospital)
    return Directory(tuple(orgs), clinics, hospitals)


def _address(org: Organization) -> dict[str, Any]:
    return {
        "line": [org.line],
        "city": org.city,
        "state": org.state,
        "postalCode": org.postal_code,
        "country": "US",
    }


def organization_resource(org: Organization) -> Resource:
    type_code = "prov"
    return {
        "resourceType": "Organization",
        "id": org.id,
        "identifier": [{"system": codes.SYNTHEA_SYSTEM, "value": org.id}],
        "active": True,
        "type": [
            {
                "coding": [
                    {"system": codes.ORG_TYPE, "code": type_code, "display": "Healthcare Provider"}
                ],
                "text": "Healthcare Provider",
            }
        ],
        "name": org.name,
        "telecom": [{"system": "phone", "value": org.phone}],
        "address": [_address(org)],
    }


def location_resource(org: Organization, refs: RefStyle) -> Resource:
    return {
        "resourceType": "Location",
        "id": org.location_id,
        "identifier": [{"system": codes.SYNTHEA_SYSTEM, "value": org.location_id}],
        "status": "active",
        "name": org.name,
        "telecom": [{"system": "phone", "value": org.phone}],
        "address": _address(org),
        "position": {"longitude": org.longitude, "latitude": org.latitude},
        "managingOrganization": refs.organization(org),
    }


def practitioner_resource(pr: Practitioner, org: Organization) -> Resource:
    return {
        "resourceType": "Practitioner",
        "id": pr.id,
        "identifier": [{"system": codes.NPI_SYSTEM, "value": pr.npi}],
        "active": True,
        "name": [{"family": pr.family, "given": [pr.given], "prefix": ["Dr."]}],
        "telecom": [
            {
                "system": "email",
                "value": f"{pr.given}.{pr.family}@example.com".lower().replace(" ", ""),
                "use": "work",
            }
        ],
        "address": [_address(org)],
        "gender": pr.gender,
    }


def organization_resources(directory: Directory, refs: RefStyle) -> list[Resource]:
    """Organizations followed by their Locations."""
    orgs = [organization_resource(o) for o in directory.organizations]
    return orgs + [location_resource(o, refs) for o in directory.organizations]


def practitioner_resources(directory: Directory) -> list[Resource]:
    return [
        practitioner_resource(pr, org)
        for org in directory.organizations
        for pr in org.practitioners
    ]
