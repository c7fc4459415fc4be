"""De-identification policies in the Microsoft FHIR anonymizer configuration format.

A policy is ``{"fhirVersion", "processingErrors", "fhirPathRules": [{"path", "method", ...}],
"parameters": {...}}``. Loading checks every rule and compiles its FHIRPath once; a bad policy
fails at load with the rule's index and what is wrong. Our extensions, all optional:

- ``parameters.dateShiftScope: "patient"`` (one secret offset per patient, so intervals within a
  patient survive), ``dateShiftRange`` (days, default 50);
- method ``pseudonymize``: resource ids and references rewritten to keyed pseudonyms, the same
  function on both sides, so the de-identified graph still joins;
- ``encrypt`` is AES-256-GCM (authenticated);
- ``parameters.extensionAllowList``: extension URLs that may stay; an unknown
  ``modifierExtension`` sends the resource to quarantine (its meaning cannot be ignored safely).

A policy may also carry a ``release`` section: an allow-list (:mod:`deid.allowlist`) that is
the default-deny base. Then only what it names is released, and the rules run over the released
resource (they can change or remove, never add back); ``Policy.layered`` puts a configuration
without one on a shipped profile's. The shipped profiles are allow-lists with no rules.

Keys never live in a policy shipped with the platform: when ``cryptoHashKey``, ``dateShiftKey``
or ``encryptKey`` are absent they are derived from the key provider (HKDF, one label each).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from deid.allowlist import ReleaseProfile
from deid.errors import DeidError
from fhirlake.fhirpath import CompiledPath, FhirPathError, compile_path

METHODS = (
    "keep",
    "redact",
    "dateshift",
    "cryptohash",
    "encrypt",
    "substitute",
    "perturb",
    "generalize",
    "pseudonymize",
)
SCOPES = ("resource", "patient", "file", "folder")
_LEADING_TYPE = re.compile(r"^([A-Z][A-Za-z]+)(?:\.|$)")
_ANY_TYPE = {"Resource", "DomainResource"}
POLICY_DIR = Path(__file__).parent / "policies"


class PolicyError(DeidError):
    """A policy file that cannot be used; the message names the rule index and the problem."""


@dataclass(frozen=True)
class Rule:
    index: int
    path: str
    method: str
    compiled: CompiledPath
    applies_to: str | None  # resource type, or None for every type
    options: dict[str, Any] = field(default_factory=dict)
    cases: tuple[tuple[CompiledPath, CompiledPath], ...] = ()


@dataclass(frozen=True)
class PolicyParameters:
    date_shift_key: str | None = None
    date_shift_scope: str = "resource"
    date_shift_days: int = 50
    crypto_hash_key: str | None = None
    encrypt_key: str | None = None
    partial_ages: bool = False
    partial_dates: bool = False
    partial_zip_codes: bool = False
    restricted_zip3: frozenset[str] = frozenset()
    extension_allow_list: frozenset[str] | None = None


def _bool(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise PolicyError(f"parameters.{name} must be true or false")
    return value


def _parameters(params: Any) -> PolicyParameters:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise PolicyError("parameters must be an object")
    scope = str(params.get("dateShiftScope", "resource"))
    if scope not in SCOPES:
        raise PolicyError(f"parameters.dateShiftScope must be one of {SCOPES}, got {scope!r}")
    days = params.get("dateShiftRange", 50)
    if not isinstance(days, int) or days < 1:
        raise PolicyError("parameters.dateShiftRange must be a positive number of days")
    zips = params.get("restrictedZipCodeTabulationAreas", [])
    if not isinstance(zips, list) or not all(isinstance(z, str) and len(z) == 3 for z in zips):
        raise PolicyError("parameters.restrictedZipCodeTabulationAreas must list 3-digit strings")
    allow = params.get("extensionAllowList")
    if allow is not None and not (
        isinstance(allow, list) and all(isinstance(u, str) for u in allow)
    ):
        raise PolicyError("parameters.extensionAllowList must be a list of URLs")

    def key(name: str) -> str | None:
        value = params.get(name)
        return value if isinstance(value, str) and value else None

    return PolicyParameters(
        date_shift_key=key("dateShiftKey"),
        date_shift_scope=scope,
        date_shift_days=days,
        crypto_hash_key=key("cryptoHashKey"),
        encrypt_key=key("encryptKey"),
        partial_ages=_bool(params, "enablePartialAgesForRedact"),
        partial_dates=_bool(params, "enablePartialDatesForRedact"),
        partial_zip_codes=_bool(params, "enablePartialZipCodesForRedact"),
        restricted_zip3=frozenset(zips),
        extension_allow_list=frozenset(allow) if allow is not None else None,
    )


def _compile(index: int, what: str, expr: str) -> CompiledPath:
    try:
        return compile_path(expr)
    except FhirPathError as exc:
        raise PolicyError(f"rule {index}: {what} is not valid FHIRPath: {exc}") from exc


def _rule(index: int, raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyError(f"rule {index}: must be an object with 'path' and 'method'")
    path, method = raw.get("path"), raw.get("method")
    if not isinstance(path, str) or not path.strip():
        raise PolicyError(f"rule {index}: 'path' is missing or empty")
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise PolicyError(f"rule {index}: unknown method {method!r} (one of {', '.join(METHODS)})")
    method = method.lower()
    compiled = _compile(index, "path", path)
    leading = _LEADING_TYPE.match(path)
    applies_to = leading.group(1) if leading and leading.group(1) not in _ANY_TYPE else None
    options = {k: v for k, v in raw.items() if k not in ("path", "method")}
    cases: list[tuple[CompiledPath, CompiledPath]] = []
    if method == "substitute" and "replaceWith" not in raw:
        raise PolicyError(f"rule {index}: substitute needs 'replaceWith'")
    if method == "perturb":
        span = raw.get("span")
        if not isinstance(span, int | float) or span < 0:
            raise PolicyError(f"rule {index}: perturb needs a non-negative number 'span'")
        if raw.get("rangeType", "fixed") not in ("fixed", "proportional"):
            raise PolicyError(f"rule {index}: rangeType must be 'fixed' or 'proportional'")
    if method == "generalize":
        raw_cases = raw.get("cases")
        if not isinstance(raw_cases, dict) or not raw_cases:
            raise PolicyError(f"rule {index}: generalize needs a non-empty 'cases' object")
        for condition, result in raw_cases.items():
            cases.append(
                (
                    _compile(index, "a case condition", condition),
                    _compile(index, "a case result", str(result)),
                )
            )
        if raw.get("otherValues", "redact") not in ("redact", "keep"):
            raise PolicyError(f"rule {index}: otherValues must be 'redact' or 'keep'")
    return Rule(index, path, method, compiled, applies_to, options, tuple(cases))


@dataclass(frozen=True)
class Policy:
    """A loaded, checked and compiled policy."""

    name: str
    rules: tuple[Rule, ...]
    parameters: PolicyParameters
    processing_errors: str = "raise"
    # the default-deny base: when set, only what it names is released, and the rules above
    # then run over the released resource (they can change or remove, never add back)
    release: ReleaseProfile | None = None
    # the document it was loaded from, so worker processes can load the same policy
    source: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, document: Any, name: str = "policy") -> Policy:
        if not isinstance(document, dict):
            raise PolicyError("a policy is a JSON object")
        version = document.get("fhirVersion", "")
        if version not in ("", "R4", "r4", None):
            raise PolicyError(f"fhirVersion {version!r} is not supported (R4 only)")
        errors = document.get("processingErrors", "raise")
        if errors not in ("raise", "keep", "skip"):
            raise PolicyError("processingErrors must be 'raise', 'keep' or 'skip'")
        raw_rules = document.get("fhirPathRules")
        if not isinstance(raw_rules, list):
            raise PolicyError("fhirPathRules must be a list")
        rules = tuple(_rule(i, r) for i, r in enumerate(raw_rules))
        parameters = _parameters(document.get("parameters"))
        raw_release = document.get("release")
        release = (
            ReleaseProfile.from_dict(raw_release, parameters.restricted_zip3)
            if raw_release is not None
            else None
        )
        return cls(name, rules, parameters, str(errors), release, document)

    @classmethod
    def layered(cls, document: Any, name: str = "policy", base: str = "safe_harbor") -> Policy:
        """A Microsoft anonymizer configuration on top of a shipped profile's allow-list (its
        default-deny base), unless the document brings its own ``release`` section."""
        if isinstance(document, dict) and "release" not in document:
            base_document = cls.shipped(base).source
            parameters = {**base_document["parameters"], **(document.get("parameters") or {})}
            document = {**document, "release": base_document["release"], "parameters": parameters}
        return cls.from_dict(document, name)

    @classmethod
    def load(cls, path: Path | str) -> Policy:
        path = Path(path)
        return cls.from_dict(_read_document(path), name=path.stem)

    @classmethod
    def shipped(cls, name: str) -> Policy:
        """A profile shipped in ``deid/policies``: ``research`` or ``safe_harbor``."""
        return cls.load(_shipped_path(name))

    @cached_property
    def _plans(self) -> dict[str, tuple[Rule, ...]]:
        return {}

    def plan_for(self, resource_type: str) -> tuple[Rule, ...]:
        """The rules that can match a resource of this type, in order; built once per type."""
        plan = self._plans.get(resource_type)
        if plan is None:
            plan = tuple(r for r in self.rules if r.applies_to in (None, resource_type))
            self._plans[resource_type] = plan
        return plan


def _shipped_path(name: str) -> Path:
    path = POLICY_DIR / f"{name}.json"
    if not path.exists():
        available = sorted(p.stem for p in POLICY_DIR.glob("*.json"))
        raise PolicyError(f"no shipped policy {name!r} (available: {available})")
    return path


def _read_document(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise PolicyError(f"policy file {path.name} cannot be read") from exc
    except ValueError as exc:
        raise PolicyError(f"policy file {path.name} is not JSON: {exc}") from exc


def shipped_parameters(name: str) -> PolicyParameters:
    """The parameters of a shipped profile (date-shift range, restricted ZIP3s...) without
    compiling its rules and allow-list, which takes a second against the FHIR models: for
    steps that only read a parameter."""
    document = _read_document(_shipped_path(name))
    if not isinstance(document, dict):
        raise PolicyError("a policy is a JSON object")
    return _parameters(document.get("parameters"))


def shipped_date_rule(name: str) -> str:
    """The date rule of a shipped profile's allow-list (``shift`` or ``year``), read without
    compiling the profile (see :func:`shipped_parameters`)."""
    document = _read_document(_shipped_path(name))
    release = document.get("release") if isinstance(document, dict) else None
    rule = release.get("dates", "shift") if isinstance(release, dict) else "shift"
    return str(rule)
