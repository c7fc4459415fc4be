"""FHIR references: find them in a resource, classify them, and name the patient compartment."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource

RefKind = Literal["contained", "urn", "relative", "absolute", "conditional", "other"]

_RELATIVE = re.compile(
    r"^(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?\Z"
)
_ABSOLUTE = re.compile(
    r"^https?://\S+?/(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?\Z"
)
_CONDITIONAL = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)\?(?P<query>.+)\Z")

# R4 resource types the R4B models (which records are validated with) no longer have: a
# reference to one is still a reference to a resource
_R4_ONLY_TYPES = frozenset(
    {
        "EffectEvidenceSynthesis", "RiskEvidenceSynthesis", "MedicinalProduct",
        "MedicinalProductAuthorization", "MedicinalProductContraindication",
        "MedicinalProductIndication", "MedicinalProductIngredient", "MedicinalProductInteraction",
        "MedicinalProductManufactured", "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical", "MedicinalProductUndesirableEffect",
        "SubstanceSpecification", "SubstanceNucleicAcid", "SubstancePolymer", "SubstanceProtein",
        "SubstanceReferenceInformation", "SubstanceSourceMaterial",
    }
)  # fmt: skip
_ABSTRACT_TYPES = frozenset({"Resource", "DomainResource"})


@lru_cache(maxsize=1024)
def is_resource_type(name: str) -> bool:
    """Whether ``name`` is a FHIR R4 resource type. The type of a reference must be one: in
    ``CourtneyBarajas/x1`` it is text (a name, here), which would otherwise be kept as a type in
    the reference index and in the released reference."""
    if name in _R4_ONLY_TYPES:
        return True
    if name in _ABSTRACT_TYPES:
        return False
    try:
        model = get_fhir_model_class(name)
    except ValueError:
        return False
    return issubclass(model, Resource)


def _typed(match: re.Match[str] | None) -> re.Match[str] | None:
    """``match`` when its ``type`` group names a resource type."""
    return match if match is not None and is_resource_type(match.group("type")) else None


# Search parameters of the R4 Patient CompartmentDefinition that point at the patient, per
# resource type, reduced to the element names that carry them.
PATIENT_COMPARTMENT_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Account": ("subject",),
    "AdverseEvent": ("subject",),
    "AllergyIntolerance": ("patient", "recorder", "asserter"),
    "Appointment": ("participant",),
    "AppointmentResponse": ("actor",),
    "AuditEvent": ("patient",),
    "Basic": ("subject",),
    "BodyStructure": ("patient",),
    "CarePlan": ("subject",),
    "CareTeam": ("subject",),
    "ChargeItem": ("subject",),
    "Claim": ("patient",),
    "ClaimResponse": ("patient",),
    "ClinicalImpression": ("subject",),
    "Communication": ("subject",),
    "CommunicationRequest": ("subject",),
    "Composition": ("subject",),
    "Condition": ("subject",),
    "Consent": ("patient",),
    "Coverage": ("beneficiary", "subscriber", "policyHolder"),
    "CoverageEligibilityRequest": ("patient",),
    "CoverageEligibilityResponse": ("patient",),
    "DetectedIssue": ("patient",),
    "Device": ("patient",),
    "DeviceRequest": ("subject",),
    "DeviceUseStatement": ("subject",),
    "DiagnosticReport": ("subject",),
    "DocumentManifest": ("subject",),
    "DocumentReference": ("subject",),
    "Encounter": ("subject",),
    "EnrollmentRequest": ("candidate",),
    "EpisodeOfCare": ("patient",),
    "ExplanationOfBenefit": ("patient",),
    "FamilyMemberHistory": ("patient",),
    "Flag": ("subject",),
    "Goal": ("subject",),
    "Group": ("member",),
    "ImagingStudy": ("subject",),
    "Immunization": ("patient",),
    "ImmunizationEvaluation": ("patient",),
    "ImmunizationRecommendation": ("patient",),
    "Invoice": ("subject", "recipient"),
    "List": ("subject",),
    "MeasureReport": ("subject",),
    "Media": ("subject",),
    "MedicationAdministration": ("subject",),
    "MedicationDispense": ("subject",),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "MolecularSequence": ("patient",),
    "NutritionOrder": ("patient",),
    "Observation": ("subject",),
    "Person": ("link",),
    "Procedure": ("subject",),
    "Provenance": ("target", "patient"),
    "QuestionnaireResponse": ("subject", "author"),
    "RelatedPerson": ("patient",),
    "RequestGroup": ("subject",),
    "ResearchSubject": ("individual",),
    "RiskAssessment": ("subject",),
    "Schedule": ("actor",),
    "ServiceRequest": ("subject",),
    "Specimen": ("subject",),
    "SupplyDelivery": ("patient",),
    "SupplyRequest": ("requester",),
    "VisionPrescription": ("patient",),
}


@dataclass(frozen=True, slots=True)
class Reference:
    """One ``reference`` string found in a resource, with the element path it sits at."""

    path: str
    value: str

    @property
    def kind(self) -> RefKind:
        return classify(self.value)


def classify(value: str) -> RefKind:
    if value.startswith("#"):
        return "contained"
    if value.startswith("urn:uuid:") or value.startswith("urn:oid:"):
        return "urn"
    if _typed(_RELATIVE.match(value)):
        return "relative"
    if _typed(_CONDITIONAL.match(value)):
        return "conditional"
    if _typed(_ABSOLUTE.match(value)):
        return "absolute"
    return "other"


def literal_target(value: str) -> tuple[str, str] | None:
    """``(type, id)`` for a relative or absolute literal reference, else None."""
    match = _typed(_RELATIVE.match(value) or _ABSOLUTE.match(value))
    if match is None:
        return None
    return match.group("type"), match.group("id")


def normalise_base(base: str | None) -> str | None:
    """A server base URL compared as references use it: without a trailing slash."""
    return base.rstrip("/") if base else None


def local_target(value: str, server_base: str | None) -> tuple[str, str] | None:
    """``(type, id)`` of a literal reference to this server: a relative one, or an absolute one
    under ``server_base`` (when configured). An absolute URL of any other server names that
    server's resource, which shares only its id with ours: None."""
    if _RELATIVE.match(value):
        return literal_target(value)
    base = normalise_base(server_base)
    if base is None or not value.startswith(base + "/"):
        return None
    match = _typed(_RELATIVE.match(value[len(base) + 1 :]))
    return (match.group("type"), match.group("id")) if match else None


def is_external(value: str, server_base: str | None) -> bool:
    """An absolute ``http(s)`` reference to a resource of another server."""
    return classify(value) == "absolute" and local_target(value, server_base) is None


def conditional_target(value: str) -> tuple[str, str] | None:
    """``(type, normalised criteria)`` for a conditional reference, else None.

    Only ``identifier=system|value`` criteria are resolvable: it is what bulk exporters
    (Synthea among them) emit, and the only criterion that names one resource.
    """
    match = _typed(_CONDITIONAL.match(value))
    if match is None:
        return None
    query = match.group("query")
    if not query.startswith("identifier=") or "&" in query:
        return None
    return match.group("type"), query[len("identifier=") :]


def logical_reference(node: Any) -> str | None:
    """The conditional form (``Type?identifier=system|value``) of a logical reference: a
    Reference given only by its ``identifier`` (no ``reference``). It is resolved as that
    conditional reference would be (the same identifier index, the same rules when no
    resource or several hold the identifier). The type is the Reference's ``type`` when it
    names a resource type, ``Patient`` when it is absent; None when ``type`` is other text, the
    identifier has no value, or the node is no Reference of this kind.

    Ingest reads logical references only in the Patient compartment's elements, where a
    Reference without a type most often names the patient; an identifier no Patient holds
    resolves to nothing, so reading an untyped one as a Patient's names no one by mistake."""
    if not isinstance(node, dict) or isinstance(node.get("reference"), str):
        return None
    criteria = _one_identifier_criteria(node.get("identifier"))
    target_type = node.get("type", "Patient")
    if criteria is None or not isinstance(target_type, str) or not is_resource_type(target_type):
        return None
    return f"{target_type}?identifier={criteria}"


def iter_logical_references(node: Any, path: str = "") -> Iterator[Reference]:
    """Every logical reference in ``node`` (see :func:`logical_reference`), as its conditional
    form, skipping resources nested in it as :func:`iter_references` does."""
    if isinstance(node, dict):
        conditional = logical_reference(node)
        if conditional is not None:
            yield Reference(path or "reference", conditional)
            return
        for key, value in node.items():
            if key == "contained" or (
                key == "resource" and isinstance(value, dict) and "resourceType" in value
            ):
                continue
            if isinstance(value, dict | list):
                yield from iter_logical_references(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for item in node:
            yield from iter_logical_references(item, path)


def iter_references(node: Any, path: str = "") -> Iterator[Reference]:
    """Every ``reference`` string in a resource, skipping the graphs of resources nested in it
    (contained ones, and those a Bundle or Parameters carries), which resolve in their own
    context."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "contained" or (
                key == "resource" and isinstance(value, dict) and "resourceType" in value
            ):
                continue
            if key == "reference" and isinstance(value, str):
                yield Reference(path or "reference", value)
            elif isinstance(value, dict | list):
                yield from iter_references(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for item in node:
            yield from iter_references(item, path)


def compartment_elements(resource_type: str) -> tuple[str, ...]:
    return PATIENT_COMPARTMENT_ELEMENTS.get(resource_type, ())


def identifier_criteria(resource: dict[str, Any]) -> list[str]:
    """``system|value`` for every identifier of a resource (what conditional refs match); a
    refused record's ``identifier`` that is no array (one object, a number) is read as its
    one item, or as none."""
    out = []
    idents = resource.get("identifier")
    for ident in idents if isinstance(idents, list) else [idents]:
        criteria = _one_identifier_criteria(ident)
        if criteria is not None:
            out.append(criteria)
    return out


def _one_identifier_criteria(ident: Any) -> str | None:
    """``system|value`` of one Identifier (``|value`` without a system), None without a value:
    one rule for the identifiers a resource is indexed under and those a logical reference
    names, so that the two meet."""
    if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
        return None
    system = ident.get("system") if isinstance(ident.get("system"), str) else ""
    return f"{system}|{ident['value']}"


def identifier_match_form(criteria: str) -> str | None:
    """The loose form of one ``system|value`` criteria, for recognising a person whose
    identifier is written differently (``731-55-9012``, ``731559012``, `` 731 55 9012 ``): the
    system without regard to case (:func:`_system_match_form`), the value reduced to its
    letters and digits, case-folded (NFKC first, so a full-width digit is a digit). None when
    nothing of the value is left.

    The system is kept: another system's identifier with the same value is another record
    (another hospital's MRN may equal this one), so loose forms never match across systems.
    Conditional references keep matching the exact ``system|value`` token (FHIR's
    ``identifier=`` search is exact); the loose form only ever meets other loose forms."""
    system, sep, value = criteria.partition("|")
    if not sep:
        return None
    loose = "".join(ch for ch in unicodedata.normalize("NFKC", value) if ch.isalnum())
    return f"{_system_match_form(system)}|{loose.casefold()}" if loose else None


def _system_match_form(system: str) -> str:
    """An identifier system as a person is recognised by: without regard to case, without
    spaces around it and without a trailing slash. URI comparison reads only the scheme, the
    host and a URN's namespace without regard to case (RFC 3986, 6.2.2); the path too here,
    since two systems that differ only in the case of their path are the same hospital's
    register, written twice, far more often than two registers.
    ``HTTP://HOSPITAL.EXAMPLE.ORG/MRN/`` is ``http://hospital.example.org/mrn``."""
    return system.strip().rstrip("/").casefold()
