"""PHI leak scan: look for what we know is PHI (canaries taken from the vault) in released data.

Canaries are names, identifier values, address lines, phone numbers, emails and full birth
dates of the patients a batch touches. A birth date is PHI only next to its patient: released
tables are full of (shifted) dates, and with a thousand patients some shifted date always equals
somebody's birthday. So when the patient's pseudonym is known, the birth date is searched only in
that patient's rows; otherwise (no pseudonym given) everywhere.

Released text is case-folded and searched with one Aho-Corasick automaton (pyahocorasick);
base64 runs are decoded and searched too (clinical notes travel as base64 attachments).
Results name canary kinds and row pseudonyms, never the canary.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ahocorasick

_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")
_DIGITS = re.compile(r"\D+")
_HEX_RUN = re.compile(r"[0-9a-fA-F]+")


def _mostly_text(content: str) -> bool:
    """Decoded bytes that read as text: random bytes decoded by chance hold short words
    ("tony", "soto") between control characters, which are not a leak."""
    if not content:
        return False
    printable = sum(1 for ch in content if (ch.isprintable() and ch != "\ufffd") or ch in "\n\r\t")
    return printable / len(content) >= 0.9


MIN_TEXT = 4  # shorter names match inside ordinary words
MIN_DIGITS = 7


@dataclass(frozen=True)
class LeakHit:
    kind: str
    row: str  # the released row's pseudonym, never the matched text


@dataclass
class LeakScanResult:
    scanned_rows: int = 0
    canaries: int = 0
    hits: list[LeakHit] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.hits

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(h.kind for h in self.hits))


# Resources about providers, not patients: their names (a practice named after a town or a
# person) are not patient PHI, so single name parts are not searched in them.
_PROVIDER_TYPES = {
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "HealthcareService",
    "Endpoint",
    "Medication",
    "Substance",
}
_TERMINOLOGY_EXTENSIONS = {
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
}


def _strings(node: Any, terminology: bool = False) -> Iterable[tuple[str, bool]]:
    """Every string with a flag for terminology text: a Coding's display, or the text of a
    race/ethnicity category. Surnames such as Black or White are also category names, so
    single name parts are not searched there; everything else still is."""
    if isinstance(node, str):
        yield node, terminology
    elif isinstance(node, dict):
        coding = "system" in node and "code" in node
        category = node.get("url") in _TERMINOLOGY_EXTENSIONS
        for key, value in node.items():
            term = terminology or (coding and key == "display") or category
            yield from _strings(value, term)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, terminology)


class CanarySet:
    """Canaries of a set of patients, compiled into one automaton."""

    def __init__(self) -> None:
        self._kinds: dict[str, str] = {}
        self._automaton: Any = None
        self._births: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._kinds) + len(self._births)

    def add(self, kind: str, text: str) -> None:
        folded = " ".join(text.casefold().split())
        if kind == "phone":
            digits = _DIGITS.sub("", folded)
            if len(digits) >= MIN_DIGITS:
                self._kinds.setdefault(digits, kind)
        if len(folded) >= MIN_TEXT:
            self._kinds.setdefault(folded, kind)
        self._automaton = None

    def add_patient(self, patient: dict[str, Any], pseudonym: str | None = None) -> None:
        """Every direct identifier of a Patient resource; with ``pseudonym``, the birth date is
        searched in that patient's rows only."""
        for name in patient.get("name") or []:
            given = [g for g in name.get("given") or [] if isinstance(g, str)]
            family = name.get("family") if isinstance(name.get("family"), str) else ""
            for part in [*given, family]:
                self.add("name", part)
            if given and family:
                self.add("full_name", f"{given[0]} {family}")
        for ident in patient.get("identifier") or []:
            if isinstance(ident.get("value"), str):
                self.add("identifier", ident["value"])
        for addr in patient.get("address") or []:
            for line in addr.get("line") or []:
                if isinstance(line, str):
                    self.add("address", line)
        for telecom in patient.get("telecom") or []:
            value = telecom.get("value")
            if isinstance(value, str):
                self.add("email" if telecom.get("system") == "email" else "phone", value)
        birth = patient.get("birthDate")
        if isinstance(birth, str) and len(birth) == 10:
            if pseudonym is None:
                self.add("birth_date", birth)
            else:
                self._births[pseudonym] = birth

    def birth_date_of(self, pseudonym: str | None) -> str | None:
        return self._births.get(pseudonym) if pseudonym is not None else None

    @staticmethod
    def _has_token(text: str, token: str) -> bool:
        start = text.find(token)
        while start >= 0:
            end = start + len(token)
            before = text[start - 1] if start > 0 else " "
            after = text[end] if end < len(text) else " "
            if not before.isalnum() and not after.isalnum():
                return True
            start = text.find(token, start + 1)
        return False

    def _compiled(self) -> Any:
        if self._automaton is None:
            automaton = ahocorasick.Automaton()
            for text, kind in self._kinds.items():
                automaton.add_word(text, (kind, len(text)))
            automaton.make_automaton()
            self._automaton = automaton
        return self._automaton

    def find(self, text: str, terminology: bool = False) -> list[str]:
        """Kinds of the canaries found in ``text`` as whole tokens (not inside longer words);
        in terminology text, single name parts are not counted."""
        if not self._kinds:
            return []
        folded = text.casefold()
        found = []
        for end, (kind, length) in self._compiled().iter(folded):
            start = end - length + 1
            before = folded[start - 1] if start > 0 else " "
            after = folded[end + 1] if end + 1 < len(folded) else " "
            if not before.isalnum() and not after.isalnum():
                if not (terminology and kind == "name"):
                    found.append(kind)
        return found

    def scan_value(self, value: Any, patient: str | None = None) -> list[str]:
        """Kinds found in any string of a JSON value, including decoded base64 runs. Single
        name parts are not searched in terminology text or in provider resources; full names,
        identifiers, addresses, phones and emails are searched everywhere, the birth date of
        ``patient`` (a pseudonym) in this value."""
        kinds: list[str] = []
        provider = isinstance(value, dict) and value.get("resourceType") in _PROVIDER_TYPES
        birth = self.birth_date_of(patient)
        for text, terminology in _strings(value, provider):
            kinds.extend(self.find(text, terminology))
            if birth is not None and self._has_token(text, birth):
                kinds.append("birth_date")
            for run in _BASE64_RUN.findall(text):
                if _HEX_RUN.fullmatch(run):
                    continue  # pseudonyms and digests are hex, not base64 text
                try:
                    decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
                except (binascii.Error, ValueError):
                    continue
                content = decoded.decode("utf-8", "replace")
                if _mostly_text(content):
                    kinds.extend(self.find(content))
        return kinds


def scan_rows(
    canaries: CanarySet, rows: Iterable[tuple[str, Any] | tuple[str, Any, str | None]]
) -> LeakScanResult:
    """Scan released rows given as (row pseudonym, JSON-like value[, patient pseudonym])."""
    result = LeakScanResult(canaries=len(canaries))
    for row in rows:
        row_id, value = row[0], row[1]
        patient = row[2] if len(row) > 2 else None
        result.scanned_rows += 1
        for kind in canaries.scan_value(value, patient):
            result.hits.append(LeakHit(kind, row_id))
    return result
