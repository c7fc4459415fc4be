"""Reference styles: transaction bundles (urn:uuid + conditional) and bulk NDJSON (relative)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from fhirlake.synthetic import codes

if TYPE_CHECKING:
    from fhirlake.synthetic.providers import Organization, Practitioner

Reference = dict[str, Any]


class RefStyle(Protocol):
    def local(self, resource_type: str, resource_id: str) -> Reference: ...

    def organization(self, org: Organization) -> Reference: ...

    def location(self, org: Organization) -> Reference: ...

    def practitioner(self, pr: Practitioner) -> Reference: ...


class BundleRefs:
    """References inside a per-patient transaction bundle, as Synthea writes them."""

    def local(self, resource_type: str, resource_id: str) -> Reference:
        return {"reference": f"urn:uuid:{resource_id}"}

    def organization(self, org: Organization) -> Reference:
        return {
            "reference": f"Organization?identifier={codes.SYNTHEA_SYSTEM}|{org.id}",
            "display": org.name,
        }

    def location(self, org: Organization) -> Reference:
        return {
            "reference": f"Location?identifier={codes.SYNTHEA_SYSTEM}|{org.location_id}",
            "display": org.name,
        }

    def practitioner(self, pr: Practitioner) -> Reference:
        return {
            "reference": f"Practitioner?identifier={codes.NPI_SYSTEM}|{pr.npi}",
            "display": pr.display,
        }


class NdjsonRefs:
    """Relative references, as a bulk export writes them."""

    def local(self, resource_type: str, resource_id: str) -> Reference:
        return {"reference": f"{resource_type}/{resource_id}"}

    def organization(self, org: Organization) -> Reference:
        return {"reference": f"Organization/{org.id}", "display": org.name}

    def location(self, org: Organization) -> Reference:
        return {"reference": f"Location/{org.location_id}", "display": org.name}

    def practitioner(self, pr: Practitioner) -> Reference:
        return {"reference": f"Practitioner/{pr.id}", "display": pr.display}
