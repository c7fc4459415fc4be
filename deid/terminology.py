"""What the release may say about codes: the required bindings of the code elements the
profiles release (a value differing from one of the binding's codes in case alone is that code:
:func:`binding_code`), the displays it may put back (only for codes in a released value set),
the syntax of codes from the code systems the platform sees (an ICD-10, ICD-10-CM or LOINC code
written in lower case is that code, released in upper case: :func:`system_code`), and which
quantities are ages.

The binding table is written out here rather than read from the R4B models: their
``enum_values`` lists are truncated (``'+'`` marks the rest), and a code element the release
names without an entry here is refused when the profile is compiled.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pycountry

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
OMB = "urn:oid:2.16.840.1.113883.6.238"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"

_REQUEST_STATUS = ("active", "on-hold", "cancelled", "completed", "entered-in-error")
_EVENT_STATUS = (
    "preparation",
    "in-progress",
    "not-done",
    "on-hold",
    "stopped",
    "completed",
    "entered-in-error",
    "unknown",
)

# Levels of a Consent's provisions the release profiles name: the top provision and three levels
# of nested exceptions (provision.provision...; FHIR R4 sets no limit). A research opt-out is a
# deny at any of them (pipelines.features.cohort); one nested deeper is not released.
CONSENT_PROVISION_LEVELS = 4

# element (resource type or datatype, then the element path) -> the codes its binding allows
REQUIRED_BINDINGS: dict[str, frozenset[str]] = {
    k: frozenset(v)
    for k, v in {
        "Patient.gender": ("male", "female", "other", "unknown"),
        "Practitioner.gender": ("male", "female", "other", "unknown"),
        "FamilyMemberHistory.sex": ("male", "female", "other", "unknown"),
        "Observation.status": (
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        ),
        "DiagnosticReport.status": (
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        ),
        "Condition.clinicalStatus": (
            "active",
            "recurrence",
            "relapse",
            "inactive",
            "remission",
            "resolved",
        ),
        "Condition.verificationStatus": (
            "unconfirmed",
            "provisional",
            "differential",
            "confirmed",
            "refuted",
            "entered-in-error",
        ),
        "AllergyIntolerance.clinicalStatus": ("active", "inactive", "resolved"),
        "AllergyIntolerance.verificationStatus": (
            "unconfirmed",
            "confirmed",
            "refuted",
            "entered-in-error",
        ),
        "AllergyIntolerance.type": ("allergy", "intolerance"),
        "AllergyIntolerance.category": ("food", "medication", "environment", "biologic"),
        "AllergyIntolerance.criticality": ("low", "high", "unable-to-assess"),
        "Encounter.status": (
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        ),
        # extensible in R4, but the platform releases only the v3 ActEncounterCode values
        "Encounter.class": (
            "AMB",
            "EMER",
            "FLD",
            "HH",
            "IMP",
            "ACUTE",
            "NONAC",
            "OBSENC",
            "PRENC",
            "SS",
            "VR",
        ),
        "Immunization.status": ("completed", "entered-in-error", "not-done"),
        "MedicationRequest.status": (*_REQUEST_STATUS, "stopped", "draft", "unknown"),
        "MedicationRequest.intent": (
            "proposal",
            "plan",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        ),
        "MedicationAdministration.status": (
            "in-progress",
            "not-done",
            "on-hold",
            "completed",
            "entered-in-error",
            "stopped",
            "unknown",
        ),
        "Procedure.status": _EVENT_STATUS,
        "Communication.status": _EVENT_STATUS,
        "Consent.status": (
            "draft",
            "proposed",
            "active",
            "rejected",
            "inactive",
            "entered-in-error",
        ),
        # a Consent's exceptions nest (provision.provision): the profiles release
        # CONSENT_PROVISION_LEVELS levels of them, each level's type bound as the top one's
        **{
            f"Consent{'.provision' * level}.type": ("deny", "permit")
            for level in range(1, CONSENT_PROVISION_LEVELS + 1)
        },
        "Claim.status": ("active", "cancelled", "draft", "entered-in-error"),
        "Claim.use": ("claim", "preauthorization", "predetermination"),
        "Coverage.status": ("active", "cancelled", "draft", "entered-in-error"),
        "DocumentReference.status": ("current", "superseded", "entered-in-error"),
        "Device.status": ("active", "inactive", "entered-in-error", "unknown"),
        "ImagingStudy.status": ("registered", "available", "cancelled", "entered-in-error"),
        "FamilyMemberHistory.status": (
            "partial",
            "completed",
            "entered-in-error",
            "health-unknown",
        ),
        "QuestionnaireResponse.status": (
            "in-progress",
            "completed",
            "amended",
            "entered-in-error",
            "stopped",
        ),
        "Location.status": ("active", "suspended", "inactive"),
        "ExplanationOfBenefit.status": ("active", "cancelled", "draft", "entered-in-error"),
        "ExplanationOfBenefit.use": ("claim", "preauthorization", "predetermination"),
        "ExplanationOfBenefit.outcome": ("queued", "complete", "error", "partial"),
        "CarePlan.status": (
            "draft",
            "active",
            "on-hold",
            "revoked",
            "completed",
            "entered-in-error",
            "unknown",
        ),
        "CarePlan.intent": ("proposal", "plan", "order", "option"),
        "CarePlan.activity.detail.status": (
            "not-started",
            "scheduled",
            "in-progress",
            "on-hold",
            "completed",
            "cancelled",
            "stopped",
            "unknown",
            "entered-in-error",
        ),
        "CareTeam.status": ("proposed", "active", "suspended", "inactive", "entered-in-error"),
        "Medication.status": ("active", "inactive", "entered-in-error"),
        "Quantity.comparator": ("<", "<=", ">=", ">"),
        "us-core-birthsex": ("F", "M", "UNK"),
    }.items()
}

# Code syntax of the code systems the platform's sources use: a code from one of them that does
# not look like one of its codes is text, not a code. Each pattern ends with ``\Z``: ``$`` also
# matches before a final newline, and a code with one was released with it
# ASCII only: Python's \d also matches other scripts' digits, and a "SNOMED code" written in
# full-width digits (an SSN, U+FF10 to U+FF19) looked like a code and was released
# ICD-10 (WHO) and ICD-10-CM: a chapter letter, two characters, then an optional dot and up to four
_ICD10_SYNTAX = r"^[A-Z]\d[0-9A-Z](\.?[0-9A-Z]{1,4})?\Z"
# UCUM (case-sensitive c/s syntax): atoms, prefixes and exponents of letters and digits, the
# operators ``.`` and ``/`` (also leading: ``/min``), ``(...)``, ``[...]`` atoms (``mm[Hg]``),
# ``%``, ``10*3`` and ``10^3``, ``'``, and annotations ``{...}`` (``{beats}/min``,
# ``mL/min/{1.73_m2}``) whose text is one token of letters, digits and ``._+-``: no spaces, so
# an annotation holds no more than a code of another system may. Up to 64 characters, no line
# break (``\Z``, not ``$``, which also matches before a final newline).
_UCUM_SYNTAX = r"^(?=[^{}]*(?:\{[A-Za-z0-9._+-]*\}[^{}]*)*\Z)[A-Za-z0-9%./()\[\]{}*^'_+-]{1,64}\Z"
CODE_SYNTAX: dict[str, re.Pattern[str]] = {
    system: re.compile(pattern, re.ASCII)
    for system, pattern in {
        LOINC: r"^(\d{1,7}-\d|LA\d{1,7}-\d|LP\d{1,7}-\d)\Z",
        "http://snomed.info/sct": r"^\d{6,18}\Z",
        "http://www.nlm.nih.gov/research/umls/rxnorm": r"^\d{1,12}\Z",
        ICD10CM: _ICD10_SYNTAX,
        ICD10: _ICD10_SYNTAX,
        "http://hl7.org/fhir/sid/cvx": r"^\d{1,3}\Z",
        OMB: r"^\d{4}-\d\Z",
        UCUM: _UCUM_SYNTAX,
    }.items()
}
# Code systems whose codes do not depend on case: an ICD-10 or ICD-10-CM code is a chapter letter,
# digits and (ICD-10-CM) letters, written in upper case, and no two codes differ in case alone,
# so `i50.9` can only be I50.9 (:func:`system_code`); LOINC codes "are not case sensitive" (the
# FHIR specification's "Using LOINC with FHIR"), so an answer code `la6576-8` is LA6576-8. Every
# other system keeps the case a code is written in: SNOMED CT, RxNorm, CVX and the OMB
# categories are digits, and UCUM (`mm` is not `Mm`), the HL7 code systems and any system
# without a syntax here may tell codes apart by case alone.
UPPER_CASE_SYSTEMS: frozenset[str] = frozenset({ICD10CM, ICD10, LOINC})
# any other system: one token, no spaces, so a sentence or a full name cannot pass as a code
ANY_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+<>=-]{0,63}\Z")

# An age counted in days (or weeks, hours, minutes) is read with the fewest days 90 years can
# span: 90 years of 365 days and 21 leap days (a 90-year span holds 22 or 23 years divisible by
# 4, and at most one century year that is no leap year, such as 1900 or 2100). Read with the mean
# year of 365.25 days, a patient on their 90th birthday (born 6 December 1936: 32,872 days old on
# 6 December 2026) was 89.9986 years old, and the age was released as written.
AGE_DAYS_PER_YEAR = (90 * 365 + 21) / 90
# UCUM time units -> how many make a year (an age in them is capped at 90 years): the calendar
# year and month, and the units UCUM defines by their days, read with the fewest days 90 years
# span as days are: the tropical, mean Julian and mean Gregorian year, the synodal, mean Julian
# and mean Gregorian month, and the second. Only ``a`` and ``mo`` were read: 93 ``a_j`` in an
# observation not coded as an age was released as written, and 30 ``mo_j`` (two and a half
# years) in a condition's onset age was read as 30 years.
AGE_UNITS_PER_YEAR: dict[str, float] = {
    "a": 1.0,
    "mo": 12.0,
    "wk": AGE_DAYS_PER_YEAR / 7,
    "d": AGE_DAYS_PER_YEAR,
    "h": AGE_DAYS_PER_YEAR * 24,
    "min": AGE_DAYS_PER_YEAR * 24 * 60,
    "s": AGE_DAYS_PER_YEAR * 24 * 60 * 60,
    "a_t": AGE_DAYS_PER_YEAR / 365.24219,
    "a_j": AGE_DAYS_PER_YEAR / 365.25,
    "a_g": AGE_DAYS_PER_YEAR / 365.2425,
    "mo_s": AGE_DAYS_PER_YEAR / 29.53059,
    "mo_j": AGE_DAYS_PER_YEAR / (365.25 / 12),
    "mo_g": AGE_DAYS_PER_YEAR / (365.2425 / 12),
}
# a UCUM unit with annotations (``a{age}``, ``{corrected}mo``) is the unit they annotate
_UCUM_ANNOTATION = re.compile(r"\{[^{}]*\}")
_ANNOTATION_ALONE = re.compile(r"\{([^{}]*)\}")


def ucum_units_per_year(code: str) -> float | None:
    """How many of the UCUM unit ``code`` make a year when it is a time unit (its annotations
    set aside: ``a{age}`` is a year), else None."""
    return AGE_UNITS_PER_YEAR.get(_UCUM_ANNOTATION.sub("", code))


# the same units as an age is often written without UCUM (a FHIR Age's ``unit`` text, a local
# code): read, lower-cased and without a plural ``s``, before an age falls back to years
AGE_UNIT_WORDS_PER_YEAR: dict[str, float] = {
    # "yo", years old, as clinical text and some feeds write an age (95 YO was released)
    **{word: 1.0 for word in ("a", "y", "yr", "year", "annum", "yo")},
    **{word: 12.0 for word in ("mo", "month")},
    **{word: AGE_UNITS_PER_YEAR["wk"] for word in ("wk", "week")},
    **{word: AGE_UNITS_PER_YEAR["d"] for word in ("d", "day")},
    **{word: AGE_UNITS_PER_YEAR["h"] for word in ("h", "hr", "hour")},
    **{word: AGE_UNITS_PER_YEAR["min"] for word in ("min", "minute")},
}


def time_units_per_year(text: str) -> float | None:
    """How many of the unit ``text`` names make a year when it names a time unit: a UCUM time
    unit (:func:`ucum_units_per_year`), else a time unit in words (``yr``, ``years``, ``Days``:
    :data:`AGE_UNIT_WORDS_PER_YEAR`, lower-cased, a plural ``s`` read off words of three
    letters or more, so that UCUM's ``ds`` and ``as``, a decisecond and an attosecond, are no
    days or years); None otherwise. Sources write years as ``yr`` or ``years`` under UCUM's
    system too: the code passes UCUM's syntax, and 95 ``yr`` was released as written. An
    annotation alone (``{yr}``, ``{years}``: UCUM's unity) is read by its text."""
    text = text.strip()
    per_year = ucum_units_per_year(text)
    annotation = _ANNOTATION_ALONE.fullmatch(text)
    if annotation is not None:
        text = annotation.group(1)
    if per_year is None:
        word = text.lower()
        per_year = AGE_UNIT_WORDS_PER_YEAR.get(word)
        if per_year is None and len(word) > 2:
            per_year = AGE_UNIT_WORDS_PER_YEAR.get(word.removesuffix("s"))
    return per_year


# LOINC codes whose value is the patient's age (age, reported age, age at diagnosis/death, age
# at onset of an adverse event: 30972-4, in HL7's LOINCObservationActContextAgeType)
AGE_LOINC = frozenset(
    {
        "30525-0",
        "21612-7",
        "29553-5",
        "21611-9",
        "30972-4",
        "39016-1",
        "63900-5",
        "46096-3",
        "35659-2",
    }
)
# SNOMED CT codes of the same, each seen as an Observation's code: 424144002 |Current
# chronological age|, 397669002 |Age| and 445518008 |Age at onset of clinical finding| (the code
# of C-CDA's Age Observation, which documents converted to FHIR carry)
AGE_SNOMED = frozenset({"424144002", "397669002", "445518008"})
# (system, code) of every observation code whose value is an age
AGE_CODES: frozenset[tuple[str, str]] = frozenset(
    {(LOINC, code) for code in AGE_LOINC} | {(SNOMED, code) for code in AGE_SNOMED}
)
# (system, code) of the observation codes whose value is the patient's birth date: LOINC
# 21112-8 |Birth date| and SNOMED CT 184099003 |Date of birth|
BIRTH_DATE_CODES: frozenset[tuple[str, str]] = frozenset(
    {(LOINC, "21112-8"), (SNOMED, "184099003")}
)
# the codes of both, read whatever system a coding names: LOINC and SNOMED CT are written under
# other names too (their OIDs, HL7 v2's ``LN`` and ``SCT``, a URL with a slash after it) or under
# none, and the views read a coding without a system as the observation's code. Read under
# LOINC's and SNOMED CT's URLs only, an observation coded 30525-0 without a system released an
# age of 95 as written, and one coded 21112-8 a birth date 95 years ago, shifted only.
AGE_TELLING_CODES: frozenset[str] = frozenset(code for _, code in AGE_CODES | BIRTH_DATE_CODES)

# the OMB race and ethnicity categories of US Core: the released value set for its extensions
OMB_DISPLAYS: dict[tuple[str, str], str] = {
    (OMB, "1002-5"): "American Indian or Alaska Native",
    (OMB, "2028-9"): "Asian",
    (OMB, "2054-5"): "Black or African American",
    (OMB, "2076-8"): "Native Hawaiian or Other Pacific Islander",
    (OMB, "2106-3"): "White",
    (OMB, "2131-1"): "Other Race",
    (OMB, "2135-2"): "Hispanic or Latino",
    (OMB, "2186-5"): "Not Hispanic or Latino",
}


def binding_code(binding: frozenset[str], value: str) -> str | None:
    """The code of ``binding`` that ``value`` stands for: ``value`` itself when the binding
    holds it, else the one code it equals without regard to case (``Deny`` is ``deny``,
    ``Active`` is ``active``, ``imp`` is ``IMP``), written as the binding writes it; None when it
    matches no code, or several. A required binding allows its codes only, so a value that
    differs from one of them in case alone can mean nothing else: withholding it would drop
    what the source said (a research opt-out written ``Deny`` would be lost), and releasing the
    binding's own spelling carries no more than the code does."""
    if value in binding:
        return value
    folded = value.casefold()
    matches = [code for code in binding if code.casefold() == folded]
    return matches[0] if len(matches) == 1 else None


def code_is_well_formed(system: str | None, code: str) -> bool:
    syntax = CODE_SYNTAX.get(system or "")
    return bool((syntax or ANY_CODE).match(code))


def system_code(system: str | None, code: str) -> str | None:
    """The code of ``system`` that ``code`` stands for: ``code`` itself when it looks like a
    code of its system, else, for a system whose codes do not depend on case
    (:data:`UPPER_CASE_SYSTEMS`), ``code`` in upper case when that looks like one (``i50.9`` is
    ``I50.9``); None when it looks like no code. Only ASCII is upper-cased, so a letter that
    becomes a code letter only in upper case (the Turkish dotless i) is no code. Released in
    upper case, the code is the one the value sets and the feature SQL read, and says no more
    than the code as written."""
    if code_is_well_formed(system, code):
        return code
    if (
        system in UPPER_CASE_SYSTEMS
        and code.isascii()
        and code_is_well_formed(system, code.upper())
    ):
        return code.upper()
    return None


@dataclass(frozen=True)
class Terminology:
    """Displays the release may carry: (system, code) -> display, from released value sets."""

    displays: Mapping[tuple[str, str], str] = field(default_factory=lambda: dict(OMB_DISPLAYS))

    def display(self, system: str | None, code: str | None) -> str | None:
        if not system or not code:
            return None
        return self.displays.get((system, code))

    @classmethod
    def from_valuesets(cls, valuesets: Iterable[Mapping[str, Any]]) -> Terminology:
        """The OMB categories plus every concept a ValueSet lists explicitly with its display
        (filters name no displays and add none)."""
        displays = dict(OMB_DISPLAYS)
        for valueset in valuesets:
            for include in (valueset.get("compose") or {}).get("include") or []:
                system = include.get("system")
                for concept in include.get("concept") or []:
                    code, display = concept.get("code"), concept.get("display")
                    if system and isinstance(code, str) and isinstance(display, str):
                        displays[(system, code)] = display
        return cls(displays)


# The USPS codes and names of the states, the District of Columbia, the territories and the
# armed forces' postal "states" (USPS Publication 28, appendix B): the values `address.state`
# is released as. Free text there (a ZIP, a city, a county: sources put each of them there)
# was released as written; Safe Harbor removes every place smaller than a state.
US_STATES: dict[str, str] = {
    "AL": "Alabama", "AK": "Alaska", "AZ": "Arizona", "AR": "Arkansas", "CA": "California",
    "CO": "Colorado", "CT": "Connecticut", "DE": "Delaware", "FL": "Florida", "GA": "Georgia",
    "HI": "Hawaii", "ID": "Idaho", "IL": "Illinois", "IN": "Indiana", "IA": "Iowa",
    "KS": "Kansas", "KY": "Kentucky", "LA": "Louisiana", "ME": "Maine", "MD": "Maryland",
    "MA": "Massachusetts", "MI": "Michigan", "MN": "Minnesota", "MS": "Mississippi",
    "MO": "Missouri", "MT": "Montana", "NE": "Nebraska", "NV": "Nevada", "NH": "New Hampshire",
    "NJ": "New Jersey", "NM": "New Mexico", "NY": "New York", "NC": "North Carolina",
    "ND": "North Dakota", "OH": "Ohio", "OK": "Oklahoma", "OR": "Oregon", "PA": "Pennsylvania",
    "RI": "Rhode Island", "SC": "South Carolina", "SD": "South Dakota", "TN": "Tennessee",
    "TX": "Texas", "UT": "Utah", "VT": "Vermont", "VA": "Virginia", "WA": "Washington",
    "WV": "West Virginia", "WI": "Wisconsin", "WY": "Wyoming",
    "DC": "District of Columbia", "AS": "American Samoa", "GU": "Guam",
    "MP": "Northern Mariana Islands", "PR": "Puerto Rico", "VI": "Virgin Islands",
    "UM": "United States Minor Outlying Islands", "FM": "Federated States of Micronesia",
    "MH": "Marshall Islands", "PW": "Palau",
    "AA": "Armed Forces Americas", "AE": "Armed Forces Europe", "AP": "Armed Forces Pacific",
}  # fmt: skip
# every form a state is read in, case-folded, and its USPS code: what it is released as
_STATE_CODES: dict[str, str] = {
    form.casefold(): code for code, name in US_STATES.items() for form in (code, name)
} | {
    "u.s. virgin islands": "VI",
    "us virgin islands": "VI",
    "washington dc": "DC",
    "washington d.c.": "DC",
}


# a place written with abbreviation dots: letters each followed by one dot (``D.C.``, ``N.Y.``),
# or a code ended by one (``MA.``)
_DOTTED = re.compile(r"(?:[a-z]\. ?)+[a-z]?|[a-z]{2}\.")
# longer than any state's name with room for padding (a fixed-width export's): anything longer
# is text, however it reads once its spaces are folded
_STATE_MAX_CHARS = 64


def _place_code(value: str, max_chars: int, codes: dict[str, str]) -> str | None:
    """The code ``codes`` gives ``value`` in any case, with runs of spaces as one, or with
    abbreviation dots; None for anything else, dots elsewhere, or over ``max_chars``."""
    if len(value) > max_chars:
        return None
    form = " ".join(value.split()).casefold()
    if form in codes:
        return codes[form]
    if _DOTTED.fullmatch(form) is None:
        return None
    return codes.get(form.replace(".", ""))


def us_state_code(value: str) -> str | None:
    """The USPS code of the state of :data:`US_STATES` that ``value`` names by its code or its
    name, in any case, with runs of spaces as one (``ma``, ``New  York``), or by its code with
    abbreviation dots (``D.C.`` for DC); None for anything else, dots elsewhere (``M.A....``,
    ``Ma.ss``) and values longer than 64 characters. A state is released as its code, so that
    how a source writes it (``M.A.``, ``ma``, ``Massachusetts``) neither tells sources apart
    nor splits one state into several k-anonymity groups."""
    return _place_code(value, _STATE_MAX_CHARS, _STATE_CODES)


def is_us_state(value: str) -> bool:
    """Whether ``value`` names a state (:func:`us_state_code`)."""
    return us_state_code(value) is not None


def _folded(text: str) -> str:
    """``text`` without its accents (``Türkiye`` → ``Turkiye``), as an ASCII-only source
    writes it."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


@cache
def _country_codes() -> dict[str, str]:
    """Every ISO 3166-1 country's alpha-2 and alpha-3 codes and its names (short, official,
    common, with and without accents), case-folded, each with its alpha-2 code (pycountry's
    database)."""
    codes: dict[str, str] = {}
    for country in pycountry.countries:
        for name in ("alpha_2", "alpha_3", "name", "official_name", "common_name"):
            value = getattr(country, name, None)
            for form in {value, _folded(value)} if value else ():
                codes[" ".join(form.split()).casefold()] = country.alpha_2
    return codes


# longer than any country's name (52 characters) with room for padding: anything longer is text
_COUNTRY_MAX_CHARS = 96


def _unaccented(text: str) -> str:
    """``text`` without its accents, its other characters as written (``São Tomé`` → ``Sao
    Tome``; a full-width letter stays full-width)."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


def country_code(value: str) -> str | None:
    """The ISO 3166-1 alpha-2 code of the country ``value`` names by its two- or three-letter
    code or a name of it, in any case, with runs of spaces as one (``US``, ``usa``,
    ``United States``), or by its code with abbreviation dots (``U.S.A.``), in 96 characters
    at most; None for anything else. A name is read with or without its accents, in either
    Unicode form (``Türkiye`` composed or as ``u`` and a combining diaeresis, ``Turkiye``), and
    with accents the database does not write (``São Tomé and Príncipe``). A country is
    released as its code."""
    codes = _country_codes()
    code = _place_code(value, _COUNTRY_MAX_CHARS, codes)
    if code is None and len(value) <= _COUNTRY_MAX_CHARS:
        code = _place_code(unicodedata.normalize("NFC", value), _COUNTRY_MAX_CHARS, codes)
    if code is None and len(value) <= _COUNTRY_MAX_CHARS:
        code = _place_code(_unaccented(value), _COUNTRY_MAX_CHARS, codes)
    return code


def is_country(value: str) -> bool:
    """Whether ``value`` names a country (:func:`country_code`)."""
    return country_code(value) is not None
