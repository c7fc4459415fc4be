"""Check one FHIR R4 record: parse (orjson), validate (fhir.resources R4B), extract what ingest
needs. Runs in worker processes, so it takes and returns plain picklable values.

Messages are built from schema locations and error types only, never from the input's values:
a validation error must not carry PHI into the quarantine table or a log line.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from functools import cache
from typing import Any, NamedTuple

import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from fhirlake.content import content_digest
from fhirlake.nested import held_resources, holds_person
from fhirlake.references import (
    compartment_elements,
    identifier_criteria,
    iter_logical_references,
    iter_references,
)

# used with fullmatch: "$" would also match before a final newline ("abc\n")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
MAX_ERRORS_IN_MESSAGE = 3
# Objects and arrays within one another; real resources stay far below (Questionnaire items
# nest a dozen levels), and the validators recurse once per level.
MAX_NESTING = 100


class NestingTooDeepError(ValueError):
    """A resource nests objects and arrays deeper than ``MAX_NESTING``."""


class Checked(NamedTuple):
    """Outcome of checking one record. ``code`` is None when the record is valid."""

    code: str | None
    message: str
    resource_type: str | None = None
    resource_id: str | None = None
    version_id: str | None = None
    last_updated: str | None = None
    content_digest: bytes = b""
    references: tuple[tuple[str, str], ...] = ()
    patient_refs: tuple[str, ...] = ()
    identifiers: tuple[str, ...] = ()
    assigned_raw: bytes | None = None  # the record with a server-assigned id, when it had none
    # the identifiers of the Patients it contains: a record can carry its patient inside it
    contained_patient_identifiers: tuple[str, ...] = ()
    # whether it holds a person's resource inside it (:func:`fhirlake.nested.holds_person`)
    holds_person: bool = False


@cache
def model_class(resource_type: str) -> type[Resource] | None:
    """The R4B model for a resource type name, or None for unknown names and datatypes."""
    try:
        cls = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Resource) else None


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# Error kinds whose message is formatted from the input (a resource type name, a value's type)
_MESSAGE_QUOTES_INPUT = {"fhir-validation-wrong-resource-type", "model_validation_format"}


def _input_strings(value: Any, out: list[str], limit: int = 200) -> list[str]:
    """Scalar leaves of an error's input, as text, to check a message does not repeat them."""
    stack = [value]
    while stack and len(out) < limit:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif isinstance(node, str | int | float) and len(str(node)) >= 2:
            out.append(str(node))
    return out


def _value_free(msg: str, kind: str, value: Any) -> str:
    if kind in _MESSAGE_QUOTES_INPUT or any(text in msg for text in _input_strings(value, [])):
        return ""
    return msg


def describe_validation_error(resource_type: str, exc: ValidationError) -> str:
    """A PHI-free summary: element paths and error kinds, never the offending values."""
    parts = []
    errors = exc.errors(include_url=False, include_input=True)
    for err in errors[:MAX_ERRORS_IN_MESSAGE]:
        loc = tuple(err.get("loc", ()))
        kind = str(err.get("type", "invalid"))
        if kind == "extra_forbidden":
            # the unknown key itself is input data and may be anything
            where = _loc(loc[:-1])
            parts.append(f"{resource_type}{'.' + where if where else ''}: unknown element")
            continue
        msg = _value_free(str(err.get("msg", "")), kind, err.get("input"))
        # a location part that is not a schema element name (a dict key of the input) is hidden
        loc = tuple(
            p if isinstance(p, int) or _SCHEMA_NAME.fullmatch(p) else "(element)" for p in loc
        )
        where = _loc(loc)
        detail = f"{kind}" + (f" ({msg})" if msg else "")
        parts.append(f"{resource_type}{'.' + where if where else ''}: {detail}")
    more = len(errors) - MAX_ERRORS_IN_MESSAGE
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _bound_depth(node: Any, depth: int) -> None:
    """Raise :class:`NestingTooDeepError` when ``node`` nests beyond ``MAX_NESTING`` (without
    recursion, so any depth is measured safely)."""
    stack = [(node, depth)]
    while stack:
        item, level = stack.pop()
        if level > MAX_NESTING:
            raise NestingTooDeepError
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item if isinstance(v, dict | list))


EMPTY_ELEMENT = "empty element (ele-1)"
# FHIR's JSON format: "null values are not allowed", but in an array of primitives that has
# its extensions beside it (``"given": ["Jo", null], "_given": [null, {...}]``)
NULL_VALUE = "null value"


def scan_resource(
    obj: dict[str, Any],
) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    """One walk over a resource: every ``reference`` string with its element path, and the
    path of the first empty array, object or string (FHIR's ele-1 forbids them) or null value
    (JSON's form forbids them), with which of the two it is. Resources nested
    in this one (contained, or carried by a Bundle or Parameters) resolve in their own context
    and are skipped. Paths are built only for hits: the walk runs on every record. Raises
    :class:`NestingTooDeepError` beyond ``MAX_NESTING`` levels."""
    refs: list[tuple[str, str]] = []
    empty: list[tuple[str, str]] = []
    stack: list[str] = []

    def found(what: str, *path: str) -> None:
        if not empty:
            empty.append((".".join([*stack, *path]), what))

    def walk(node: Any, depth: int = 0) -> None:
        if depth > MAX_NESTING:
            # deeper than any FHIR structure: stop before Python's recursion limit does
            raise NestingTooDeepError
        if isinstance(node, dict):
            if not node:
                found(EMPTY_ELEMENT)
            for key, value in node.items():
                kind = type(value)
                if kind is dict or kind is list:
                    if key == "contained" or (key == "resource" and "resourceType" in value):
                        _bound_depth(value, depth + 1)  # not walked, but validated later
                        continue
                    if kind is list and None in value and not _may_hold_nulls(key, node):
                        found(NULL_VALUE, key)
                    stack.append(key)
                    walk(value, depth + 1)
                    stack.pop()
                elif kind is str:
                    if key == "reference":
                        refs.append((".".join(stack) or "reference", value))
                    elif not value:
                        found(EMPTY_ELEMENT, key)
                elif value is None:
                    found(NULL_VALUE, key)
        elif isinstance(node, list):
            if not node:
                found(EMPTY_ELEMENT)
            for item in node:
                kind = type(item)
                if kind is dict or kind is list:
                    walk(item, depth + 1)
                elif kind is str and not item:
                    found(EMPTY_ELEMENT)

    walk(obj)
    if not empty:
        return refs, None
    path, what = empty[0]
    return refs, (path or "(root)", what)


def _may_hold_nulls(key: str, node: dict[str, Any]) -> bool:
    """Whether the array ``node[key]`` may hold nulls: an array of a primitive's extensions
    (``_given``) or the values they stand beside (``given`` beside ``_given``)."""
    return key.startswith("_") or f"_{key}" in node


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _patient_refs(
    resource_type: str, obj: dict[str, Any], logical: list[tuple[str, str]]
) -> tuple[str, ...]:
    """The references of the Patient compartment's elements: the literal ones first (they
    decide the patient when present), then the ``logical`` ones in their conditional form."""
    refs = []
    for element in compartment_elements(resource_type):
        for ref in iter_references(obj.get(element)):
            refs.append(ref.value)
    return (*refs, *(value for _, value in logical))


def _logical_patient_refs(resource_type: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, conditional form) of every logical reference (a Reference given by its
    identifier alone) in the Patient compartment's elements: they join the resource's
    references, so that ingest resolves and indexes them as conditional ones."""
    return [
        (ref.path, ref.value)
        for element in compartment_elements(resource_type)
        for ref in iter_logical_references(obj.get(element), element)
    ]


def check_record(raw: bytes) -> Checked:
    """Parse and validate one resource; extract ids, references and identifiers.

    Raises only MemoryError, which says nothing of the record (quarantining it would keep a
    valid record out of the vault for good): whatever else a validator throws becomes the
    record's reason code, with the exception's type name only (its text may quote the input)."""
    try:
        return _check_record(raw)
    except MemoryError:
        raise
    except NestingTooDeepError:
        return Checked("schema_violation", f"objects and arrays nested deeper than {MAX_NESTING}")
    except RecursionError:
        return Checked("schema_violation", "objects and arrays nested too deeply")
    except Exception as exc:  # one bad record must never stop a batch
        return Checked("validation_error", f"validation raised {type(exc).__name__}")


def _parse(raw: bytes) -> dict[str, Any] | Checked:
    """The record as a JSON object with an R4 resource type, or why it is not one."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson's message names a position, not the content
        return Checked("invalid_json", f"not valid JSON ({exc.msg} at char {exc.pos})")
    if not isinstance(obj, dict):
        return Checked("not_a_resource", f"a JSON {type(obj).__name__}, not an object")
    resource_type = obj.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        return Checked("not_a_resource", "missing or empty resourceType")
    if model_class(resource_type) is None:
        return Checked("unknown_resource_type", f"{_type_name(resource_type)}: not a resource")
    return obj


def _type_name(resource_type: Any) -> str:
    """A resource type name for a message: only names of the FHIR model (a datatype such as
    ``Money``), since any other text is input and may be anything."""
    try:
        get_fhir_model_class(resource_type)
    except (KeyError, ValueError, TypeError):
        return "resourceType (unknown name)"
    return f"resourceType {resource_type}"


def _contained_problem(resource_type: str, obj: dict[str, Any]) -> Checked | None:
    """Contained resources of no R4 type: the model would raise a bare KeyError on them."""
    contained = obj.get("contained")
    if not isinstance(contained, list):
        return None
    for index, item in enumerate(contained):
        if isinstance(item, dict) and isinstance(item.get("resourceType"), str):
            if model_class(item["resourceType"]) is None:
                where = f"{resource_type}.contained[{index}]"
                return Checked(
                    "unknown_resource_type", f"{where}: {_type_name(item['resourceType'])}"
                )
    return None


def _logical_link_refs(resource_type: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, conditional form) of every logical reference in a Patient's ``link``: another
    record of the same person named by an identifier alone (``link.other.identifier``). They
    join the resource's references, so that ingest and the erasure read them as they read a
    conditional link (``Patient?identifier=``); before, they were not read, and a Patient
    linked this way to an erased one was stored and released."""
    if resource_type != "Patient":
        return []
    return [(ref.path, ref.value) for ref in iter_logical_references(obj.get("link"), "link")]


def _check_record(raw: bytes) -> Checked:
    parsed = _parse(raw)
    if isinstance(parsed, Checked):
        return parsed
    obj = parsed
    resource_type: str = obj["resourceType"]
    cls = model_class(resource_type)
    assert cls is not None  # _parse checked it
    # the walk bounds the nesting before anything else recurses over the record
    references, empty = scan_resource(obj)
    assigned_raw = None
    if "id" not in obj:
        # a server assigns ids to resources posted without one; derive it from the content so
        # that the same record always gets the same id
        digest = hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()
        obj["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:ehr:content:{digest}"))
        assigned_raw = orjson.dumps(obj)
    resource_id = _str_or_none(obj.get("id"))
    raw_meta = obj.get("meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    logical_refs = _logical_patient_refs(resource_type, obj)
    patient_refs = _patient_refs(resource_type, obj, logical_refs)

    def failed(code: str, message: str) -> Checked:
        # who it names is read from a refused record too: one holding an erased person is
        # not stored (its identifiers, and those of the Patients it holds)
        return Checked(
            code,
            message,
            resource_type,
            resource_id,
            patient_refs=patient_refs,
            identifiers=tuple(identifier_criteria(obj)),
            contained_patient_identifiers=_contained_patient_identifiers(obj),
        )

    if resource_id is None or not _ID.fullmatch(resource_id):
        return failed("invalid_id", f"{resource_type}.id is not a valid FHIR id")
    if empty is not None:
        # only the top element is named: a nested key may be an unknown one, i.e. input
        path, what = empty
        top = path.split(".")[0].split("[")[0]
        where = top if cls.model_fields.get(top) else "(element)"
        return failed("schema_violation", f"{resource_type}.{where}: {what}")
    problem = _contained_problem(resource_type, obj)
    if problem is not None:
        return failed(problem.code or "unknown_resource_type", problem.message)
    try:
        cls.model_validate_json(assigned_raw or raw)
    except ValidationError as exc:
        return failed("schema_violation", describe_validation_error(resource_type, exc))
    except KeyError:
        # fhir.resources looks nested resource types up by name (Parameters, Bundle, ...)
        return failed("unknown_resource_type", f"{resource_type}: a nested resource type")
    except (ValueError, TypeError) as exc:
        return failed("schema_violation", f"{resource_type}: {type(exc).__name__}")
    return Checked(
        None,
        "",
        resource_type,
        resource_id,
        _str_or_none(meta.get("versionId")),
        _str_or_none(meta.get("lastUpdated")),
        content_digest(obj),
        (*references, *logical_refs, *_logical_link_refs(resource_type, obj)),
        patient_refs,
        tuple(identifier_criteria(obj)),
        assigned_raw,
        _contained_patient_identifiers(obj),
        holds_person(obj),
    )


def _contained_patient_identifiers(obj: dict[str, Any]) -> tuple[str, ...]:
    """``system|value`` of every identifier of a Patient the resource holds inside it, at any
    depth (:func:`fhirlake.nested.held_resources`: contained, a Parameters' resource, a
    Bundle's entry): a record can carry its patient inside it."""
    return tuple(
        criteria
        for inner in held_resources(obj)
        if inner.get("resourceType") == "Patient"
        for criteria in identifier_criteria(inner)
    )


def check_chunk(raws: list[bytes]) -> list[Checked]:
    """Worker entry point: check a chunk of records in order."""
    return [check_record(raw) for raw in raws]
