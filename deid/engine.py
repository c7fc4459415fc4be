"""Apply a compiled policy to one resource, with the Microsoft anonymizer's semantics: rules run
in order, and each primitive value is handled by the first rule whose path reaches it (directly
or through a complex element that contains it); later rules never touch it again. Elements
emptied by redaction are removed, and the resource is labelled in ``meta.security`` with what
was done to it.

A policy with a release profile (:mod:`deid.allowlist`) is applied allow-list first: the
resource is reduced to what the profile names (a new resource, ``meta`` rebuilt from security
labels only), and the rules then run over that.
"""

from __future__ import annotations

import copy
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from deid import methods
from deid.allowlist import (
    ProfileError,
    ReleaseContext,
    release_resource,
    released_modifier_urls,
)
from deid.errors import DeidError
from deid.leakscan import CanarySet
from deid.policy import Policy, Rule
from deid.terminology import Terminology
from fhirlake.fhirpath import FhirPathError, Node
from fhirlake.references import compartment_elements
from vault.clock import RandomBytes
from vault.pseudonym import Pseudonymizer

SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
_LABELS = {
    "REDACTED": "redacted",
    "ABSTRED": "abstracted",
    "CRYTOHASH": "cryptographic hash function",
    "MASKED": "masked",
    "PERTURBED": "exact value is replaced with another exact value",
    "SUBSTITUTED": "exact value is replaced with a predefined value",
    "GENERALIZED": "exact value is replaced with a general value",
    "PSEUDED": "pseudonymized",
}
_METHOD_LABEL = {
    "redact": "REDACTED",
    "dateshift": "PERTURBED",
    "cryptohash": "CRYTOHASH",
    "encrypt": "MASKED",
    "perturb": "PERTURBED",
    "substitute": "SUBSTITUTED",
    "generalize": "GENERALIZED",
    "pseudonymize": "PSEUDED",
}
_DATEISH = re.compile(r"^\d{4}(-\d{2}(-\d{2}((T[\d:.]+)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


class ProcessingError(DeidError):
    """A resource the policy cannot be applied to (e.g. an unknown modifierExtension)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeidSecrets:
    """Keys for the methods that need one, derived from the pseudonym key unless a policy
    carries its own (as the anonymizer's own test configurations do)."""

    crypto_hash_key: bytes
    date_shift_key: bytes
    encrypt_key: bytes
    pseudonymizer: Pseudonymizer

    @classmethod
    def derive(cls, pseudonym_key: bytes, policy: Policy) -> DeidSecrets:
        def hkdf(label: bytes) -> bytes:
            return HKDF(hashes.SHA256(), 32, salt=None, info=b"ehr-deid/1|" + label).derive(
                pseudonym_key
            )

        p = policy.parameters
        return cls(
            crypto_hash_key=p.crypto_hash_key.encode() if p.crypto_hash_key else hkdf(b"hash"),
            date_shift_key=p.date_shift_key.encode() if p.date_shift_key else hkdf(b"date"),
            encrypt_key=hkdf(b"encrypt") if not p.encrypt_key else _encrypt_key(p.encrypt_key),
            pseudonymizer=Pseudonymizer(pseudonym_key),
        )


def _encrypt_key(text: str) -> bytes:
    raw = text.encode()
    if len(raw) != 32:
        raise DeidError("parameters.encryptKey must be 32 bytes for AES-256-GCM")
    return raw


@dataclass
class DeidOutcome:
    resource: dict[str, Any]
    rule_counts: Counter[int] = field(default_factory=Counter)
    labels: set[str] = field(default_factory=set)
    # what the allow-list withheld or generalised inside released resources, by kind
    release_counts: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Leaf:
    parent: dict[str, Any] | list[Any]
    key: str | int
    fhir_type: str | None
    name: str

    @property
    def value(self) -> Any:
        return self.parent[self.key]  # type: ignore[index]

    def set(self, value: Any) -> None:
        self.parent[self.key] = value  # type: ignore[index]


_REMOVED = object()


def _leaves(node: Node) -> Iterator[_Leaf]:
    """The primitive values a matched node holds (itself, when primitive)."""
    if node.parent is None or node.key is None:
        container: Any = {"_": node.value}
        yield from _walk(node.value, container, "_", node.fhir_type, node.name or "")
        return
    parent: Any = node.parent
    key: str | int = node.key
    if node.index is not None:
        parent, key = node.parent[node.key], node.index
    yield from _walk(node.value, parent, key, node.fhir_type, node.name or "")


def _walk(
    value: Any, parent: Any, key: str | int, fhir_type: str | None, name: str
) -> Iterator[_Leaf]:
    if isinstance(value, dict):
        for k in list(value):
            if k == "resourceType":
                continue
            # Age is the one complex type whose leaves a partial redaction needs to recognise
            yield from _walk(value[k], value, k, fhir_type if fhir_type == "Age" else None, k)
    elif isinstance(value, list):
        for i in range(len(value)):
            yield from _walk(value[i], value, i, fhir_type, name)
    else:
        yield _Leaf(parent, key, fhir_type, name)


def _prune(node: Any) -> Any:
    """Drop removed values and the arrays and objects left empty by them."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            pruned = _prune(v)
            if pruned is not _REMOVED:
                out[k] = pruned
        return out if out else _REMOVED
    if isinstance(node, list):
        items = [p for p in (_prune(v) for v in node) if p is not _REMOVED]
        return items if items else _REMOVED
    return node


class Deidentifier:
    """A policy bound to its secrets, applied resource by resource."""

    def __init__(
        self,
        policy: Policy,
        secrets: DeidSecrets,
        *,
        today: date | None = None,
        rng: random.Random | None = None,
        random_bytes: RandomBytes = os.urandom,
        terminology: Terminology | None = None,
    ) -> None:
        self.policy = policy
        self.secrets = secrets
        self.today = today or methods.today_utc()
        # the first day after today on which what this engine released could differ
        self.horizon = methods.DayHorizon(self.today)
        self.rng = rng or random.Random()
        self.random_bytes = random_bytes
        self.terminology = terminology or Terminology()
        self._shifts: dict[str, int] = {}

    # -- scope --------------------------------------------------------------------------------
    def _shift_days(self, resource: dict[str, Any], patient_scope: str | None) -> int:
        params = self.policy.parameters
        if params.date_shift_scope == "patient" and patient_scope:
            scope = f"patient:{patient_scope}"
        else:
            scope = f"{resource.get('resourceType')}/{resource.get('id', '')}"
        shift = self._shifts.get(scope)
        if shift is None:
            if len(self._shifts) > 100_000:  # a batch's patients, not every resource ever seen
                self._shifts.clear()
            shift = methods.date_shift_days(
                self.secrets.date_shift_key, scope, params.date_shift_days
            )
            self._shifts[scope] = shift
        return shift

    # -- one primitive, through the method table ----------------------------------------------
    def _apply(
        self,
        rule: Rule,
        leaf: _Leaf,
        resource: dict[str, Any],
        shift: int,
        resolve: Resolver,
        outcome: DeidOutcome,
    ) -> None:
        method = _METHODS.get(rule.method, _unchanged)
        change = method(_Call(self, rule, leaf, resource, shift, resolve))
        if change is None:
            return
        result, label = change.value, change.label or _METHOD_LABEL.get(rule.method)
        if result is _REMOVED:
            label = "REDACTED"
            sibling = f"_{leaf.key}" if isinstance(leaf.key, str) else None
            if sibling and isinstance(leaf.parent, dict) and sibling in leaf.parent:
                leaf.parent[sibling] = _REMOVED  # extensions on a removed primitive go too
        leaf.set(result)
        outcome.rule_counts[rule.index] += 1
        if label:
            outcome.labels.add(label)

    # -- one resource -------------------------------------------------------------------------
    def apply(
        self,
        resource: dict[str, Any],
        *,
        patient_scope: str | None = None,
        resolve: Resolver | None = None,
    ) -> DeidOutcome:
        """De-identify a copy of ``resource``. ``resolve`` maps a reference string to the
        pseudonymous (type, id) of its target, or None when it cannot be resolved.

        Resources nested in it (contained ones, Bundle entries, Parameters) are de-identified
        first, each as the resource it is, and the outer rules leave them alone afterwards.
        A rule that cannot be evaluated is a processing error: ``raise`` (the default) raises
        :class:`ProcessingError`, ``skip`` releases an empty resource, ``keep`` keeps the
        value unchanged.

        With a release profile (the default-deny base) the resource is first reduced to what
        the profile names; the rules then run over that (see :meth:`_release`)."""
        resolver = resolve or _literal_resolver(self.secrets.pseudonymizer)
        if self.policy.release is not None:
            return self._release(resource, patient_scope, resolver)
        work = copy.deepcopy(resource)
        outcome = DeidOutcome(work)
        done: set[tuple[int, str | int]] = set()
        try:
            self._process(work, patient_scope, resolver, outcome, done)
        except FhirPathError as exc:
            if self.policy.processing_errors == "raise":
                raise ProcessingError(
                    "processing_error", f"{resource.get('resourceType')}: {exc}"
                ) from exc
            if self.policy.processing_errors == "skip":
                empty: dict[str, Any] = {"resourceType": resource.get("resourceType")}
                _label(empty, {"REDACTED"})
                outcome.resource = empty
                return outcome
            outcome.resource = copy.deepcopy(resource)
            return outcome
        outcome.resource = work
        return outcome

    def _release(
        self, resource: dict[str, Any], patient_scope: str | None, resolver: Resolver
    ) -> DeidOutcome:
        """The allow-list first: a new resource holding only what the profile names, with a
        meta rebuilt from security labels. Rules of the policy then run over the released
        resource, so they can change or remove what the profile released but never bring back
        what it dropped."""
        profile = self.policy.release
        assert profile is not None
        rtype = str(resource.get("resourceType"))
        self._check_modifiers(resource, rtype)
        try:
            profile.plan(rtype)
        except ProfileError as exc:  # not an R4 resource type: nothing to release it as
            raise ProcessingError("unknown_resource_type", f"{rtype}: {exc}") from exc
        # a date of a resource of no patient is not shifted by an offset of its own under the
        # per-patient scope: linked by its references to the patient's records, such offsets
        # give the patient's back (ReleaseContext.shift_days)
        unfiled = self.policy.parameters.date_shift_scope == "patient" and not patient_scope
        ctx = ReleaseContext(
            profile,
            rtype,
            None if unfiled else self._shift_days(resource, patient_scope),
            self.today,
            self.secrets.pseudonymizer.resource_key,
            resolver,
            self.terminology,
            horizon=self.horizon,
        )
        released = release_resource(resource, ctx)
        if _names_a_contained_person(resource, released):
            raise ProcessingError(
                "contained_person_named", f"{rtype}: a value released names a person it contains"
            )
        if not profile.lists(rtype):  # released as its pseudonym alone
            ctx.counts["type_not_in_profile"] += 1
        outcome = DeidOutcome(released, labels=ctx.labels, release_counts=ctx.counts)
        if not self.policy.rules:
            _label(released, outcome.labels)
            return outcome
        try:
            self._process(released, patient_scope, resolver, outcome, set())
        except FhirPathError as exc:
            raise ProcessingError("processing_error", f"{rtype}: {exc}") from exc
        outcome.resource = released
        return outcome

    def _check_modifiers(self, resource: dict[str, Any], rtype: str) -> None:
        """A modifierExtension changes the meaning of the resource or element holding it: one
        off the allow-list, at the top or on an element the release keeps (a dosage, a
        Consent's provision, a contained Medication: :func:`released_modifier_urls`), withholds
        the resource rather than release it with its meaning silently changed."""
        allowed = self.policy.parameters.extension_allow_list
        if allowed is None:
            return
        urls: list[Any] = [
            mod.get("url") if isinstance(mod, dict) else None
            for mod in resource.get("modifierExtension") or []
        ]
        profile = self.policy.release
        if profile is not None:
            try:  # the top's and those of every element the release keeps
                urls = released_modifier_urls(resource, profile)
            except ProfileError:  # not an R4 resource type: withheld as such by the caller
                pass
        if any(url not in allowed for url in urls):
            message = f"{rtype}: modifierExtension not on the allow-list"
            raise ProcessingError("unknown_modifier_extension", message)

    def _process(
        self,
        work: dict[str, Any],
        patient_scope: str | None,
        resolver: Resolver,
        outcome: DeidOutcome,
        done: set[tuple[int, str | int]],
        top: bool = True,
    ) -> None:
        rtype = str(work.get("resourceType"))
        self._check_modifiers(work, rtype)
        for nested, standalone in _nested_resources(work):
            inner = DeidOutcome(nested)
            # Bundle entries are resources of their own and carry their own labels; contained
            # ones are labelled through their container
            self._process(nested, patient_scope, resolver, inner, done, top=standalone)
            outcome.rule_counts.update(inner.rule_counts)
            outcome.labels |= inner.labels
            for leaf in _walk(nested, {"_": nested}, "_", None, ""):
                done.add((id(leaf.parent), leaf.key))
        labels: set[str] = set()
        local = DeidOutcome(work)
        shift = self._shift_days(work, patient_scope)
        # values change in place but the tree keeps its shape until pruning, so one
        # descendant walk serves every nodesByType/nodesByName rule (substitute resets it)
        walks: dict[int, list[Node]] = {}
        for rule in self.policy.plan_for(rtype):
            for node in rule.compiled.evaluate(work, cache=walks):
                if rule.method == "substitute":
                    self._substitute(rule, node, done, local)
                    walks.clear()
                    continue
                for leaf in _leaves(node):
                    marker = (id(leaf.parent), leaf.key)
                    if marker in done:
                        continue
                    done.add(marker)
                    self._apply(rule, leaf, work, shift, resolver, local)
        outcome.rule_counts.update(local.rule_counts)
        labels |= local.labels
        outcome.labels |= labels
        pruned = _prune(work)
        kept = pruned if isinstance(pruned, dict) else {}
        work.clear()
        work.update(kept)
        work.setdefault("resourceType", rtype)
        if top:  # nested resources are labelled through the resource that carries them
            _label(work, outcome.labels)

    def _substitute(
        self, rule: Rule, node: Node, done: set[tuple[int, str | int]], outcome: DeidOutcome
    ) -> None:
        """Replace a node with the configured value, keeping whatever an earlier rule already
        decided inside it (as the anonymizer does)."""
        leaves = list(_leaves(node))
        if not isinstance(node.value, dict):
            if leaves and (id(leaves[0].parent), leaves[0].key) in done:
                return
            node.replace(copy.deepcopy(rule.options["replaceWith"]))
        else:
            decided = {
                key
                for key, value in node.value.items()
                if any(
                    (id(leaf.parent), leaf.key) in done
                    for leaf in _walk(value, node.value, key, None, key)
                )
            }
            replacement = copy.deepcopy(rule.options["replaceWith"])
            if isinstance(replacement, dict):
                replacement.update({k: node.value[k] for k in decided})
            node.replace(replacement)
        for leaf in _leaves(node):
            done.add((id(leaf.parent), leaf.key))
        outcome.rule_counts[rule.index] += 1
        outcome.labels.add("SUBSTITUTED")


@dataclass(frozen=True, slots=True)
class _Call:
    """One primitive value reached by one rule, with what the methods need to rewrite it."""

    engine: Deidentifier
    rule: Rule
    leaf: _Leaf
    resource: dict[str, Any]
    shift: int
    resolve: Resolver


class _Change(NamedTuple):
    """The value a method puts in place, and its security label when not the method's own."""

    value: Any
    label: str | None = None


# None: the value stays as it is and the rule is not counted for it
_Method = Callable[[_Call], _Change | None]


def _keep(call: _Call) -> _Change | None:
    return None


def _unchanged(call: _Call) -> _Change | None:
    return _Change(call.leaf.value)


def _redact(call: _Call) -> _Change | None:
    params, leaf, value = call.engine.policy.parameters, call.leaf, call.leaf.value
    if params.partial_dates and isinstance(value, str) and _DATEISH.match(value):
        partial = methods.redact_date_partially(value, call.engine.today)
        call.engine.horizon.note(methods.age_limit_day(value))
        return _Change(partial if partial is not None else _REMOVED)
    if params.partial_zip_codes and leaf.name == "postalCode" and isinstance(value, str):
        return _Change(methods.redact_zip_partially(value, params.restricted_zip3), "ABSTRED")
    if params.partial_ages and leaf.fhir_type == "Age" and isinstance(value, int | float):
        if methods.redact_age_partially(float(value)):
            return _Change(value, "ABSTRED")
    return _Change(_REMOVED)


def _dateshift(call: _Call) -> _Change | None:
    value, today = call.leaf.value, call.engine.today
    if not (isinstance(value, str) and _DATEISH.match(value)):
        return _Change(value)
    if call.leaf.name == "birthDate":
        call.engine.horizon.note(methods.age_limit_day(value))
    if call.leaf.name == "birthDate" and methods.is_over_age_limit(value, today):
        # HIPAA's "90 or older": the year that makes the patient 90 this year (next year's another)
        call.engine.horizon.note(methods.next_new_year(today))
        return _Change(f"{methods.aggregated_birth_year(today.year):04d}", "ABSTRED")
    try:
        shifted = methods.shift_date(value, call.shift)
    except ValueError:  # a day that does not exist, or a sentinel shifted past the calendar
        return _Change(_REMOVED, "REDACTED")
    return None if shifted == value else _Change(shifted)


def _cryptohash(call: _Call) -> _Change | None:
    value, key = call.leaf.value, call.engine.secrets.crypto_hash_key
    if not isinstance(value, str):
        return _Change(value)
    if call.leaf.name == "reference" and value.startswith("#"):
        return _Change("#" + methods.crypto_hash(value[1:], key))
    if call.leaf.name == "reference" and "/" in value:
        head, _, tail = value.rpartition("/")
        return _Change(f"{head}/{methods.crypto_hash(tail, key)}")
    return _Change(methods.crypto_hash(value, key))


def _encrypt(call: _Call) -> _Change | None:
    value, engine = call.leaf.value, call.engine
    if not isinstance(value, str):
        return _Change(value)
    aad = f"{call.resource.get('resourceType')}/{call.leaf.name}".encode()
    return _Change(
        methods.encrypt_value(value, engine.secrets.encrypt_key, aad, engine.random_bytes)
    )


def _perturb(call: _Call) -> _Change | None:
    value, options = call.leaf.value, call.rule.options
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _Change(value)
    round_to = int(options.get("roundTo", 0))
    result = methods.perturb_number(
        float(value),
        float(options["span"]),
        str(options.get("rangeType", "fixed")),
        round_to,
        call.engine.rng.uniform,
    )
    # an integer stays an integer unless the rule asks for decimal places
    return _Change(int(result) if isinstance(value, int) and round_to == 0 else result)


def _generalize(call: _Call) -> _Change | None:
    value = call.leaf.value
    for condition, result in call.rule.cases:
        matched = condition.evaluate(value)  # a primitive root is $this
        if matched and matched[0].value is True:
            out = result.evaluate(value)
            if not out:
                return _Change(_REMOVED)
            generalised = out[0].value
            whole = isinstance(generalised, Decimal) and generalised == int(generalised)
            return _Change(int(generalised) if whole and isinstance(value, int) else generalised)
    return _Change(value if call.rule.options.get("otherValues", "redact") == "keep" else _REMOVED)


def _pseudonymize(call: _Call) -> _Change | None:
    leaf, resource, value = call.leaf, call.resource, call.leaf.value
    if not isinstance(value, str):
        return _Change(_REMOVED)
    pseudo = call.engine.secrets.pseudonymizer
    if leaf.name == "id" and leaf.parent is resource:
        return _Change(pseudo.resource_key(str(resource.get("resourceType")), value))
    if leaf.name == "reference":
        target = call.resolve(value)
        return _Change(f"{target[0]}/{target[1]}" if target else _REMOVED)
    if leaf.name == "id":  # contained resources keep local ids; they join within the resource
        return _Change(value)
    return _Change(pseudo.token("value", value))


# substitute is not here: it replaces whole nodes, not primitives (Deidentifier._substitute)
_METHODS: dict[str, _Method] = {
    "keep": _keep,
    "redact": _redact,
    "dateshift": _dateshift,
    "cryptohash": _cryptohash,
    "encrypt": _encrypt,
    "perturb": _perturb,
    "generalize": _generalize,
    "pseudonymize": _pseudonymize,
}


# the contained resources that are a person whose identifiers a record can carry inside it
_CONTAINED_PEOPLE = ("Patient", "RelatedPerson", "Person")
_INSIDE = "inside"  # the pseudonym the people a record holds have their birth dates searched under


def _names_a_contained_person(resource: dict[str, Any], released: dict[str, Any]) -> bool:
    """Whether what is released of ``resource`` names a person known only inside it: a Patient,
    a RelatedPerson or a Person it contains (a lab result whose subject is ``#p``, its patient
    inside it), the person a reference of its Patient compartment names by identifier or
    display alone (no literal reference), or the one any other reference of it (a performer,
    a focus, an encounter's participant) names by identifier alone, with its display. The
    release drops them, but the leak scan reads its canaries from the vault's Patient and
    relatives' records, where such a person is not, and a local code holding their name or
    MRN was released (into ``views.observation`` too, a record of no patient)."""
    contained = _contained_people(resource)
    references = [
        ref
        for element in compartment_elements(str(resource.get("resourceType")))
        for ref in _logical_references(resource.get(element))
    ] + _identifier_references(resource)
    if not contained and not references:
        return False
    canaries = CanarySet()
    for person in contained:
        if person.get("resourceType") == "Person":  # no adder: read as a Patient is
            canaries.add_patient(person, _INSIDE)
        else:
            canaries.add_resource(person, _INSIDE)
    for ref in references:
        canaries.add_identifiers({"identifier": [ref.get("identifier")]})
        if isinstance(ref.get("display"), str):
            canaries.add_name(ref["display"])
    return bool(canaries.scan_value(released, _INSIDE))


def _contained_people(resource: dict[str, Any]) -> list[dict[str, Any]]:
    contained = resource.get("contained")
    if not isinstance(contained, list):
        return []
    return [
        c for c in contained if isinstance(c, dict) and c.get("resourceType") in _CONTAINED_PEOPLE
    ]


def _logical_references(value: Any) -> list[dict[str, Any]]:
    """The References in ``value`` (one or a list) that have no literal reference."""
    items = value if isinstance(value, list) else [value]
    return [r for r in items if isinstance(r, dict) and not isinstance(r.get("reference"), str)]


def _identifier_references(value: Any) -> list[dict[str, Any]]:
    """Every element of ``value``, at any depth outside ``contained``, that names what it refers
    to by an ``identifier`` (one Identifier, as a Reference does) and has no literal
    reference: a performer, a focus, an encounter's participant named by MRN."""
    if isinstance(value, list):
        return [ref for item in value for ref in _identifier_references(item)]
    if not isinstance(value, dict):
        return []
    named = isinstance(value.get("identifier"), dict)
    found = [value] if named and not isinstance(value.get("reference"), str) else []
    for key, item in value.items():
        if key != "contained":
            found += _identifier_references(item)
    return found


def _nested_resources(work: dict[str, Any]) -> list[tuple[dict[str, Any], bool]]:
    """Resources carried inside this one, and whether each stands on its own: contained ones
    do not; Bundle entries and Parameters values do."""
    found = [(c, False) for c in work.get("contained") or [] if isinstance(c, dict)]
    for entry in work.get("entry") or []:
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            found.append((entry["resource"], True))
    for param in work.get("parameter") or []:
        if isinstance(param, dict) and isinstance(param.get("resource"), dict):
            found.append((param["resource"], True))
    return found


def _label(resource: dict[str, Any], labels: set[str]) -> None:
    if not labels:
        return
    security = resource.setdefault("meta", {}).setdefault("security", [])
    present = {s.get("code") for s in security if isinstance(s, dict)}
    for code, display in _LABELS.items():
        if code in labels and code not in present:
            security.append({"system": SECURITY_SYSTEM, "code": code, "display": display})


Resolver = Callable[[str], tuple[str, str] | None]


def _literal_resolver(pseudonymizer: Pseudonymizer) -> Resolver:
    """Relative and absolute literal references, pseudonymised by type and id."""
    from fhirlake.references import literal_target

    def resolve(value: str) -> tuple[str, str] | None:
        target = literal_target(value)
        if target is None:
            return None
        return target[0], pseudonymizer.resource_key(*target)

    return resolve
