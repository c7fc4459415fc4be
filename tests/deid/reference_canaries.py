"""The canary set as it was before its canaries were kept in their automatons only: a dict of
every text and digit canary beside an automaton per pass, the spaced set a set of its own, and
every written form of each patient's birth dates. Kept as the reference the differential test
(``test_canaries_differential``) compares ``deid.leakscan.CanarySet`` with: both must find the
same kinds, in the same order, in every text. It takes from ``CanarySet`` what a canary is made
of (names, contact points, addresses, a patient's and a relative's resources) and what a found
text is reported as, and keeps its own storage and matching: what the differential compares."""

from __future__ import annotations

import re
from typing import Any

import ahocorasick

from deid.leakscan import (
    _DIGIT_KINDS,
    _DIGITS,
    _NAME_JOINERS,
    _PROVIDER_TYPES,
    _SEPARATORS,
    MIN_DIGITS,
    MIN_SHORT,
    MIN_TEXT,
    CanarySet,
    _key_forms,
    _phone_forms,
    _strings,
    as_compared,
    ascii_forms,
    birth_date_forms,
)


class ReferenceCanarySet(CanarySet):
    """Canaries of a set of patients, compiled into two automatons: one over case-folded text,
    one over digit runs (phones, SSNs and identifiers match however they are punctuated)."""

    def __init__(self) -> None:
        super().__init__()
        self._kinds: dict[str, str] = {}
        self._digits: dict[str, str] = {}
        self._automaton: Any = None
        self._digit_automaton: Any = None
        self._words_automaton: Any = None  # see _compiled_words
        self._births: dict[str, tuple[str, ...]] = {}
        self._birth_years: dict[str, tuple[str, ...]] = {}
        self._reference_spaced: ReferenceCanarySet | None = None
        self._ids: set[str] = set()  # the patients' own resource ids: see add_source_id
        # (text, terminology) -> (kinds found, decoded base64 runs case-folded)
        self._memo: dict[tuple[str, bool], tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._kinds) + len(self._digits) + len(self._births)

    def add(self, kind: str, text: str) -> None:
        folded = " ".join(as_compared(text).casefold().split())
        if kind in _DIGIT_KINDS:
            digits = _DIGITS.sub("", folded)
            # identifiers are digit canaries only when mostly digits ("MRN-778812" stays text)
            if len(digits) >= MIN_DIGITS and (
                kind != "identifier" or len(digits) * 2 > len(folded)
            ):
                for form in _phone_forms(digits) if kind == "phone" else (digits,):
                    self._digits.setdefault(form, kind)
                self._changed()
        forms = ascii_forms(folded, kind)  # each kept by its own length
        for form in (folded, *forms) if len(folded) >= MIN_TEXT else forms:
            self._kinds.setdefault(form, kind)
        if len(folded) >= MIN_TEXT or forms:
            self._changed()

    def _changed(self) -> None:
        """A canary was added: the automatons are built again and nothing found is remembered."""
        self._automaton = self._digit_automaton = self._words_automaton = None
        self._reference_spaced = None
        self._memo = {}

    def add_person(self, parts: list[str]) -> None:
        """The name parts of one person: a long part alone, a short part (a name under four
        letters matches inside ordinary words and prose) only beside another part of the
        same person, in either order."""
        words = list(dict.fromkeys(p.casefold() for p in parts if len(p) >= MIN_SHORT))
        pieces = [piece for w in words for piece in _NAME_JOINERS.split(w) if piece != w]
        words = list(dict.fromkeys([*words, *(p for p in pieces if len(p) >= MIN_SHORT)]))
        for word in words:
            if len(word) >= MIN_TEXT:
                self.add("name", word)
        for short in (w for w in words if len(w) < MIN_TEXT):
            for other in (w for w in words if w != short):
                for phrase in (f"{short} {other}", f"{other} {short}", f"{other}, {short}"):
                    self._kinds.setdefault(phrase, "full_name")
        self._changed()

    def add_birth_date(self, birth: Any, pseudonym: str | None) -> None:
        if not (isinstance(birth, str) and len(birth) == 10):
            return
        forms = birth_date_forms(birth)
        if pseudonym is not None:
            # every birth date a patient's versions gave (a corrected one is still on old papers)
            before, years = self._births.get(pseudonym, ()), self._birth_years.get(pseudonym, ())
            self._births[pseudonym] = tuple(dict.fromkeys((*before, *forms)))
            self._birth_years[pseudonym] = tuple(dict.fromkeys((*years, birth[:4])))
            return
        for form in forms:
            self._kinds.setdefault(form, "birth_date")
        self._changed()

    def spaced(self) -> ReferenceCanarySet:
        """The text canaries with every run of characters other than letters and digits
        written as one space (``zquix@example.org`` as ``zquix example org``, ``MRN-ZQ/99173``
        as ``mrn zq 99173``), and, for text with letters outside ASCII, as a batch key shows
        it (:func:`_key_forms`: ``müller`` as ``m ller``), beside the digit canaries: for
        text whose punctuation was rewritten, as a batch key made safe is (``@`` and ``/``
        become ``-``) and compared with its separators as spaces. Not for released rows, where
        a canary's words apart are ordinary words."""
        if self._reference_spaced is None:
            spaced = ReferenceCanarySet()
            spaced._digits = self._digits
            for text, kind in self._kinds.items():
                for words in {" ".join(_SEPARATORS.split(text)).strip(), *_key_forms(text)}:
                    if len(words) >= MIN_TEXT:
                        spaced._kinds.setdefault(words, kind)
            self._reference_spaced = spaced
        return self._reference_spaced

    def birth_dates_only(self) -> ReferenceCanarySet:
        """The same patients' own birth dates, and no other canary (for rows whose other
        text was already scanned)."""
        births = ReferenceCanarySet()
        births._births = dict(self._births)
        births._birth_years = dict(self._birth_years)
        return births

    def birth_dates_of(self, pseudonym: str | None) -> tuple[str, ...]:
        return self._births.get(pseudonym, ()) if pseudonym is not None else ()

    def compile(self) -> None:
        """Build the automatons now: a compiled set that gets no new canary is only read by
        ``find``, so threads can share it."""
        self._compiled()
        self._compiled_digits()
        self._compiled_words()

    def _compiled(self) -> Any:
        if self._automaton is None:
            self._automaton = _automaton(self._kinds)
        return self._automaton

    def _compiled_digits(self) -> Any:
        if self._digit_automaton is None:
            self._digit_automaton = _automaton(self._digits)
            # CanarySet._find_digits, taken as it is, reads its digit automaton there
            self._store.digits = self._digit_automaton
        return self._digit_automaton

    def find(self, text: str, terminology: bool = False) -> list[str]:
        """Kinds of the canaries found in ``text`` as whole tokens (not inside longer words);
        in terminology text, single name parts are not counted. ``text`` is compared in its
        compatibility form (:func:`as_compared`)."""
        text = as_compared(text)
        found = self._find_digits(text) if self._digits and self._compiled_digits() else []
        if not self._kinds:
            return found
        folded = text.casefold()
        found.extend(self._reference_words(self._compiled(), folded, terminology))
        words = " ".join(_SEPARATORS.split(folded))
        if words != folded:
            # a canary of several words written with punctuation for its spaces, as a code or
            # a URL's segment must be (709-Michele-Prairie, zquix42.example.org): counted once
            # for a kind the text as written did not already show
            spaced = self._reference_words(self._compiled_words(), words, terminology)
            found.extend(dict.fromkeys(kind for kind in spaced if kind not in found))
        return found

    @staticmethod
    def _reference_words(automaton: Any, folded: str, terminology: bool) -> list[str]:
        """Kinds of the canaries of ``automaton`` in ``folded`` as whole tokens."""
        found: list[str] = []
        if not len(automaton):  # no canary of this kind: nothing to look for
            return found
        for end, (kind, length) in automaton.iter(folded):
            start = end - length + 1
            before = folded[start - 1] if start > 0 else " "
            after = folded[end + 1] if end + 1 < len(folded) else " "
            whole = not before.isalnum() and not after.isalnum()
            if whole or _digits_glued(folded, start, end + 1):
                if not (terminology and kind == "name"):
                    found.append(kind)
        return found

    def _compiled_words(self) -> Any:
        """The text canaries of several words (an address line, a city with its ZIP, a full
        name, an email, an identifier with punctuation), each with every run of characters
        other than letters and digits written as one space, for text read the same way. Phones
        and SSNs are matched as digits however they are punctuated."""
        if self._words_automaton is None:
            words: dict[str, str] = {}
            for text, kind in self._kinds.items():
                spaced = " ".join(_SEPARATORS.split(text)).strip()
                if " " in spaced and kind not in ("phone", "ssn"):
                    words.setdefault(spaced, kind)
            self._words_automaton = _automaton(words)
        return self._words_automaton

    def scan_value(self, value: Any, patient: str | None = None) -> list[str]:
        """Kinds found in any string of a JSON value, including decoded base64 runs. Single
        name parts are not searched in terminology text or in provider resources; full names,
        identifiers, addresses, phones and emails are searched everywhere, the birth date of
        ``patient`` (a pseudonym) in this value."""
        kinds: list[str] = []
        provider = isinstance(value, dict) and value.get("resourceType") in _PROVIDER_TYPES
        births = self.birth_dates_of(patient)
        years = self._birth_years.get(patient, ()) if births and patient is not None else ()
        for written, terminology in _strings(value, provider):
            text = as_compared(written)
            found, decoded = self._findings(text, terminology)
            kinds.extend(found)
            if births:
                for folded in (*decoded, text.casefold()):
                    kinds.extend(self._birth_hits(folded, births, years))
        return kinds


def _automaton(words: dict[str, str]) -> Any:
    automaton = ahocorasick.Automaton()
    for text, kind in words.items():
        automaton.add_word(text, (kind, len(text)))
    if words:
        automaton.make_automaton()
    return automaton


def _digits_glued(folded: str, start: int, end: int) -> bool:
    """The canary at ``folded[start:end]`` with digits glued to it and nothing else: its word
    is digits, the canary, digits; the canary's four characters on a glued side are letters;
    the word is not all hex digits (read by regular expressions, apart from the set's own
    character loop)."""
    head = re.search(r"\d*\Z", folded[:start])
    tail = re.match(r"\d*", folded[end:])
    before, after = (head.group() if head else ""), (tail.group() if tail else "")
    if not before and not after:
        return False
    outside = folded[: start - len(before)][-1:] + folded[end + len(after) :][:1]
    if re.search(r"[^\W_]", outside):
        return False
    canary = folded[start:end]
    if before and not re.match(r"[^\W\d_]{4}", canary):
        return False
    if after and not re.search(r"[^\W\d_]{4}\Z", canary):
        return False
    return not re.fullmatch(r"[0-9a-f]+", before + canary + after)
