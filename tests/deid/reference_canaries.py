"""The canary set as it was before its canaries were kept in their automatons only: a dict of
every text and digit canary beside an automaton per pass, the spaced set a set of its own, and
every written form of each patient's birth dates. Kept as the reference the differential test
(``test_canaries_differential``) compares ``deid.leakscan.CanarySet`` with: both must find the
same kinds, in the same order, in every text. A change to what the scan finds changes both."""

from __future__ import annotations

from typing import Any

import ahocorasick

from deid.leakscan import (
    _DATE_RUN,
    _DIGIT_KINDS,
    _DIGIT_RUN,
    _DIGITS,
    _MAIDEN_NAME,
    _PROVIDER_TYPES,
    _SEPARATORS,
    MEMO_LIMIT,
    MIN_DIGITS,
    MIN_SHORT,
    MIN_TEXT,
    _base64_texts,
    _birth_date_in,
    _digit_groups,
    _hex_word_end,
    _identifier_kind,
    _key_forms,
    _name_parts,
    _phone_forms,
    _strings,
    as_compared,
    birth_date_forms,
)


class ReferenceCanarySet:
    """Canaries of a set of patients, compiled into two automatons: one over case-folded text,
    one over digit runs (phones, SSNs and identifiers match however they are punctuated)."""

    def __init__(self) -> None:
        self._kinds: dict[str, str] = {}
        self._digits: dict[str, str] = {}
        self._automaton: Any = None
        self._digit_automaton: Any = None
        self._words_automaton: Any = None  # see _compiled_words
        self._births: dict[str, tuple[str, ...]] = {}
        self._birth_years: dict[str, tuple[str, ...]] = {}
        self._spaced: ReferenceCanarySet | None = None
        self._ids: set[str] = set()  # the patients' own resource ids: see add_source_id
        # (text, terminology) -> (kinds found, decoded base64 runs case-folded)
        self._memo: dict[tuple[str, bool], tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._kinds) + len(self._digits) + len(self._births)

    def add(self, kind: str, text: str) -> None:
        folded = " ".join(text.casefold().split())
        if kind in _DIGIT_KINDS:
            digits = _DIGITS.sub("", folded)
            # identifiers are digit canaries only when mostly digits ("MRN-778812" stays text)
            if len(digits) >= MIN_DIGITS and (
                kind != "identifier" or len(digits) * 2 > len(folded)
            ):
                for form in _phone_forms(digits) if kind == "phone" else (digits,):
                    self._digits.setdefault(form, kind)
                self._changed()
        if len(folded) >= MIN_TEXT:
            self._kinds.setdefault(folded, kind)
            self._changed()

    def _changed(self) -> None:
        """A canary was added: the automatons are built again and nothing found is remembered."""
        self._automaton = self._digit_automaton = self._words_automaton = None
        self._spaced = None
        self._memo = {}

    def add_person(self, parts: list[str]) -> None:
        """The name parts of one person: a long part alone, a short part (a name under four
        letters matches inside ordinary words and prose) only beside another part of the
        same person, in either order."""
        words = list(dict.fromkeys(p.casefold() for p in parts if len(p) >= MIN_SHORT))
        for word in words:
            if len(word) >= MIN_TEXT:
                self.add("name", word)
        for short in (w for w in words if len(w) < MIN_TEXT):
            for other in (w for w in words if w != short):
                for phrase in (f"{short} {other}", f"{other} {short}", f"{other}, {short}"):
                    self._kinds.setdefault(phrase, "full_name")
        self._changed()

    def add_name(self, name: Any) -> None:
        """A HumanName or a name string: its parts, and given + family as a full name (also
        glued into one word, either way round)."""
        self.add_person(_name_parts(name))
        if isinstance(name, dict):
            given = [g for g in name.get("given") or [] if isinstance(g, str)]
            family = name.get("family")
            if given and isinstance(family, str):
                self.add("full_name", f"{given[0]} {family}")
                # written as one token, as local code systems and URLs do: CourtneyBarajas
                for glued in (f"{given[0]}{family}", f"{family}{given[0]}"):
                    if not any(c.isspace() for c in glued):
                        self.add("full_name", glued)

    def add_contact_points(self, resource: dict[str, Any]) -> None:
        """Telecom, address (lines, city with ZIP) and identifiers of a person or contact."""
        for telecom in resource.get("telecom") or []:
            value = telecom.get("value") if isinstance(telecom, dict) else None
            if isinstance(value, str):
                self.add("email" if telecom.get("system") == "email" else "phone", value)
        addresses = resource.get("address") or []
        for addr in addresses if isinstance(addresses, list) else [addresses]:
            if isinstance(addr, dict):
                self._add_address(addr)
        for ident in resource.get("identifier") or []:
            value = ident.get("value") if isinstance(ident, dict) else None
            if isinstance(value, str):
                self.add(_identifier_kind(ident), value)

    def _add_address(self, addr: dict[str, Any]) -> None:
        for line in addr.get("line") or []:
            if isinstance(line, str):
                self.add("address", line)
        city, state, zip_ = (addr.get(k) for k in ("city", "state", "postalCode"))
        if not (isinstance(city, str) and isinstance(zip_, str) and len(zip_) >= 5):
            return
        # a city or a ZIP alone is common text; together they place a person
        places = [f"{city} {zip_}", f"{city}, {zip_}"]
        if isinstance(state, str):
            places += [f"{city}, {state} {zip_}", f"{city} {state} {zip_}"]
        for place in places:
            self.add("city_zip", place)

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

    def add_patient(self, patient: dict[str, Any], pseudonym: str | None = None) -> None:
        """Every direct identifier of a Patient resource and of its contacts, and its own id
        (:meth:`add_source_id`); with ``pseudonym``, the birth date is searched in that
        patient's rows only."""
        self.add_source_id(patient.get("id"))
        for name in patient.get("name") or []:
            self.add_name(name)
        self.add_contact_points(patient)
        for contact in patient.get("contact") or []:
            if isinstance(contact, dict):
                self.add_name(contact.get("name"))
                self.add_contact_points(contact)
        for ext in patient.get("extension") or []:
            if isinstance(ext, dict) and ext.get("url") == _MAIDEN_NAME:
                self.add_name(ext.get("valueString"))
        self.add_birth_date(patient.get("birthDate"), pseudonym)

    def add_resource(self, resource: dict[str, Any], pseudonym: str | None = None) -> None:
        """The canaries of a resource about a patient or a relative (``_ADDERS``)."""
        rtype = resource.get("resourceType")
        if rtype == "Patient":
            self.add_patient(resource, pseudonym)
        elif rtype in ("RelatedPerson", "FamilyMemberHistory"):
            names = resource.get("name")
            for name in names if isinstance(names, list) else [names]:
                self.add_name(name)
            self.add_contact_points(resource)

    def add_source_id(self, resource_id: Any) -> None:
        """A patient's resource id in the source (``Patient/<id>``), of ``MIN_TEXT`` characters
        or more: looked for in a batch key (``source_id_in``) and nowhere else. Released rows
        hold pseudonyms in its place, and a short id (``1001``) equals ordinary values."""
        if isinstance(resource_id, str) and len(resource_id) >= MIN_TEXT:
            self._ids.add(resource_id.casefold())

    def source_id_in(self, text: str) -> bool:
        """Whether ``text`` holds one of the source ids as a whole token (``Patient-p4471x9``
        holds ``p4471x9``, ``p4471x90`` does not). A FHIR id is letters, digits, ``-`` and
        ``.`` only, which a batch key keeps as written."""
        folded = text.casefold()
        return any(self._has_token(folded, resource_id) for resource_id in self._ids)

    def spaced(self) -> ReferenceCanarySet:
        """The text canaries with every run of characters other than letters and digits
        written as one space (``zquix@example.org`` as ``zquix example org``, ``MRN-ZQ/99173``
        as ``mrn zq 99173``), and, for text with letters outside ASCII, as a batch key shows
        it (:func:`_key_forms`: ``müller`` as ``m ller``), beside the digit canaries: for
        text whose punctuation was rewritten, as a batch key made safe is (``@`` and ``/``
        become ``-``) and compared with its separators as spaces. Not for released rows, where
        a canary's words apart are ordinary words."""
        if self._spaced is None:
            spaced = ReferenceCanarySet()
            spaced._digits = self._digits
            for text, kind in self._kinds.items():
                for words in {" ".join(_SEPARATORS.split(text)).strip(), *_key_forms(text)}:
                    if len(words) >= MIN_TEXT:
                        spaced._kinds.setdefault(words, kind)
            self._spaced = spaced
        return self._spaced

    def birth_dates_only(self) -> ReferenceCanarySet:
        """The same patients' own birth dates, and no other canary (for rows whose other
        text was already scanned)."""
        births = ReferenceCanarySet()
        births._births = dict(self._births)
        births._birth_years = dict(self._birth_years)
        return births

    def birth_dates_of(self, pseudonym: str | None) -> tuple[str, ...]:
        return self._births.get(pseudonym, ()) if pseudonym is not None else ()

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
        return self._digit_automaton

    def find(self, text: str, terminology: bool = False) -> list[str]:
        """Kinds of the canaries found in ``text`` as whole tokens (not inside longer words);
        in terminology text, single name parts are not counted. ``text`` is compared in its
        compatibility form (:func:`as_compared`)."""
        text = as_compared(text)
        found = self._find_digits(text) if self._digits else []
        if not self._kinds:
            return found
        folded = text.casefold()
        found.extend(self._whole_words(self._compiled(), folded, terminology))
        words = " ".join(_SEPARATORS.split(folded))
        if words != folded:
            # a canary of several words written with punctuation for its spaces, as a code or
            # a URL's segment must be (709-Michele-Prairie, zquix42.example.org): counted once
            # for a kind the text as written did not already show
            spaced = self._whole_words(self._compiled_words(), words, terminology)
            found.extend(dict.fromkeys(kind for kind in spaced if kind not in found))
        return found

    @staticmethod
    def _whole_words(automaton: Any, folded: str, terminology: bool) -> list[str]:
        """Kinds of the canaries of ``automaton`` in ``folded`` as whole tokens."""
        found: list[str] = []
        if not len(automaton):  # no canary of this kind: nothing to look for
            return found
        for end, (kind, length) in automaton.iter(folded):
            start = end - length + 1
            before = folded[start - 1] if start > 0 else " "
            after = folded[end + 1] if end + 1 < len(folded) else " "
            if not before.isalnum() and not after.isalnum():
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

    def _find_digits(self, text: str) -> list[str]:
        """Digit canaries in the digit runs of ``text``, whole groups only: a phone written
        ``(555) 867-5309`` matches, the same digits inside a longer number do not. A run glued
        to letters counts (``MRN55190377``) unless all it is glued to is hexadecimal (a
        pseudonym or a digest: ``ab5558675309cd``)."""
        found: list[str] = []
        backwards = ""  # the text reversed, when a run is glued to a word
        hex_end = 0  # where the last hex word a run was glued in ends
        for match in _DIGIT_RUN.finditer(text):
            run = match.group(0)
            start, end = match.span()
            if len(run) < MIN_DIGITS or _DATE_RUN.fullmatch(run):
                continue  # dates are searched as birth dates, per patient
            if (start > 0 and text[start - 1].isalnum()) or (
                end < len(text) and text[end].isalnum()
            ):
                if end > hex_end:  # not in the hex word of an earlier run
                    backwards = backwards or text[::-1]
                    hex_end = _hex_word_end(text, backwards, start, end) or 0
                if end <= hex_end:
                    continue  # hex digests and pseudonyms hold digit runs by chance
            digits, bounds = _digit_groups(run)
            seen: set[tuple[int, str]] = set()  # a phone with and without its country code
            for last, (kind, length) in self._compiled_digits().iter(digits):
                if last + 1 - length in bounds and last + 1 in bounds and (last, kind) not in seen:
                    seen.add((last, kind))
                    found.append(kind)
        return found

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

    def _findings(self, text: str, terminology: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What ``text`` holds of the canaries of every patient (its decoded base64 runs
        included), and those runs case-folded; remembered (see the module doc)."""
        key = (text, terminology)
        remembered = self._memo.get(key)
        if remembered is not None:
            return remembered
        kinds = self.find(text, terminology)
        decoded = tuple(_base64_texts(text))
        for content in decoded:
            kinds.extend(self.find(content))
        findings = (tuple(kinds), tuple(content.casefold() for content in decoded))
        if len(self._memo) < MEMO_LIMIT:
            self._memo[key] = findings
        return findings

    def _birth_hits(
        self, folded: str, births: tuple[str, ...], years: tuple[str, ...] = ("",)
    ) -> list[str]:
        if not any(year in folded for year in years):  # every written form holds its year
            return []
        return ["birth_date"] if any(_birth_date_in(folded, b) for b in births) else []


def _automaton(words: dict[str, str]) -> Any:
    automaton = ahocorasick.Automaton()
    for text, kind in words.items():
        automaton.add_word(text, (kind, len(text)))
    if words:
        automaton.make_automaton()
    return automaton
