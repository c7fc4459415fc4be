"""Release by allow-list: a profile names, per resource type, the elements that may leave the
vault and how; everything it does not name is dropped.

The profile is compiled once per resource type into a plan (a tree of typed nodes, the types
taken from the FHIR R4B models), so releasing a resource is one walk over the elements the plan
names: no FHIRPath, no copy of the input. What each kind of element becomes:

- dates (date, dateTime, instant, partial or not) follow the profile's date rule: ``shift``
  (the patient's secret offset; a year-month moves with its 15th day, a year alone stays a
  year; a date over the age limit is withheld, a birth date's made the year of 90; the
  dates of a resource of no patient are withheld under a per-patient shift) or ``year``;
  out-of-range or unreadable dates are withheld and counted;
- ``code`` elements (and the codes of bound codings and of the birth-sex extension) are
  released only when the value is in the element's required binding
  (:data:`deid.terminology.REQUIRED_BINDINGS`), or equals exactly one of its codes without
  regard to case, released as the binding writes it and counted
  (:func:`deid.terminology.binding_code`); else withheld and counted;
- ``Coding``: system, version and code (a code that does not look like a code of its system is
  withheld; a code of a system whose codes do not depend on case, ICD-10, ICD-10-CM or LOINC,
  that does once upper-cased is released upper-cased and counted:
  :func:`deid.terminology.system_code`); ``display`` only from the terminology, for
  codes in a released value set;
- ``Reference``: the literal reference, pseudonymised (a logical one, given by its identifier
  alone, as the literal reference to what ingest resolved it to);
- ``Quantity`` and its kinds: value, comparator, system, code (and unit when it is the code);
  an age of 90 years or more (a UCUM time unit, a FHIR ``Age`` in any unit, or any quantity of
  an age observation: an age LOINC or SNOMED CT code) becomes 90 years, as does an age
  observation's integer value; days, weeks, hours and minutes are read with the fewest days
  90 years span (:data:`deid.terminology.AGE_DAYS_PER_YEAR`); under the ``year`` date rule an
  age is released in whole years (:func:`_age_in_whole_years`); under either rule an age is
  withheld when with its resource's dates it puts the birth year over the age limit (90 or
  more years before this one: :func:`deid.methods.is_year_over_age_limit`,
  :func:`_tells_age_over_limit`);
- strings, markdown, uri, base64Binary, narrative, identifiers: only where a path names them
  with ``keep``; extensions only those the profile lists by URL, in their fixed shape;
- ``contained`` (where a path names it): each contained resource of a type of
  :data:`CONTAINED_TYPES` the profile lists, under that type's own paths, its local id replaced
  by its place (``c0``, ``c1``, ...) and the container's ``#id`` references rewritten to match;
  any other contained resource is dropped (``contained_withheld``);
- ``meta`` is rebuilt by the engine (security labels only).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cache
from typing import Any

from deid import methods
from deid.errors import DeidError
from deid.terminology import (
    AGE_TELLING_CODES,
    ANY_CODE,
    CONSENT_PROVISION_LEVELS,
    OMB,
    REQUIRED_BINDINGS,
    UCUM,
    Terminology,
    binding_code,
    code_is_well_formed,
    country_code,
    system_code,
    time_units_per_year,
    us_state_code,
)
from fhirlake.references import logical_reference

DATE_RULES = ("shift", "year")
PATH_METHODS = ("keep", "pseudonymize", "zip3", "us-state", "country", "year", "code-only")
EXTENSION_SHAPES = ("omb", "code")
DATE_TYPES = frozenset({"date", "dateTime", "instant"})
SCALAR_TYPES = frozenset(
    {"boolean", "integer", "integer64", "decimal", "positiveInt", "unsignedInt"}
)
QUANTITY_TYPES = frozenset(
    {"Quantity", "Age", "Duration", "Count", "Distance", "SimpleQuantity", "MoneyQuantity"}
)
# complex types released whole with their fixed projection when a path names them
_OBJECT_DEFAULTS: dict[str, dict[str, str]] = {
    "CodeableConcept": {"coding": "keep"},
    "Period": {"start": "keep", "end": "keep"},
    "Range": {"low": "keep", "high": "keep"},
    "Ratio": {"numerator": "keep", "denominator": "keep"},
    "Money": {"value": "keep"},
}
# Types a contained resource may be released as: a drug (a MedicationRequest's contained
# Medication) describes no person. A contained Patient, Practitioner or Organization would carry
# the names and identifiers the top-level ones are released without, so they never leave.
CONTAINED_TYPES = frozenset({"Medication"})
MIN_YEAR, MAX_YEAR = 1800, 2200  # outside: a sentinel or a typo, never a real event
AGE_CAP_YEARS = methods.AGE_LIMIT + 1
_DROP = object()
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


class ProfileError(DeidError):
    """A release profile that cannot be compiled; the message names the path."""


@dataclass(slots=True)
class Node:
    """One element of a plan: how to release it, and for objects, which children."""

    kind: str
    many: bool = False
    children: dict[str, Node] = field(default_factory=dict)
    binding: frozenset[str] | None = None
    name: str = ""
    display: bool = True
    shape: str = ""
    age: bool = False  # a FHIR Age: its value is an age, whatever unit it is written in


@dataclass
class ReleaseContext:
    """What releasing one resource needs beyond its plan, and what it records."""

    profile: ReleaseProfile
    resource_type: str
    # the patient's offset; None for a resource of no patient under a per-patient shift, whose
    # dates the shift rule withholds (an offset drawn for the resource alone, beside the
    # patient's records its references name, narrows the patient's: forty such pairs gave it
    # back within days)
    shift_days: int | None
    today: date
    pseudonymise_id: Callable[[str, str], str]
    resolve: Callable[[str], tuple[str, str] | None]
    terminology: Terminology
    age_context: bool = False
    # the latest year among the resource's own dates: an age it holds was counted at or before
    # it (the year date rule withholds an age that puts the birth 90 or more years ago)
    dates_until: int | None = None
    # a contained resource's local id -> the id it is released under (its place)
    contained_ids: dict[str, str] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    labels: set[str] = field(default_factory=set)
    # the first day after ``today`` on which the release could differ (deid.methods.DayHorizon)
    horizon: methods.DayHorizon | None = None

    def changes_on(self, day: date | None) -> None:
        """Note a day on which what is being released comes out otherwise."""
        if self.horizon is not None:
            self.horizon.note(day)


# -- model introspection --------------------------------------------------------------------


@cache
def _model_fields(type_name: str) -> dict[str, tuple[str, bool]]:
    """json name -> (FHIR type, repeats) for a resource, backbone or datatype of R4B."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        cls = get_fhir_model_class(type_name)
    except (KeyError, ValueError) as exc:
        raise ProfileError(f"{type_name} is not an R4B type") from exc
    out: dict[str, tuple[str, bool]] = {}
    for name, info in cls.model_fields.items():
        text = str(info.annotation)
        complex_type = re.search(r"abc\.(\w+)Type", text)
        if complex_type:
            fhir_type = complex_type.group(1)
        elif text.startswith("bool") or "[bool" in text:
            fhir_type = "boolean"
        else:
            constructors = re.findall(r"(\w+)\(", text)
            if not constructors:
                continue
            fhir_type = constructors[-1][0].lower() + constructors[-1][1:]
        out[info.alias or name] = (fhir_type, "List[" in text)
    return out


def _field(owner: str, key: str, where: str) -> tuple[str, bool]:
    found = _model_fields(owner).get(key)
    if found is None:
        raise ProfileError(f"{where}: {owner} has no element {key!r}")
    return found


# -- compiling --------------------------------------------------------------------------------


# path methods that release a free-text place only when it names a place of a known list
_PLACE_KINDS = {"us-state": "us_state", "country": "country"}


def _leaf(fhir_type: str, many: bool, method: str, binding_key: str, where: str) -> Node:
    """The node of a named element, from its type and the profile's method."""
    name = where.rsplit(".", 1)[-1]
    if method == "zip3":
        return Node("zip3", many, name=name)
    if method in _PLACE_KINDS:
        if fhir_type != "string":
            raise ProfileError(f"{where}: {method!r} applies to strings only")
        return Node(_PLACE_KINDS[method], many, name=name)
    if fhir_type in DATE_TYPES:
        return Node("year" if method == "year" else "date", many, name=name)
    if method == "year":
        raise ProfileError(f"{where}: 'year' applies to dates only")
    if fhir_type == "code":
        binding = REQUIRED_BINDINGS.get(binding_key)
        if binding is None:
            raise ProfileError(f"{where}: a code element needs a binding in deid.terminology")
        return Node("code", many, binding=binding, name=name)
    if fhir_type in SCALAR_TYPES:
        return Node("scalar", many, name=name)
    if fhir_type in ("Coding", "CodeableConcept"):
        coding = Node(
            "coding",
            fhir_type == "CodeableConcept",
            binding=REQUIRED_BINDINGS.get(binding_key),
            display=method != "code-only",
            name="coding",
        )
        if fhir_type == "Coding":
            coding.many = many
            return coding
        return Node("object", many, {"coding": coding}, name=name)
    if fhir_type == "Reference":
        return Node("reference", many, name=name)
    if fhir_type == "Resource" and name == "contained" and method == "keep":
        return Node("contained", many, name=name)
    if fhir_type in QUANTITY_TYPES:
        return Node("quantity", many, name=name, age=fhir_type == "Age")
    if fhir_type == "Extension":
        return Node("extension", many, name=name)
    if fhir_type in _OBJECT_DEFAULTS:
        children = {
            key: _leaf(*_field(fhir_type, key, where), sub, f"{fhir_type}.{key}", where)
            for key, sub in _OBJECT_DEFAULTS[fhir_type].items()
        }
        return Node("object", many, children, name=name)
    if method == "keep" and fhir_type[:1].islower():
        return Node("text", many, name=name)
    if method == "pseudonymize" and fhir_type == "id":
        return Node("id", many, name=name)
    raise ProfileError(f"{where}: a {fhir_type} is released by naming its elements")


def compile_plan(resource_type: str, paths: dict[str, str]) -> Node:
    """The plan of one resource type: ``paths`` maps dotted element paths (choice elements by
    their JSON names, e.g. ``valueQuantity``) to a method of :data:`PATH_METHODS`."""
    root = Node("object", name=resource_type)
    for path, method in paths.items():
        if method not in PATH_METHODS:
            raise ProfileError(f"{resource_type}.{path}: unknown method {method!r}")
        node, owner, trail = root, resource_type, resource_type
        keys = path.split(".")
        for depth, key in enumerate(keys):
            fhir_type, many = _field(owner, key, f"{resource_type}.{path}")
            trail = f"{trail}.{key}"
            binding_key = f"{resource_type}.{'.'.join(keys[: depth + 1])}"
            if depth == len(keys) - 1:
                if key == "id" and depth == 0:
                    node.children[key] = Node("id", name="id")
                else:
                    node.children[key] = _leaf(fhir_type, many, method, binding_key, trail)
                break
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = Node("object", many, name=key)
            elif child.kind != "object":
                raise ProfileError(f"{trail}: named whole and by its elements")
            node, owner = child, fhir_type
    return root


@dataclass(frozen=True)
class ReleaseProfile:
    """A loaded allow-list: the date rule, the extensions it releases (URL -> shape) and the
    element paths per resource type (``*``: paths every type releases)."""

    date_rule: str
    extensions: dict[str, str]
    resources: dict[str, dict[str, str]]
    restricted_zip3: frozenset[str] = frozenset()
    _plans: dict[str, Node] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: Any, restricted_zip3: frozenset[str] = frozenset()) -> ReleaseProfile:
        if not isinstance(raw, dict):
            raise ProfileError("release must be an object")
        rule = raw.get("dates", "shift")
        if rule not in DATE_RULES:
            raise ProfileError(f"release.dates must be one of {DATE_RULES}")
        extensions = raw.get("extensions") or {}
        if not isinstance(extensions, dict) or not all(
            v in EXTENSION_SHAPES for v in extensions.values()
        ):
            raise ProfileError(f"release.extensions maps URLs to one of {EXTENSION_SHAPES}")
        resources = raw.get("resources")
        if not isinstance(resources, dict) or not all(
            isinstance(v, dict) for v in resources.values()
        ):
            raise ProfileError("release.resources maps resource types to {path: method}")
        profile = cls(rule, dict(extensions), resources, restricted_zip3)
        for rtype in resources:
            if rtype != "*":
                profile.plan(rtype)  # a bad path fails at load, not mid-batch
        return profile

    def lists(self, resource_type: str) -> bool:
        """Whether the profile names elements of this type (beyond the ``*`` ones)."""
        return resource_type in self.resources and resource_type != "*"

    def plan(self, resource_type: str) -> Node:
        plan = self._plans.get(resource_type)
        if plan is None:
            # a type the profile does not list releases the ``*`` paths only (its pseudonym)
            paths = {**self.resources.get("*", {}), **self.resources.get(resource_type, {})}
            plan = self._plans[resource_type] = compile_plan(resource_type, paths)
        return plan


# -- releasing --------------------------------------------------------------------------------


def release_resource(resource: dict[str, Any], ctx: ReleaseContext) -> dict[str, Any]:
    """The released form of ``resource`` under its type's plan (a new dict; the input is not
    changed)."""
    plan = ctx.profile.plan(ctx.resource_type)
    ctx.age_context = ctx.resource_type == "Observation" and _is_age_observation(resource)
    ctx.dates_until = _latest_year(resource)
    if "contained" in plan.children:
        ctx.contained_ids = _contained_ids(resource, ctx.profile)
    if ctx.resource_type == "Consent" and _provision_depth(resource) > CONSENT_PROVISION_LEVELS:
        # the profiles name CONSENT_PROVISION_LEVELS levels: a deny nested deeper is not
        # released, so an opt-out there applies to no one; counted, never silent
        ctx.counts["consent_provisions_too_deep"] += 1
    out = _object(resource, plan, ctx)
    released = out if isinstance(out, dict) else {}
    return {"resourceType": ctx.resource_type, **released}


def released_modifier_urls(resource: dict[str, Any], profile: ReleaseProfile) -> list[Any]:
    """The URLs of the modifierExtensions on ``resource`` and on every element its plan
    releases (a backbone element such as a dosage or a Consent's provision at any level it is
    kept, a contained resource released under its own type's paths). A modifier changes the
    meaning of the element holding it, so one the release cannot keep must withhold the
    resource rather than be dropped from it; a modifier on an element the release drops goes
    with that element."""
    urls: list[Any] = []
    stack: list[tuple[Any, Node]] = [(resource, profile.plan(str(resource.get("resourceType"))))]
    while stack:
        value, node = stack.pop()
        if not isinstance(value, dict):
            continue
        for modifier in value.get("modifierExtension") or []:
            urls.append(modifier.get("url") if isinstance(modifier, dict) else None)
        for key, child in node.children.items():
            items = value.get(key)
            for item in items if isinstance(items, list) else [items]:
                if child.kind == "object":
                    stack.append((item, child))
                elif child.kind == "contained" and isinstance(item, dict):
                    if _releasable_contained(item, profile):
                        stack.append((item, profile.plan(str(item["resourceType"]))))
    return urls


def _provision_depth(resource: dict[str, Any]) -> int:
    """How many levels of provisions a Consent nests (the top one is level 1)."""
    depth, level = 0, [resource.get("provision")]
    while provisions := [p for p in level if isinstance(p, dict)]:
        depth += 1
        level = []
        for provision in provisions:
            nested = provision.get("provision")
            level.extend(nested if isinstance(nested, list) else [])
    return depth


def _contained_ids(resource: dict[str, Any], profile: ReleaseProfile) -> dict[str, str]:
    """Local id -> released id of the contained resources that may be released. The source's
    local ids are text of its own (``med-for-jdoe``), so each is renamed by its place; an id
    two contained resources share names neither (a reference to it could mean either)."""
    ids: dict[str, str] = {}
    seen: set[str] = set()
    for place, item in enumerate(resource.get("contained") or []):
        local = item.get("id") if isinstance(item, dict) else None
        if not isinstance(local, str):
            continue
        if local in seen:
            ids.pop(local, None)
        elif _releasable_contained(item, profile):
            ids[local] = f"c{place}"
        seen.add(local)
    return ids


def _releasable_contained(item: dict[str, Any], profile: ReleaseProfile) -> bool:
    rtype = item.get("resourceType")
    return rtype in CONTAINED_TYPES and profile.lists(str(rtype))


def _latest_year(resource: dict[str, Any]) -> int | None:
    """The latest year among a resource's own dates (its top-level dates and periods:
    ``effectiveDateTime``, ``effectivePeriod``, ``issued``, ``recordedDate``, ``date``, ...),
    None when it has none."""
    years = []
    for value in resource.values():
        for text in (value.get("start"), value.get("end")) if isinstance(value, dict) else [value]:
            match = _DATE.match(text) if isinstance(text, str) else None
            if match is not None and MIN_YEAR <= int(match.group(1)) <= MAX_YEAR:
                years.append(int(match.group(1)))
    return max(years, default=None)


def _is_age_observation(resource: dict[str, Any]) -> bool:
    """Whether an observation (or one of its components) tells the patient's age: coded as an
    age (:data:`deid.terminology.AGE_CODES`: an age LOINC code, or SNOMED CT's age at onset) or
    as their birth date (:data:`deid.terminology.BIRTH_DATE_CODES`), under whatever system its
    coding names, or none (:data:`AGE_TELLING_CODES`). Its ages are capped at 90, and its dates
    over the age limit are a birth date's (:func:`_date`)."""
    code = resource.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    return any(isinstance(c, dict) and c.get("code") in AGE_TELLING_CODES for c in codings or [])


def _apply(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    release_one = _KINDS[node.kind]
    if node.many:
        if not isinstance(value, list):
            value = [value]
        items = [r for r in (release_one(v, node, ctx) for v in value) if r is not _DROP]
        return items if items else _DROP
    if isinstance(value, list):  # one value expected, several given: not the element
        return _DROP
    return release_one(value, node, ctx)


def _object(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    if not isinstance(value, dict):
        return _DROP
    if node.name == "component" and ctx.resource_type == "Observation":
        return _component(value, node, ctx)
    return _children(value, node, ctx)


def _component(value: dict[str, Any], node: Node, ctx: ReleaseContext) -> Any:
    """An observation's component coded as an age (a panel's "Age" row) holds an age, as an
    age observation does, however the observation itself is coded."""
    outer = ctx.age_context
    ctx.age_context = outer or _is_age_observation(value)
    try:
        return _children(value, node, ctx)
    finally:
        ctx.age_context = outer


def _children(value: dict[str, Any], node: Node, ctx: ReleaseContext) -> Any:
    out = {}
    for key, child in node.children.items():
        if key in value:
            released = _apply(value[key], child, ctx)
            if released is not _DROP:
                out[key] = released
    if len(out) < len(value):
        ctx.labels.add("REDACTED")
    return out if out else _DROP


def _scalar(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    if not isinstance(value, bool | int | float):
        return _DROP
    if _is_age_integer(value, node, ctx):
        if _over_age_cap(value, ctx):
            return AGE_CAP_YEARS
        if _tells_age_over_limit(value, ctx):
            return _DROP
    return value


def _is_age_integer(value: Any, node: Node, ctx: ReleaseContext) -> bool:
    """An age observation's ``valueInteger`` (of the observation or of a component): an age
    in years, as a quantity of an age observation without a UCUM unit is read."""
    return ctx.age_context and node.name == "valueInteger" and not isinstance(value, bool)


def _text(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    return value if isinstance(value, str) else _DROP


def _bound(value: str, binding: frozenset[str], ctx: ReleaseContext) -> str | None:
    """``value`` as the code of its required binding it stands for, counted when only its case
    told it apart; None (counted as not in the binding) when it stands for none."""
    code = binding_code(binding, value)
    if code is None:
        ctx.counts["code_not_in_binding"] += 1
    elif code != value:
        ctx.counts["code_case_normalised"] += 1
    return code


def _code(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    if not isinstance(value, str) or node.binding is None:
        ctx.counts["code_not_in_binding"] += 1
    elif (code := _bound(value, node.binding, ctx)) is not None:
        return code
    ctx.labels.add("REDACTED")
    return _DROP


def _id(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    if not isinstance(value, str):
        return _DROP
    ctx.labels.add("PSEUDED")
    return ctx.pseudonymise_id(ctx.resource_type, value)


def _reference(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    text = value.get("reference") if isinstance(value, dict) else None
    if isinstance(text, str) and text.startswith("#"):
        return _contained_reference(text[1:], ctx)
    if not isinstance(text, str):
        # a logical reference is looked up by its conditional form, as ingest resolved it;
        # its identifier never leaves: only the pseudonymous literal reference is released
        text = logical_reference(value)
    target = ctx.resolve(text) if isinstance(text, str) else None
    if target is None:
        ctx.counts["reference_withheld"] += 1
        return _DROP
    ctx.labels.add("PSEUDED")
    return {"reference": f"{target[0]}/{target[1]}"}


def _contained_reference(local: str, ctx: ReleaseContext) -> Any:
    """A reference to a contained resource, to the id that resource is released under; one to
    a contained resource not released (or to none) is withheld."""
    released = ctx.contained_ids.get(local)
    if released is None:
        ctx.counts["reference_withheld"] += 1
        return _DROP
    return {"reference": f"#{released}"}


def _contained(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    """A contained resource under its own type's paths, renamed by its place; its id is no
    pseudonym (it joins within the container only, and no view keys on it)."""
    local = value.get("id") if isinstance(value, dict) else None
    released_id = ctx.contained_ids.get(local) if isinstance(local, str) else None
    if released_id is None:  # not releasable, or its id shared: _contained_ids
        ctx.counts["contained_withheld"] += 1
        ctx.labels.add("REDACTED")
        return _DROP
    rtype = str(value["resourceType"])
    plan = ctx.profile.plan(rtype)
    body = Node("object", children={k: v for k, v in plan.children.items() if k != "id"})
    out = _object(value, body, ctx)
    ctx.labels.add("PSEUDED")
    return {"resourceType": rtype, "id": released_id, **(out if isinstance(out, dict) else {})}


def _coding(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    if not isinstance(value, dict):
        return _DROP
    system, code = value.get("system"), value.get("code")
    out: dict[str, Any] = {}
    if isinstance(system, str) and ANY_CODE.match(system.replace("://", "")):
        out["system"] = system
    if isinstance(value.get("version"), str) and ANY_CODE.match(value["version"]):
        out["version"] = value["version"]
    if isinstance(code, str) and node.binding is not None:
        code = _bound(code, node.binding, ctx)
    if isinstance(code, str):
        released = system_code(out.get("system"), code)
        if released is None:
            ctx.counts["code_malformed"] += 1
        else:
            if released != code:
                ctx.counts["code_case_normalised"] += 1
            out["code"] = released
            display = ctx.terminology.display(out.get("system"), released) if node.display else None
            if display is not None:
                out["display"] = display
    if "code" not in out:
        return _DROP  # a system alone says nothing and a version alone less
    return out


def _quantity(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    if not isinstance(value, dict):
        return _DROP
    out: dict[str, Any] = {}
    number = value.get("value")
    if isinstance(number, int | float) and not isinstance(number, bool):
        out["value"] = number
    comparator = value.get("comparator")
    if comparator in REQUIRED_BINDINGS["Quantity.comparator"]:
        out["comparator"] = comparator
    system, code = value.get("system"), value.get("code")
    if system == UCUM and isinstance(code, str) and code_is_well_formed(UCUM, code):
        out["system"], out["code"] = system, code
        if value.get("unit") == code:
            out["unit"] = code
    _cap_age(out, value, node, ctx)
    _age_in_whole_years(out, value, node, ctx)
    return out if "value" in out else _DROP


def _age_units_per_year(
    quantity: dict[str, Any], written: dict[str, Any], node: Node, ctx: ReleaseContext
) -> float | None:
    """How many of a quantity's unit make a year when it may be an age: the time unit its
    released UCUM code names (any quantity: ``a``, ``a_j``, and ``yr`` or ``years``, which
    sources write under UCUM's system), else, for a FHIR Age or a quantity of an age
    observation, the unit it is ``written`` in (:func:`_per_year_as_written`); None for any
    other quantity."""
    per_year = time_units_per_year(quantity.get("code", "")) if "system" in quantity else None
    if per_year is None and (ctx.age_context or node.age):
        per_year = _per_year_as_written(written)
    return per_year


def _cap_age(
    quantity: dict[str, Any], written: dict[str, Any], node: Node, ctx: ReleaseContext
) -> None:
    """HIPAA: ages of 90 or more are released as 90 years. A quantity in a UCUM time unit is
    an age in that unit; a FHIR Age (``Condition.onsetAge``) or a quantity of an age
    observation without one is an age in the unit it is ``written`` in when that reads as a
    time unit (``months``, ``yrs``: :func:`_per_year_as_written`), else in years: a unit the
    release cannot read must not let an age pass."""
    per_year = _age_units_per_year(quantity, written, node, ctx)
    if per_year is None or "value" not in quantity:
        return
    if _over_age_cap(quantity["value"] / per_year, ctx):
        quantity.update(value=AGE_CAP_YEARS, system=UCUM, code="a", unit="a")
        quantity.pop("comparator", None)


def _age_in_whole_years(
    quantity: dict[str, Any], written: dict[str, Any], node: Node, ctx: ReleaseContext
) -> None:
    """An age (a FHIR Age, or a quantity of an age observation) read in completed years (the
    ceiling for ``<`` and ``<=``, so the comparison stays true). Under either date rule, an
    age under 90 whose resource's dates put the birth over the age limit is withheld
    (:func:`_tells_age_over_limit`): Safe Harbor withholds such a birth date and research
    makes it the year of 90, and an age of 85 with its event's year gives it back.

    Under the ``year`` date rule (Safe Harbor) the age is then released in whole years,
    ``{value, system: UCUM, code: "a", unit: "a"}``, counted as ``age_in_years``. The rule
    keeps a date's year and nothing finer, and an age in days, weeks or months, or in years
    with a fraction, is finer: with the year of its event it narrows the birth date (and the
    event's date) to less than a year, and two such ages of one patient give the days between
    their events (32,000 days in 2024 and 32,001 in 2025 leave one birth date). An age already
    in whole years is left as written. Research keeps an age in its unit: its shifted dates
    keep a patient's intervals anyway."""
    if not (node.age or ctx.age_context):
        return
    per_year = _age_units_per_year(quantity, written, node, ctx)
    if per_year is None or "value" not in quantity:
        return
    comparator = quantity.get("comparator")
    years = quantity["value"] / per_year
    whole = math.ceil(years) if comparator in ("<", "<=") else math.floor(years)
    if _tells_age_over_limit(whole, ctx):
        quantity.clear()
        return
    if ctx.profile.date_rule != "year" or (per_year == 1.0 and whole == quantity["value"]):
        return
    quantity.clear()
    quantity.update(value=whole, system=UCUM, code="a", unit="a")
    if comparator is not None:
        quantity["comparator"] = comparator
    ctx.counts["age_in_years"] += 1
    ctx.labels.add("GENERALIZED")


def _tells_age_over_limit(years: float, ctx: ReleaseContext) -> bool:
    """Whether an age of ``years`` (under 90) with the latest year of its resource's dates
    puts the birth year 90 or more years before this year (an age of 85 in 2015, today: born
    in 1930 at the latest, so 96 or older now), as the ``year`` rule reads a birth date given
    by its year alone (:func:`deid.methods.is_over_age_limit`): HIPAA removes every element of
    a date indicative of an age over 89, and both profiles withhold the patient's true birth
    year (``year`` withholds the date, ``shift`` makes it the year of 90); the age would give
    it back. The resource's own dates as sent (before any shift). Withheld and counted
    (``age_withheld``)."""
    if ctx.dates_until is None or years >= AGE_CAP_YEARS:
        return False  # 90 or more: "90 or older" already, the category HIPAA allows
    # the latest birth year the age allows, read by the age limit's one rule
    born_by = math.floor(ctx.dates_until - years)
    if not methods.is_year_over_age_limit(born_by, ctx.today):
        # withheld from the first year that puts that birth year over the limit
        ctx.changes_on(methods.age_limit_new_year(born_by))
        return False
    ctx.counts["age_withheld"] += 1
    ctx.labels.add("REDACTED")
    return True


def _per_year_as_written(written: dict[str, Any]) -> float:
    """How many of the unit an age is written in make a year: its ``unit`` text, else its
    ``code``, read as a time unit (:func:`deid.terminology.time_units_per_year`: ``mo_j``,
    ``a{age}``, ``months``, ``yrs``); 1 (years) when neither reads as one."""
    for element in ("unit", "code"):
        text = written.get(element)
        if isinstance(text, str):
            per_year = time_units_per_year(text)
            if per_year is not None:
                return per_year
    return 1.0


def _over_age_cap(years: float, ctx: ReleaseContext) -> bool:
    """Whether an age of ``years`` is one HIPAA aggregates into 90 or older; counted
    (``age_capped``) and labelled when it is."""
    if years < AGE_CAP_YEARS:
        return False
    ctx.counts["age_capped"] += 1
    ctx.labels.add("GENERALIZED")
    return True


def _extension(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    url = value.get("url") if isinstance(value, dict) else None
    shape = ctx.profile.extensions.get(url) if isinstance(url, str) else None
    if shape is None or not isinstance(url, str):
        ctx.labels.add("REDACTED")
        return _DROP
    return _EXTENSION_SHAPES[shape](url, value, ctx)


def _omb_extension(url: str, value: dict[str, Any], ctx: ReleaseContext) -> Any:
    """us-core race/ethnicity: the OMB categories only (no detailed codes, no text)."""
    categories = []
    for sub in value.get("extension") or []:
        if isinstance(sub, dict) and sub.get("url") == "ombCategory":
            coding = sub.get("valueCoding")
            if isinstance(coding, dict) and coding.get("system") == OMB:
                released = _coding(coding, _OMB_CODING, ctx)
                if released is not _DROP:
                    categories.append({"url": "ombCategory", "valueCoding": released})
    return {"url": url, "extension": categories} if categories else _DROP


def _code_extension(url: str, value: dict[str, Any], ctx: ReleaseContext) -> Any:
    allowed = REQUIRED_BINDINGS.get(url.rsplit("/", 1)[-1], frozenset())
    code = value.get("valueCode")
    if not isinstance(code, str):
        ctx.counts["code_not_in_binding"] += 1
    elif (bound := _bound(code, allowed, ctx)) is not None:
        return {"url": url, "valueCode": bound}
    return _DROP


_OMB_CODING = Node("coding")
_EXTENSION_SHAPES: dict[str, Callable[[str, dict[str, Any], ReleaseContext], Any]] = {
    "omb": _omb_extension,
    "code": _code_extension,
}


def _date(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    parts = _date_parts(value, ctx)
    if parts is None:
        return _DROP
    if ctx.profile.date_rule == "year" or node.kind == "year":
        return _year_only(value, ctx)
    year, month, day = parts
    # a birth date, or a date of an observation telling the age (its birth date, the start of
    # a calculated age's period)
    birth = node.name == "birthDate" or ctx.age_context
    # every date's outcome changes when it crosses the age limit (its year 90 or more years
    # before this one, from 1 January of the year of its 90th anniversary): a birth date's
    # becomes the year of 90, any other's is withheld
    ctx.changes_on(methods.age_limit_day(value))
    if methods.is_over_age_limit(value, ctx.today):
        if birth:
            # HIPAA's "90 or older": the year that makes the patient 90 this year (next year's
            # another)
            ctx.changes_on(methods.next_new_year(ctx.today))
            ctx.labels.add("ABSTRED")
            return f"{methods.aggregated_birth_year(ctx.today.year):04d}"
        # any other date over the age limit dates the birth earlier still (an onset in 1933
        # beside a birth date made the year of 90): withheld, as the year rule does
        ctx.counts["date_withheld"] += 1
        ctx.labels.add("REDACTED")
        return _DROP
    if ctx.shift_days is None:
        if month is None:
            return value[:4]  # a year alone: no shift moves it
        ctx.counts["date_no_patient"] += 1
        ctx.labels.add("REDACTED")
        return _DROP
    ctx.labels.add("PERTURBED")
    if day is not None:
        try:
            return methods.shift_date(value, ctx.shift_days)
        except ValueError:  # a day that does not exist, or a malformed time
            ctx.counts["date_unreadable"] += 1
            return _DROP
    if month is not None:
        moved = date(year, month, 15) + timedelta(days=ctx.shift_days)
        return f"{moved.year:04d}-{moved.month:02d}"
    return value[:4]  # a year alone: already the coarsest a date gets


def _year_only(value: str, ctx: ReleaseContext) -> Any:
    year = methods.redact_date_partially(value, ctx.today)
    ctx.changes_on(methods.age_limit_day(value))
    if year is None:
        ctx.counts["date_withheld"] += 1
        ctx.labels.add("REDACTED")
        return _DROP
    ctx.labels.add("GENERALIZED")
    return year


def _date_parts(value: Any, ctx: ReleaseContext) -> tuple[int, int | None, int | None] | None:
    """Year, month and day of a FHIR date, or None (counted) when it cannot be released: out of
    [MIN_YEAR, MAX_YEAR] (sentinels such as 0001-01-01 or 9999-12-31), or not a date."""
    match = _DATE.match(value) if isinstance(value, str) else None
    if match is None:
        ctx.counts["date_unreadable"] += 1
        return None
    year = int(match.group(1))
    if not MIN_YEAR <= year <= MAX_YEAR:
        ctx.counts["date_out_of_range"] += 1
        return None
    month = int(match.group(2)) if match.group(2) else None
    day = int(match.group(3)) if match.group(3) else None
    try:
        date(year, month or 1, day or 1)
    except ValueError:  # a month or a day that does not exist
        ctx.counts["date_unreadable"] += 1
        return None
    return year, month, day


def _zip3(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    if not isinstance(value, str):
        return _DROP
    ctx.labels.add("ABSTRED")
    return methods.redact_zip_partially(value, ctx.profile.restricted_zip3)


def _us_state(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    """A state as its USPS code when it is one (:func:`deid.terminology.us_state_code`);
    anything else (a ZIP, a city, a county, a region of another country) withheld and
    counted."""
    code = us_state_code(value) if isinstance(value, str) else None
    if code is not None:
        return code
    ctx.counts["state_withheld"] += 1
    ctx.labels.add("REDACTED")
    return _DROP


def _country(value: Any, node: Node, ctx: ReleaseContext) -> Any:
    """A country as its ISO 3166-1 alpha-2 code when it is one
    (:func:`deid.terminology.country_code`); anything else (a city, a street, a postcode)
    withheld and counted."""
    code = country_code(value) if isinstance(value, str) else None
    if code is not None:
        return code
    ctx.counts["country_withheld"] += 1
    ctx.labels.add("REDACTED")
    return _DROP


_KINDS: dict[str, Callable[[Any, Node, ReleaseContext], Any]] = {
    "object": _object,
    "scalar": _scalar,
    "text": _text,
    "code": _code,
    "id": _id,
    "reference": _reference,
    "contained": _contained,
    "coding": _coding,
    "quantity": _quantity,
    "extension": _extension,
    "date": _date,
    "year": _date,
    "zip3": _zip3,
    "us_state": _us_state,
    "country": _country,
}
