"""The resources a FHIR record carries inside it: a person can be written there rather than in a
resource of their own (a lab result holding its patient as a contained resource, a Patient sent
as an operation's ``Parameters``, a Bundle inside a Bundle), and whoever reads a record for the
people it names reads those too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def folded_type(named: Any) -> str | None:
    """A ``resourceType`` as it is matched whatever its case and the spaces around it
    (``bundle``, `` Parameters``: a refused record may write it so), or None when it is no
    string."""
    return named.strip().casefold() if isinstance(named, str) else None


def _objects(value: Any) -> list[Any]:
    """``value`` as a list: an element FHIR repeats, written as one object by some exporters
    (``"entry": {...}``), is still its one item."""
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, dict) else []


def _parameter_resources(parameters: list[Any]) -> Iterator[Any]:
    """The resources of ``Parameters.parameter``, in its ``part`` at any depth too."""
    pending = list(reversed(parameters))
    while pending:
        parameter = pending.pop()
        if isinstance(parameter, dict):
            yield parameter.get("resource")
            pending.extend(reversed(_objects(parameter.get("part"))))


def _held_directly(resource: dict[str, Any]) -> Iterator[Any]:
    """What ``resource`` holds one level down: its contained resources, a Parameters' parameter
    resources, a Bundle's entries' resources (``entry`` an array, or one object)."""
    yield from _objects(resource.get("contained"))
    kind = folded_type(resource.get("resourceType"))
    if kind == "parameters":
        yield from _parameter_resources(_objects(resource.get("parameter")))
    elif kind == "bundle":
        for entry in _objects(resource.get("entry")):
            if isinstance(entry, dict):
                yield entry.get("resource")


def held_resources(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every resource ``resource`` holds, at any depth (a contained Patient of a Bundle's entry),
    each before those it holds in turn; not ``resource`` itself. Walked without recursion: a
    refused record may nest as deep as its reader kept."""
    pending = list(reversed(list(_held_directly(resource))))
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            yield item
            pending.extend(reversed(list(_held_directly(item))))


# the resources that describe a person by name, identifiers and contact details
PERSON_TYPES = frozenset({"Patient", "RelatedPerson", "Person"})


def holds_person(resource: dict[str, Any]) -> bool:
    """Whether ``resource`` holds a person's resource inside it (a lab result whose subject is
    ``#p``, its patient contained in it)."""
    return any(held.get("resourceType") in PERSON_TYPES for held in held_resources(resource))
