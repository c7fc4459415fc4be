"""A FHIRPath subset over FHIR JSON, compiled once and evaluated many times.

It serves the de-identification policies (the Microsoft anonymizer's paths: navigation,
``nodesByType``, ``nodesByName``, ``where``, ``ofType``, ``exists``, literals, comparisons) and
the SQL-on-FHIR view runner (with ``repeat`` for recursive elements such as a Consent's nested
provisions). Evaluation returns :class:`Node` objects that know where their
value lives, so a policy can change or remove it in place.

Element types come from the ``fhir.resources.R4B`` models (built lazily per type and cached),
so ``nodesByType('HumanName')`` or ``ofType(Quantity)`` follow the R4 definitions.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class


class FhirPathError(ValueError):
    """A FHIRPath expression that cannot be parsed or uses an unsupported function."""


# -- types from the R4B models ----------------------------------------------------------------
_PRIMITIVE_NAMES = {
    "Xhtml": "xhtml",
    "Base64Binary": "base64Binary",
    "EncodedBytes": "base64Binary",
    "DateTime": "dateTime",
    "UuidVersion": "uuid",
}


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            return annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin in (list, typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
            annotation = args[0]
            continue
        return annotation


def _type_of(annotation: Any) -> tuple[str | None, str | None]:
    """(FHIR type name, model to descend into) of one model field."""
    inner = _unwrap(annotation)
    if inner is bool:
        return "boolean", None
    if typing.get_origin(inner) is typing.Annotated:
        meta = typing.get_args(inner)[1:]
        if meta:
            name = type(meta[0]).__name__
            return _PRIMITIVE_NAMES.get(name, name[:1].lower() + name[1:]), None
        return None, None
    name = getattr(inner, "__name__", "")
    if name.endswith("Type") and len(name) > 4:
        model = name[:-4]
        if model in ("Resource", "DomainResource"):
            return "Resource", None
        try:
            cls = get_fhir_model_class(model)
        except (KeyError, ValueError):
            return model, None
        kinds = {c.__name__ for c in cls.__mro__}
        if "BackboneElement" in kinds and model not in ("BackboneElement",):
            return "BackboneElement", model
        return model, model
    return None, None


@cache
def element_types(model: str) -> dict[str, tuple[str | None, str | None, str]]:
    """JSON element name → (FHIR type, model to descend into, element name without the
    choice suffix) for one resource, datatype or backbone element."""
    try:
        cls = get_fhir_model_class(model)
    except (KeyError, ValueError):
        return {}
    out: dict[str, tuple[str | None, str | None, str]] = {}
    for field_name, info in cls.model_fields.items():
        key = info.alias or field_name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        fhir_type, child = _type_of(info.annotation)
        base = str(extra.get("one_of_many") or key)
        out[key] = (fhir_type, child, base)
    return out


# -- nodes ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Node:
    """A value in a resource, and where it lives (for in-place changes)."""

    value: Any
    parent: dict[str, Any] | None = None
    key: str | None = None
    index: int | None = None
    fhir_type: str | None = None
    name: str | None = None
    model: str | None = None

    def replace(self, new_value: Any) -> None:
        if self.parent is None or self.key is None:
            raise FhirPathError("a computed value has no place to be replaced in")
        if self.index is None:
            self.parent[self.key] = new_value
        else:
            self.parent[self.key][self.index] = new_value
        self.value = new_value

    def remove(self) -> None:
        if self.parent is None or self.key is None:
            raise FhirPathError("a computed value has no place to be removed from")
        if self.index is None:
            self.parent.pop(self.key, None)
            return
        items = self.parent.get(self.key)
        if isinstance(items, list) and self.index < len(items) and items[self.index] is self.value:
            del items[self.index]
            if not items:
                del self.parent[self.key]


def _root(resource: Any) -> Node:
    if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
        rt = resource["resourceType"]
        return Node(resource, fhir_type=rt, name=rt, model=rt)
    return Node(resource)


def _children(node: Node) -> list[Node]:
    """Every child element of a node (list items flattened), typed where the model knows."""
    value = node.value
    if not isinstance(value, dict):
        return []
    model = node.model
    if isinstance(value.get("resourceType"), str):
        model = value["resourceType"]
    types = element_types(model) if model else {}
    out: list[Node] = []
    for key, child in value.items():
        if key == "resourceType":
            continue
        if key.startswith("_"):
            # a primitive's own extensions (``_birthDate.extension``) are Extension nodes too
            holders = child if isinstance(child, list) else [child]
            for holder in holders:
                if isinstance(holder, dict):
                    for i, ext in enumerate(holder.get("extension") or []):
                        out.append(
                            Node(ext, holder, "extension", i, "Extension", "extension", "Extension")
                        )
            continue
        fhir_type, child_model, base = types.get(key, (None, None, key))
        items = child if isinstance(child, list) else [child]
        for i, item in enumerate(items):
            t, m = fhir_type, child_model
            if isinstance(item, dict) and isinstance(item.get("resourceType"), str):
                t = m = item["resourceType"]
            out.append(Node(item, value, key, i if isinstance(child, list) else None, t, base, m))
    return out


def _descendants(node: Node) -> list[Node]:
    out: list[Node] = []
    stack = list(reversed(_children(node)))
    while stack:
        current = stack.pop()
        out.append(current)
        stack.extend(reversed(_children(current)))
    return out


@cache
def _keys_for(model: str, name: str) -> tuple[str, ...]:
    """JSON keys that hold element ``name`` of ``model`` (``value`` → ``valueQuantity``, ...)."""
    keys = [k for k, (_, _, base) in element_types(model).items() if base == name or k == name]
    return tuple(keys) if keys else (name,)


@cache
def _navigation_plan(
    model: str, name: str
) -> tuple[tuple[str, str | None, str | None, str], ...] | None:
    """(JSON key, FHIR type, child model, element name) of every key that can hold element
    ``name`` of ``model``; None when the model is unknown (untyped JSON)."""
    types = element_types(model)
    if not types:
        return None
    return tuple((key, *types.get(key, (None, None, key))) for key in _keys_for(model, name))


def _navigate(node: Node, name: str) -> list[Node]:
    """The children named ``name``: the same nodes as filtering :func:`_children`, without
    building every child (navigation is the hot path of the view runner)."""
    value = node.value
    if not isinstance(value, dict) or name == "resourceType" or name[:1] == "_":
        return []
    resource_type = value.get("resourceType")
    model = resource_type if isinstance(resource_type, str) else node.model
    plan = _navigation_plan(model, name) if model else None
    if plan is None:
        # untyped JSON: the key itself, or a choice element spelled name + TypeName
        plan = tuple(
            (k, None, None, name)
            for k in value
            if k == name or (k.startswith(name) and k[len(name) : len(name) + 1].isupper())
        )
    out: list[Node] = []
    for key, fhir_type, child_model, base in plan:
        if key not in value:
            continue
        child = value[key]
        if isinstance(child, list):
            for i, item in enumerate(child):
                if isinstance(item, dict) and isinstance(item.get("resourceType"), str):
                    rt = item["resourceType"]
                    out.append(Node(item, value, key, i, rt, base, rt))
                else:
                    out.append(Node(item, value, key, i, fhir_type, base, child_model))
        elif isinstance(child, dict) and isinstance(child.get("resourceType"), str):
            rt = child["resourceType"]
            out.append(Node(child, value, key, None, rt, base, rt))
        else:
            out.append(Node(child, value, key, None, fhir_type, base, child_model))
    return out


# -- parsing -----------------------------------------------------------------------------------
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<datetime>@\d{4}(?:-\d{2}(?:-\d{2})?)?(?:T[\d:.]*(?:Z|[+-]\d{2}:\d{2})?)?)
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)
  | (?P<var>%[A-Za-z_][A-Za-z0-9_]*|%`[^`]+`|\$this|\$index|\$total)
  | (?P<op><=|>=|!=|!~|\{\s*\}|[-+*/|=<>~&.,()\[\]])
    )""",
    re.VERBOSE,
)
_KEYWORD_OPS = {"and", "or", "xor", "implies", "in", "contains", "is", "as", "div", "mod"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(expr: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        match = _TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            raise FhirPathError(f"unexpected character at position {pos}: {expr[pos]!r}")
        kind = match.lastgroup or "op"
        text = match.group(kind)
        if kind == "ident" and text in _KEYWORD_OPS:
            kind = "op"
        tokens.append(_Tok(kind, text, match.start(kind)))
        pos = match.end()
    tokens.append(_Tok("end", "", len(expr)))
    return tokens


Ast = tuple[Any, ...]
_BINARY = [
    ("implies",),
    ("or", "xor"),
    ("and",),
    ("in", "contains"),
    ("=", "!=", "~", "!~"),
    ("<", ">", "<=", ">="),
    ("|",),
    ("is", "as"),
    ("+", "-", "&"),
    ("*", "/", "div", "mod"),
]


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = _tokenize(expr)
        self.i = 0

    def peek(self) -> _Tok:
        return self.tokens[self.i]

    def take(self, text: str | None = None) -> _Tok:
        tok = self.tokens[self.i]
        if text is not None and tok.text != text:
            raise FhirPathError(f"expected {text!r} at position {tok.pos}, found {tok.text!r}")
        self.i += 1
        return tok

    def parse(self) -> Ast:
        if self.peek().kind == "end":
            raise FhirPathError("empty expression")
        ast = self.binary(0)
        if self.peek().kind != "end":
            tok = self.peek()
            raise FhirPathError(f"unexpected {tok.text!r} at position {tok.pos}")
        return ast

    def binary(self, level: int) -> Ast:
        if level == len(_BINARY):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek().kind == "op" and self.peek().text in _BINARY[level]:
            op = self.take().text
            if op in ("is", "as"):
                right: Ast = ("type", self.type_name())
            else:
                right = self.binary(level + 1)
            left = ("binop", op, left, right)
        return left

    def type_name(self) -> str:
        tok = self.take()
        name = tok.text.strip("`")
        while self.peek().text == ".":
            self.take()
            name = self.take().text.strip("`")
        return name

    def unary(self) -> Ast:
        if self.peek().text in ("-", "+") and self.peek().kind == "op":
            op = self.take().text
            operand = self.unary()
            return ("neg", operand) if op == "-" else operand
        return self.postfix(self.term())

    def postfix(self, node: Ast) -> Ast:
        while True:
            tok = self.peek()
            if tok.text == ".":
                self.take()
                node = self.invocation(node)
            elif tok.text == "[":
                self.take()
                index = self.binary(0)
                self.take("]")
                node = ("index", node, index)
            else:
                return node

    def invocation(self, target: Ast | None) -> Ast:
        tok = self.take()
        if tok.kind != "ident":
            raise FhirPathError(f"expected a name at position {tok.pos}, found {tok.text!r}")
        name = tok.text.strip("`")
        if self.peek().text == "(":
            self.take()
            args: list[Ast] = []
            if self.peek().text != ")":
                args.append(self.binary(0))
                while self.peek().text == ",":
                    self.take()
                    args.append(self.binary(0))
            self.take(")")
            if name not in _FUNCTIONS:
                raise FhirPathError(f"unknown function {name}() at position {tok.pos}")
            return ("call", target, name, tuple(args))
        return ("member", target, name)

    def term(self) -> Ast:
        tok = self.peek()
        if tok.text == "(":
            self.take()
            inner = self.binary(0)
            self.take(")")
            return inner
        if tok.kind == "string":
            self.take()
            return ("lit", _unescape(tok.text[1:-1]))
        if tok.kind == "number":
            self.take()
            return ("lit", Decimal(tok.text) if "." in tok.text else int(tok.text))
        if tok.kind == "datetime":
            self.take()
            return ("lit", tok.text[1:])
        if tok.kind == "var":
            self.take()
            return ("var", tok.text.lstrip("%").strip("`"))
        if tok.kind == "ident":
            if tok.text in ("true", "false"):
                self.take()
                return ("lit", tok.text == "true")
            return self.invocation(None)
        if tok.text.startswith("{") and tok.text.endswith("}"):
            self.take()
            return ("empty",)
        raise FhirPathError(f"unexpected {tok.text or 'end of expression'!r} at position {tok.pos}")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), text)


# -- evaluation -------------------------------------------------------------------------------
Coll = list[Node]


def _lit(value: Any) -> Coll:
    return [] if value is None else [Node(value)]


def _truthy(coll: Coll) -> bool | None:
    if not coll:
        return None
    if len(coll) == 1 and isinstance(coll[0].value, bool):
        return coll[0].value
    return True


_DT = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?")


def _as_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    match = _DT.match(value)
    if match is None or match.end() < 4:
        return None
    parts = [int(p) if p else d for p, d in zip(match.groups(), (0, 1, 1, 0, 0, 0), strict=True)]
    try:
        moment = datetime(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], tzinfo=UTC)
    except ValueError:
        return None
    tail = value[match.end() :]
    tz = re.search(r"([+-])(\d{2}):(\d{2})$", tail)
    if tz:
        sign = 1 if tz.group(1) == "+" else -1
        from datetime import timedelta

        moment -= sign * timedelta(hours=int(tz.group(2)), minutes=int(tz.group(3)))
    return moment


def _comparable(a: Any, b: Any) -> tuple[Any, Any] | None:
    if isinstance(a, bool) or isinstance(b, bool):
        return (a, b) if isinstance(a, bool) and isinstance(b, bool) else None
    if isinstance(a, int | float | Decimal) and isinstance(b, int | float | Decimal):
        return Decimal(str(a)), Decimal(str(b))
    if isinstance(a, str) and isinstance(b, str):
        da, db = _as_datetime(a), _as_datetime(b)
        if da is not None and db is not None and a[:1].isdigit() and b[:1].isdigit():
            return da, db
        return a, b
    return None


def _same_value(a: Any, b: Any) -> bool:
    """Values equal as FHIRPath's ``=`` sees them where no conversion applies: a Boolean is
    never an Integer (Python's ``1 == True`` is), in elements of a complex value too."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _equal(a: Coll, b: Coll) -> bool | None:
    if not a or not b:
        return None
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        pair = _comparable(x.value, y.value)
        if pair is None:
            if not _same_value(x.value, y.value):
                return False
        elif pair[0] != pair[1]:
            return False
    return True


def _type_matches(node: Node, name: str) -> bool:
    if node.fhir_type == name or (node.fhir_type or "").lower() == name.lower():
        return True
    value = node.value
    if node.fhir_type is None:
        simple = {"String": str, "string": str, "Boolean": bool, "boolean": bool}
        if name in simple and isinstance(value, simple[name]):
            return True
        if (
            name in ("Integer", "integer")
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            return True
        if name in ("Decimal", "decimal") and isinstance(value, float | Decimal):
            return True
    return (
        name in ("Resource", "DomainResource")
        and isinstance(value, dict)
        and ("resourceType" in value)
    )


class _Context:
    def __init__(
        self, root: Node, variables: dict[str, Any], cache: dict[int, list[Node]] | None
    ) -> None:
        self.root = root
        self.variables = variables
        self.cache = cache

    def descendants(self, node: Node) -> list[Node]:
        if self.cache is None:
            return _descendants(node)
        found = self.cache.get(id(node.value))
        if found is None:
            found = self.cache[id(node.value)] = _descendants(node)
        return found


def _reference_key(node: Node, type_filter: str | None) -> Any:
    ref = node.value.get("reference") if isinstance(node.value, dict) else None
    if not isinstance(ref, str):
        return None
    if ref.startswith("urn:uuid:") or ref.startswith("urn:oid:"):
        return None if type_filter else ref.split(":", 2)[2]
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) < 2:
        return None
    if type_filter and parts[-2] != type_filter:
        return None
    return parts[-1]


def _eval(ast: Ast, focus: Coll, ctx: _Context) -> Coll:
    kind = ast[0]
    if kind == "lit":
        return _lit(ast[1])
    if kind == "empty":
        return []
    if kind == "var":
        name = ast[1]
        if name == "$this":
            return focus
        if name in ("resource", "rootResource", "context"):
            return [ctx.root]
        if name not in ctx.variables:
            raise FhirPathError(f"unknown variable %{name}")
        value = ctx.variables[name]
        return [
            v if isinstance(v, Node) else Node(v)
            for v in (value if isinstance(value, list) else [value])
        ]
    if kind == "member":
        target, name = ast[1], ast[2]
        if target is None:
            # a leading type name filters the root (Patient.name); otherwise it is a child
            if name[:1].isupper() and (
                name in ("Resource", "DomainResource") or any(_type_matches(n, name) for n in focus)
            ):
                return [n for n in focus if _type_matches(n, name)]
            base = focus
        else:
            base = _eval(target, focus, ctx)
        return [c for n in base for c in _navigate(n, name)]
    if kind == "index":
        base = _eval(ast[1], focus, ctx)
        idx = _eval(ast[2], focus, ctx)
        if not idx:
            return []
        i = int(idx[0].value)
        return [base[i]] if 0 <= i < len(base) else []
    if kind == "neg":
        return [Node(-n.value) for n in _eval(ast[1], focus, ctx)]
    if kind == "call":
        base = focus if ast[1] is None else _eval(ast[1], focus, ctx)
        return _FUNCTIONS[ast[2]](base, ast[3], ctx)
    if kind == "binop":
        return _binop(ast[1], ast[2], ast[3], focus, ctx)
    raise FhirPathError(f"cannot evaluate {kind}")


def _binop(op: str, left_ast: Ast, right_ast: Ast, focus: Coll, ctx: _Context) -> Coll:
    left = _eval(left_ast, focus, ctx)
    if op in ("is", "as"):
        name = right_ast[1]
        if op == "as":
            return [n for n in left if _type_matches(n, name)]
        return _lit(bool(left) and _type_matches(left[0], name)) if left else []
    right = _eval(right_ast, focus, ctx)
    if op == "|":
        seen: list[Node] = []
        for n in left + right:
            if not any(m.value is n.value or m.value == n.value for m in seen):
                seen.append(n)
        return seen
    if op in ("and", "or", "xor", "implies"):
        a, b = _truthy(left), _truthy(right)
        if op == "and":
            return (
                _lit(False)
                if a is False or b is False
                else ([] if a is None or b is None else _lit(True))
            )
        if op == "or":
            return _lit(True) if a or b else ([] if a is None or b is None else _lit(False))
        if op == "xor":
            return [] if a is None or b is None else _lit(a != b)
        return (
            _lit(True)
            if a is False
            else ([] if a is None else _lit(bool(b)) if b is not None else [])
        )
    if op in ("=", "!=", "~", "!~"):
        eq = _equal(left, right)
        if eq is None:
            return []
        return _lit(eq if op in ("=", "~") else not eq)
    if op in ("in", "contains"):
        item, coll = (left, right) if op == "in" else (right, left)
        if not item:
            return []
        return _lit(any(_equal([item[0]], [c]) for c in coll))
    if not left or not right:
        return []
    a, b = left[0].value, right[0].value
    if op in ("<", ">", "<=", ">="):
        pair = _comparable(a, b)
        if pair is None:
            raise FhirPathError(
                f"cannot compare {type(a).__name__} with {type(b).__name__} using {op}"
            )
        x, y = pair
        return _lit({"<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op])
    if op in ("+", "&"):
        if isinstance(a, str) or isinstance(b, str):
            return _lit(f"{a}{b}")
        return _lit(a + b)
    arithmetic: dict[str, Callable[[Any, Any], Any]] = {
        "-": lambda x, y: x - y,
        "*": lambda x, y: x * y,
        "/": lambda x, y: Decimal(str(x)) / Decimal(str(y)) if y else None,
        "div": lambda x, y: x // y if y else None,
        "mod": lambda x, y: x % y if y else None,
    }
    return _lit(arithmetic[op](a, b))


def _arg(args: tuple[Ast, ...], i: int, focus: Coll, ctx: _Context) -> Any:
    coll = _eval(args[i], focus, ctx)
    return coll[0].value if coll else None


def _name_arg(args: tuple[Ast, ...]) -> str:
    ast = args[0]
    if ast[0] == "lit":
        return str(ast[1])
    if ast[0] == "member" and ast[1] is None:
        return str(ast[2])
    raise FhirPathError("expected a type or element name")


def _nodes_by(base: Coll, ctx: _Context, attribute: str, wanted: str) -> Coll:
    return [d for n in base for d in ctx.descendants(n) if getattr(d, attribute) == wanted]


def _per_item(base: Coll, args: tuple[Ast, ...], ctx: _Context) -> list[tuple[Node, Coll]]:
    return [(n, _eval(args[0], [n], ctx)) for n in base]


def _repeat(base: Coll, args: tuple[Ast, ...], ctx: _Context) -> Coll:
    """repeat(projection): the projection of every item, then of every item found, until none is
    new (an item equal to one already found is not added again, so a projection that leads
    back, as ``repeat($this)``, ends). ``Consent.provision.repeat(provision)`` is every nested
    exception, at any depth, without the top provision itself."""
    found: Coll = []
    frontier = base
    while frontier:
        fresh: Coll = []
        for _, projected in _per_item(frontier, args, ctx):
            for item in projected:
                if not any(_same_value(item.value, seen.value) for seen in found):
                    found.append(item)
                    fresh.append(item)
        frontier = fresh
    return found


def _string_fn(
    fn: Callable[[str, list[Any]], Any],
) -> Callable[[Coll, tuple[Ast, ...], _Context], Coll]:
    def run(base: Coll, args: tuple[Ast, ...], ctx: _Context) -> Coll:
        if not base or not isinstance(base[0].value, str):
            return []
        values = [_arg(args, i, base, ctx) for i in range(len(args))]
        return _lit(fn(base[0].value, values))

    return run


_DATE_PART = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def _date_boundary(text: str, low: bool) -> str | None:
    import calendar

    m = _DATE_PART.match(text)
    if not m:
        return None
    year, month, day = m.group(1), m.group(2), m.group(3)
    month = month or ("01" if low else "12")
    if not day:
        day = "01" if low else f"{calendar.monthrange(int(year), int(month))[1]:02d}"
    return f"{year}-{month}-{day}"


def _time_boundary(text: str, low: bool) -> str:
    parts = text.split(":")
    while len(parts) < 3:
        parts.append("00" if low else "59")
    if "." not in parts[2]:
        parts[2] += ".000" if low else ".999"
    return ":".join(parts)


def _boundary(node: Node, low: bool) -> Any:
    """lowBoundary()/highBoundary(): the least/greatest value the given precision allows
    (dates fill month and day, times fill seconds and milliseconds, an absent offset spans
    +14:00 to -12:00, decimals widen by half a unit of their last digit)."""
    value, kind = node.value, node.fhir_type
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | Decimal):
        text = str(value)
        places = len(text.split(".")[1]) if "." in text else 0
        half = Decimal(5) / Decimal(10) ** (places + 1)
        bound = Decimal(text) - half if low else Decimal(text) + half
        return float(bound)
    if not isinstance(value, str):
        return None
    if kind == "time" or re.match(r"^\d{2}:\d{2}(:\d{2}(\.\d+)?)?$", value):
        return _time_boundary(value, low)
    date_part, _, time_part = value.partition("T")
    day = _date_boundary(date_part, low)
    if day is None:
        return None
    if kind == "date" or (kind is None and not time_part and len(date_part) < 10):
        return day
    offset = ""
    match = re.search(r"(Z|[+-]\d{2}:\d{2})$", time_part)
    if match:
        offset = match.group(1)
        time_part = time_part[: match.start()]
    clock = _time_boundary(time_part or ("00:00" if low else "23:59"), low)
    if not time_part:
        clock = "00:00:00.000" if low else "23:59:59.999"
    return f"{day}T{clock}{offset or ('+14:00' if low else '-12:00')}"


_FUNCTIONS: dict[str, Callable[[Coll, tuple[Ast, ...], _Context], Coll]] = {
    "where": lambda b, a, c: [n for n, r in _per_item(b, a, c) if _truthy(r) is True],
    "select": lambda b, a, c: [x for _, r in _per_item(b, a, c) for x in r],
    "exists": lambda b, a, c: _lit(
        bool([n for n, r in _per_item(b, a, c) if _truthy(r) is True]) if a else bool(b)
    ),
    "all": lambda b, a, c: _lit(all(_truthy(r) is True for _, r in _per_item(b, a, c))),
    "empty": lambda b, a, c: _lit(not b),
    "not": lambda b, a, c: [] if _truthy(b) is None else _lit(not _truthy(b)),
    "first": lambda b, a, c: b[:1],
    "last": lambda b, a, c: b[-1:],
    "tail": lambda b, a, c: b[1:],
    "count": lambda b, a, c: _lit(len(b)),
    "distinct": lambda b, a, c: [
        n for i, n in enumerate(b) if all(n.value != m.value for m in b[:i])
    ],
    "ofType": lambda b, a, c: [n for n in b if _type_matches(n, _name_arg(a))],
    "is": lambda b, a, c: _lit(bool(b) and _type_matches(b[0], _name_arg(a))) if b else [],
    "as": lambda b, a, c: [n for n in b if _type_matches(n, _name_arg(a))],
    "nodesByType": lambda b, a, c: _nodes_by(b, c, "fhir_type", _name_arg(a)),
    "nodesByName": lambda b, a, c: _nodes_by(b, c, "name", _name_arg(a)),
    "children": lambda b, a, c: [x for n in b for x in _children(n)],
    "descendants": lambda b, a, c: [x for n in b for x in _descendants(n)],
    "repeat": _repeat,
    "extension": lambda b, a, c: [
        x
        for n in b
        for x in _navigate(n, "extension")
        if isinstance(x.value, dict) and x.value.get("url") == _arg(a, 0, b, c)
    ],
    "getResourceKey": lambda b, a, c: [
        Node(n.value.get("id")) for n in b if isinstance(n.value, dict) and n.value.get("id")
    ],
    "getReferenceKey": lambda b, a, c: [
        Node(k) for n in b if (k := _reference_key(n, _name_arg(a) if a else None)) is not None
    ],
    "join": lambda b, a, c: _lit((_arg(a, 0, b, c) if a else "").join(str(n.value) for n in b)),
    "iif": lambda b, a, c: (
        _eval(a[1], b, c)
        if _truthy(_eval(a[0], b, c))
        else (_eval(a[2], b, c) if len(a) > 2 else [])
    ),
    "startsWith": _string_fn(lambda s, v: s.startswith(str(v[0]))),
    "endsWith": _string_fn(lambda s, v: s.endswith(str(v[0]))),
    "contains": _string_fn(lambda s, v: str(v[0]) in s),
    "substring": _string_fn(
        lambda s, v: (
            s[int(v[0]) :] if len(v) < 2 or v[1] is None else s[int(v[0]) : int(v[0]) + int(v[1])]
        )
    ),
    "upper": _string_fn(lambda s, v: s.upper()),
    "lower": _string_fn(lambda s, v: s.lower()),
    "length": _string_fn(lambda s, v: len(s)),
    "matches": _string_fn(lambda s, v: re.search(str(v[0]), s) is not None),
    "replace": _string_fn(lambda s, v: s.replace(str(v[0]), str(v[1]))),
    "toString": lambda b, a, c: _lit(str(b[0].value)) if b else [],
    "lowBoundary": lambda b, a, c: [
        Node(v) for n in b if (v := _boundary(n, low=True)) is not None
    ],
    "highBoundary": lambda b, a, c: [
        Node(v) for n in b if (v := _boundary(n, low=False)) is not None
    ],
    "hasValue": lambda b, a, c: _lit(len(b) == 1 and not isinstance(b[0].value, dict | list)),
}


class CompiledPath:
    """A parsed FHIRPath expression."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self._ast = _Parser(expr).parse()

    def __repr__(self) -> str:
        return f"CompiledPath({self.expr!r})"

    def evaluate(
        self,
        resource: Any,
        variables: dict[str, Any] | None = None,
        cache: dict[int, list[Node]] | None = None,
    ) -> list[Node]:
        """Evaluate against a resource (or any JSON value, which becomes ``$this``).

        ``cache`` may be shared by several expressions evaluated on the same, structurally
        unchanged resource: the descendant walks behind ``nodesByType``/``nodesByName`` are
        then done once, not once per expression."""
        root = _root(resource)
        return _eval(self._ast, [root], _Context(root, dict(variables or {}), cache))

    def evaluate_at(
        self, focus: Node, root: Node, variables: dict[str, Any] | None = None
    ) -> list[Node]:
        """Evaluate with ``focus`` as ``$this`` (a node reached earlier, so its element type
        is known) inside the resource ``root``."""
        # variables are only read during evaluation: no defensive copy on this hot path
        return _eval(self._ast, [focus], _Context(root, variables or {}, None))


def root_node(resource: Any) -> Node:
    """The node of a resource (typed by its resourceType) for :meth:`CompiledPath.evaluate_at`."""
    return _root(resource)


@cache
def compile_path(expr: str) -> CompiledPath:
    """Parse once; the same expression string always returns the same compiled path."""
    return CompiledPath(expr)


def evaluate(resource: Any, expr: str, variables: dict[str, Any] | None = None) -> list[Any]:
    """Plain values of an expression on a resource."""
    return [n.value for n in compile_path(expr).evaluate(resource, variables)]
