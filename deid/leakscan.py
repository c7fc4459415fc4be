"""PHI leak scan: look for what we know is PHI (canaries taken from the vault) in released data.

Canaries are the name parts (the patient's, their contacts', their relatives'), identifier
values, address lines, city with ZIP, phone numbers, emails and full birth dates (ISO, US and
day-first numeric forms, compact, with the month's name: ``birth_date_forms``) of the patients a
batch touches. Phones, SSNs and identifiers that are mostly digits are also matched as digits,
against the digit runs of released text normalised the same way, so punctuation does not hide
them. A name part under four letters matches inside ordinary words, so it counts only as a
whole word next to another name part of the same person. A canary of several words is also
found with punctuation for its spaces (``709-Michele-Prairie``), as a code token writes it.

A phone, an SSN or a mostly-digit identifier of seven digits or more (``MIN_DIGITS``) is a digit
canary. It matches whole digit groups of a run, never digits inside a longer group (MRN 55190377
is not in ``123455190377999``), and a run glued to letters counts (``MRN55190377``,
``SSN624183307``, ``ID:55190377x``) unless all the letters and digits it is glued to are hex
digits: pseudonyms and digests are hex, and their digit runs are chance (so ``ab55190377cd``,
but also ``A55190377``, is not found). A shorter one is a text canary only, found as a whole
word and never inside one (``778812`` is not in ``MRN778812``). Phones are read as North
American numbers: a ten-digit phone is a canary after the country code too (``1``, ``001``:
``+15085550163``, ``0015085550163``), and a phone given with it (``+1 508 555 0163``) is a
canary as its ten-digit national number too, however each is written.

A birth date is PHI only next to its patient: released
tables are full of (shifted) dates, and with a thousand patients some shifted date always equals
somebody's birthday. So when the patient's pseudonym is known, the birth date is searched only in
that patient's rows; otherwise (no pseudonym given) everywhere.

Released text is case-folded and searched with one Aho-Corasick automaton (pyahocorasick);
base64 runs are decoded and searched too (clinical notes travel as base64 attachments).
Results name canary kinds and row pseudonyms, never the canary.

Released rows repeat most of their strings (statuses, code systems, codes, units): what a
string holds of every patient's canaries is remembered per canary set (up to ``MEMO_LIMIT``
strings, forgotten whenever a canary is added); a patient's own birth date is searched afresh in
each row, and only in strings that hold its year, which every written form of it does.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ahocorasick
from anyascii import anyascii

from fhirlake.nested import held_resources

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


def repeated(value: Any) -> list[Any]:
    """A repeating element's items, whatever shape it came in: the canaries are also read from
    records the quarantine holds, which validation refused, so an element may be a lone object
    or string where FHIR has a list (its one item), or a number (none)."""
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, dict | str) else []


def _object(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (a refused record's shape)."""
    return value if isinstance(value, dict) else {}


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
    elif isinstance(node, int | float) and not isinstance(node, bool):
        # a number can carry an identifier as well as a string can: an SSN or an MRN typed
        # into a lab value, a birth date written 19460219
        whole = _whole_number(node)
        if whole is not None:
            yield whole, terminology
    elif isinstance(node, dict):
        coding = "system" in node and "code" in node
        category = node.get("url") in _TERMINOLOGY_EXTENSIONS
        for key, value in node.items():
            term = terminology or (coding and key == "display") or category
            yield from _strings(value, term)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, terminology)


def _whole_number(value: float) -> str | None:
    """The digits of a whole number long enough to be a digit canary (``264876926.0`` gives
    ``264876926``); None for fractions and short numbers, which no identifier is."""
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    digits = str(abs(int(value)))
    return digits if len(digits) >= MIN_DIGITS else None


# What the scan finds beyond the canaries as written, for the de-identification settings'
# digest (deid.staging.settings_digest): a batch published before a rule was added may hold what
# it finds, and is scanned again by the next `ehr run`
SCAN_RULES: tuple[str, ...] = (
    # a birth date with its month's name between dashes, dots or slashes or none (19-FEB-1946,
    # 19FEB1946), and the compact form or one with the month's name glued to letters (DOB19460219)
    "birth_date_named_month_separators_glued",
    # a canary of several words written with punctuation for its spaces (709-Michele-Prairie)
    "words_punctuated",
    # canaries compared in their compatibility form (an SSN in full-width digits); names also
    # in ASCII and as a code writes them (BRONTEWALD, OQUARRIGAN, PEMBERLY of Pemberly-Quasht,
    # IvoZanderquist of a name given as text); a Coverage's member number and an Account's
    # number; the records the quarantine holds; a Patient's source id of letters and digits;
    # every batch against every patient
    "ascii_code_forms_other_records_source_ids_every_patient",
    # the ASCII forms of a canary shorter than MIN_TEXT as written (张小明 as zhangxiaoming)
    "ascii_forms_of_short_canaries",
    # the ASCII forms of other conventions too: umlauts and Nordic letters as two letters
    # (MUELLER, GROENLUND, AASHILD), Cyrillic as ICAO Doc 9303 writes it (PETROVSKII)
    "ascii_forms_other_conventions",
    # an Encounter's and a Claim's identifiers (a visit number, a claim number)
    "encounter_claim_identifiers",
    # a short name part outside ASCII by its ASCII forms (XIAOMING), and a full name family
    # name first (Zhang Xiaoming)
    "short_parts_ascii_family_first",
    # a text canary glued to digits as a local code or a user name writes it (BARAJAS01)
    "glued_to_digits",
    # digit groups joined by the other characters a code keeps (617:555:0193, 8473+6251), a
    # time of day with its zone not read as a run
    "digits_joined_by_code_characters",
    # a numeric birth date with separators glued to letters before it (DOB1946-02-19)
    "birth_date_numeric_glued_before",
    # an address written as text (Address.text) and its parts holding a letter and a digit
    "address_text",
    # the records the quarantine holds under no patient, read as JSON in Windows-1252 when
    # they are no UTF-8 and with NaN as a number
    "unattributed_quarantined_records",
    # ... after the UTF-8 byte-order marks such a record starts with (NDJSON files joined)
    "unattributed_quarantined_records_after_byte_order_marks",
    # ... in UTF-16 or UTF-32 (a whole file refused), line by line, a Bundle's entries, and
    # nested deeper than orjson reads
    "unattributed_quarantined_records_wide_lines_bundles_deep",
    # ... whose resourceType is written in another case or with spaces (" patient")
    "unattributed_quarantined_records_type_in_any_case",
    # a name written as text: its first and last names past its titles and suffixes
    "name_text_without_affixes",
    # a name of given names and no family name: its first and last given names as a full name
    "name_of_given_names_only",
    # ... and cut short, read as far as its last whole value
    "unattributed_quarantined_records_cut_short",
    # a birth date compact month first or day first (02191946, 19021946, 2191946 as a number)
    "birth_date_compact_month_or_day_first",
    # each given name with the family name, and all of them with it (JenniferBarajas,
    # CourtneyJenniferBarajas), not the first given name only
    "full_name_every_given_name",
    # a city with its ZIP glued as a code writes it (DUNMERE01984)
    "city_zip_glued",
    # a quarantined document of many lines cut short read whole (a Bundle written indented)
    "unattributed_quarantined_documents_cut_short",
    # ... its lines ended at line feeds and carriage returns only, not at U+2028 in a string
    "unattributed_quarantined_lines_at_line_ends",
    # a name written as text: past degrees written with dots (M.D.), generations written with
    # digits (3rd) and remarks in brackets or quotes
    "name_text_without_dotted_affixes_or_remarks",
    # the records the quarantine holds under no patient: a Bundle written in another case
    # ("bundle") read as its entries
    "unattributed_quarantined_bundles_in_any_case",
    # ... each value of a line holding several ({...}{...}: NDJSON files joined)
    "unattributed_quarantined_values_joined_on_a_line",
    # ... in UTF-16 or UTF-32 without a byte-order mark
    "unattributed_quarantined_records_wide_without_mark",
    # a name written as text: past titles of other languages (Herr, Sra., Dr. med., Mme)
    "name_text_without_titles_of_other_languages",
    # the persons a record holds inside it (a contained Patient of a refused record, a Patient
    # sent as Parameters, in a Bundle inside a Bundle or one whose entry is one object), a
    # Person resource, and quarantined documents written one after another
    "held_resources_person_documents_one_after_another",
    # a person's names, addresses, telecoms and identifiers in extensions on any element, and
    # the identifier of the record a Patient links to
    "person_extensions_link_identifiers",
    # the persons contained in a vault record of any type (ingest marks such records)
    "persons_contained_in_any_record",
    # every given name with the family name glued family first too (BarajasCourtneyJennifer)
    "full_name_every_given_name_family_first",
    # the records the quarantine holds under no patient: read without the zero bytes they end
    # in (a file cut off by a crash, its unwritten blocks zeros)
    "unattributed_quarantined_records_without_trailing_zeros",
)
_MONTHS = (
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
)  # fmt: skip
# a run of digits with at most two separators between digits: "(555) 867-5309", "999 12 3456";
# also the other characters a released code or version keeps between digits (`:+<>=`,
# deid.terminology.ANY_CODE): a phone or an MRN written 617:555:0193 or 8473+6251 is a code
# token the release keeps, and its digit groups were read as runs too short to be a canary
_DIGIT_RUN = re.compile(r"\d(?:[ ().\-/:+<>=]{0,2}\d)*")
_DATE_RUN = re.compile(r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[/-]\d{1,2}[/-]\d{2,4}")
# a time of day with its zone (10:15:30, 00:00:00+05:30, 00:00:00.000-04:00): a date-time's
# time, whose digit groups ':' and '+' now join, is no identifier
_TIME_RUN = re.compile(r"\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:[+-]\d{2}:\d{2})?")
_SEPARATOR = re.compile(r"[ ().\-/:+<>=]+")
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")
# titles, generations and degrees a name written as text carries around it (``Mrs. Zephyrine
# Quillfeather``, ``Quillfeather, Zephyrine, Jr``): not its first or last name
_NAME_AFFIXES = frozenset(
    "mr mrs ms miss mx dr prof rev fr sir dame jr sr ii iii iv md phd rn dds esq".split()
    + "bsn msn mba mph pharmd dnp lpn aprn facs".split()
    # of other languages a hospital's records are written in: German (Herr, Frau, Dr. med.,
    # Dipl.), Spanish and Portuguese (Sra., Srta., Dra., Lic.), French (Mme, Mlle), Italian
    # (Sig.ra, Dott.ssa, Avv.), Dutch (Dhr., Mevr.); not Don or Dona, which are first names too
    + "herr frau frl med dipl sra srta dra lic mme mlle sig sigra dott dottssa avv dhr mevr".split()
)
# a remark in brackets or quotes a name written as text carries (``(deceased)``, a nickname):
# no first or last name
_NAME_REMARK = re.compile(r"\([^)]*\)|\[[^\]]*\]|\"[^\"]*\"|\u201c[^\u201d]*\u201d")
_NAME_TOKEN_BREAK = re.compile(r"[\s,;]+")
# what joins the parts of one name into a word: O'Brien (or its typographic apostrophe, U+2019),
# Pemberly-Quasht
_NAME_JOINERS = re.compile(r"['\u2019-]")


def _name_words(text: str) -> list[str]:
    """The words of a name written as text that may be its first or last name: past its
    titles, generations and degrees, written with dots or without (``M.D.`` as ``MD``: split
    at its dots, ``Zephyrine Quillfeather, M.D.`` gave the full name ``Zephyrine D``), past
    tokens holding a digit (``3rd``) and remarks in brackets or quotes (``(deceased)``)."""
    words: list[str] = []
    for token in _NAME_TOKEN_BREAK.split(_NAME_REMARK.sub(" ", text)):
        if token.replace(".", "").casefold() in _NAME_AFFIXES or any(c.isdigit() for c in token):
            continue
        words.extend(_WORD.findall(token))
    return words


# what a code (ASCII letters and digits, deid.terminology) leaves out of a name written in it
_NOT_CODE_CHARACTERS = re.compile(r"[^0-9a-z]+")
# the kinds a code can hold glued (letters and digits only): names, an address line
# (9QUIMBYROW), an email (ZQUIXEXAMPLEORG), a city with its ZIP (DUNMERE01984, DUNMEREMA01984)
_GLUED_KINDS = ("name", "full_name", "address", "email", "city_zip")
# a source id that is a canary in released text (see CanarySet.add_source_id): six characters
# or more, a letter and a digit among them
_LINKING_ID = re.compile(r"(?=.*[A-Za-z])(?=.*[0-9])[A-Za-z0-9\-.]{6,64}")
# what is no letter or digit, in any script (a batch key made safe keeps ASCII ones only)
_SEPARATORS = re.compile(r"[\W_]+")
# what a batch key made safe writes as "-" (vault.landing.batch_key), in case-folded text
_NOT_KEY_CHARACTERS = re.compile(r"[^0-9a-z]+")
_HEX_PREFIX = re.compile(r"[0-9a-fA-F]*")
_DIGIT_KINDS = {"phone", "ssn", "identifier"}
# what separates the lines of an address written as text (Address.text)
_ADDRESS_TEXT_PARTS = re.compile(r"[\n\r,;]+")
MEMO_LIMIT = 200_000  # strings whose findings a canary set remembers
MIN_SHORT = 2  # one-letter initials carry too little to count
BIRTH_FORMS_LIMIT = 1_000  # patients whose birth dates' written forms a canary set remembers


def _birth_parts(iso_date: str) -> tuple[int, int, int] | None:
    """Year, month and day of a full ISO date; None when it is not one."""
    try:
        year, month, day = (int(x) for x in iso_date.split("-"))
    except ValueError:
        return None
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    return year, month, day


def birth_date_forms(iso_date: str) -> tuple[str, ...]:
    """A full ISO birth date as people write it, case-folded: year first (ISO, also with
    slashes or dots), month first (US) and day first, each with slashes, dashes or dots and
    with and without leading zeros, compact (year, month or day first: ``19460219``,
    ``02191946``, ``19021946``, and ``2191946`` as a number drops its zero), and with the
    month's name (also between dashes, dots or slashes or none: ``19-feb-1946``,
    ``19feb1946``, as Oracle and SAS write dates).

    Every form holds the four-digit year: a patient's rows are searched for these only in
    strings that hold it (``_birth_hits``, ``deid.release``), and year, month and day together
    are specific enough to be searched, as whole tokens, in the patient's own rows. A day-first
    form whose day is 12 or under is also the month-first form of one other date of the same
    year (07/03/1946 is 3 July read the US way): only that date, only in the patient's own
    rows, and counting it errs toward withholding. Forms with a two-digit year are not here
    (see ``reason_birth_date_forms``)."""
    parts = _birth_parts(iso_date)
    if parts is None:
        return ()
    year, month, day = parts
    full, short = _MONTHS[month - 1], _MONTHS[month - 1][:3]
    # the compact form of HL7 v2 and of many exports (19460219) too, and compact month first
    # (02191946, as US forms and file names write MMDDYYYY) and day first (19021946); a
    # number loses the leading zero of either (2191946), as spreadsheets drop it
    forms = {iso_date, f"{year}{month:02d}{day:02d}"}
    for first, second in ((month, day), (day, month)):
        forms.update({f"{first:02d}{second:02d}{year}", f"{first}{second:02d}{year}"})
    for sep in "/-.":
        forms.update({f"{year}{sep}{month:02d}{sep}{day:02d}", f"{year}{sep}{month}{sep}{day}"})
        for first, second in ((month, day), (day, month)):
            forms.update(
                {f"{first:02d}{sep}{second:02d}{sep}{year}", f"{first}{sep}{second}{sep}{year}"}
            )
    for name in (full, short):
        forms.update({f"{name} {day} {year}", f"{name} {day}, {year}", f"{name}. {day}, {year}"})
        # with spaces, dashes, dots or slashes between the parts, or none: Oracle's DD-MON-YYYY
        # (19-feb-1946), SAS's DATE9. (19feb1946), and the month first or the year first
        for sep in _NAMED_MONTH_SEPARATORS:
            for dd in (f"{day}", f"{day:02d}"):
                forms.update({f"{dd}{sep}{name}{sep}{year}", f"{year}{sep}{name}{sep}{dd}"})
                if sep:  # feb191946 would also read as the 1st of February, 91946
                    forms.add(f"{name}{sep}{dd}{sep}{year}")
    return tuple(sorted(forms))


_NAMED_MONTH_SEPARATORS = (" ", "-", ".", "/", "")


def reason_birth_date_forms(iso_date: str) -> tuple[str, ...]:
    """The birth date with a two-digit year, month or day first, with slashes, dashes or dots,
    with and without leading zeros (3/7/46, 07/03/46, 07.03.46): refused in a reason (the
    short text an operator types, kept in the audit log for good), where a false refusal costs
    a rewording. Not a leak-scan canary: six to eight characters without the four-digit year are
    no longer specific to the date (a score or a ratio written 3/7/46, the same day of another
    century), released rows are full of such runs, and a patient's rows are searched for their
    birth date only in strings that hold its four-digit year."""
    parts = _birth_parts(iso_date)
    if parts is None:
        return ()
    year, month, day = parts
    yy = f"{year % 100:02d}"
    forms: set[str] = set()
    for sep in "/-.":
        for first, second in ((month, day), (day, month)):
            forms.update(
                {f"{first:02d}{sep}{second:02d}{sep}{yy}", f"{first}{sep}{second}{sep}{yy}"}
            )
    return tuple(sorted(forms))


def _name_parts(name: Any) -> list[str]:
    """Every word of a HumanName (given, family, text) or of a plain name string."""
    texts: list[str] = []
    if isinstance(name, str):
        texts.append(name)
    elif isinstance(name, dict):
        texts.extend(g for g in repeated(name.get("given")) if isinstance(g, str))
        texts.extend(t for t in (name.get("family"), name.get("text")) if isinstance(t, str))
    return [w for text in texts for w in _WORD.findall(text)]


def _phone_forms(digits: str) -> tuple[str, ...]:
    """The digits of a phone and, read as a North American number, its ten-digit national
    number alone and after the country code (``1``, ``001``)."""
    national = digits
    if len(digits) == 11 and digits.startswith("1"):
        national = digits[1:]
    elif len(digits) == 13 and digits.startswith("001"):
        national = digits[3:]
    if len(national) != 10:
        return (digits,)
    return tuple(dict.fromkeys((digits, national, f"1{national}", f"001{national}")))


def _hex_word_end(text: str, backwards: str, start: int, end: int) -> int | None:
    """Where the word (letters and digits) holding the digit run ``text[start:end]`` ends, when
    all the letters and digits the run is glued to are hex digits; None when one is not.
    ``backwards`` is ``text`` reversed."""
    after, before = _hex_stop(text, end), _hex_stop(backwards, len(text) - start)
    if (after < len(text) and text[after].isalnum()) or (
        before < len(text) and backwards[before].isalnum()
    ):
        return None
    return after


def _hex_stop(text: str, at: int) -> int:
    """Where the hex digits of ``text`` from ``at`` on stop."""
    match = _HEX_PREFIX.match(text, at)
    return match.end() if match else at


def _digit_groups(run: str) -> tuple[str, set[int]]:
    """The digits of a run and the offsets (in those digits) where a group starts or ends."""
    groups = [g for g in _SEPARATOR.split(run) if g]
    bounds, at = {0}, 0
    for group in groups:
        at += len(group)
        bounds.add(at)
    return "".join(groups), bounds


def as_compared(text: str) -> str:
    """``text`` as the canaries are compared with it: in Unicode's compatibility form (NFKC)
    when it is not ASCII, so an identifier or a name written in full-width or other
    compatibility characters (an SSN in full-width digits, U+FF10 to U+FF19) is found as the
    same characters in ASCII would be. ASCII text is its own form (and the usual case)."""
    return text if text.isascii() else unicodedata.normalize("NFKC", text)


def ascii_forms(folded: str, kind: str) -> tuple[str, ...]:
    """The forms a case-folded text canary takes in text written in ASCII only, as a local
    code or an identifier is: transliterated when it has letters outside ASCII (``brontëwald``
    as ``brontewald``, ``øyangrud`` as ``oyangrud``, ``иван`` as ``ivan``: anyascii; and by the
    other conventions of :data:`_OTHER_CONVENTIONS`, ``müller`` also as ``mueller``), and, for
    a name, an address line or an email, with only its letters and digits (``o'quarrigan`` as
    ``oquarrigan``, a full name as one word: ``renée brontëwald`` as ``reneebrontewald``,
    ``9 quimby row`` as ``9quimbyrow``). Empty for a canary that is its own form (an ASCII
    name of letters alone, any other ASCII canary)."""
    if folded.isascii() and (kind not in _GLUED_KINDS or folded.isalnum()):
        return ()  # the usual canary: no form but itself
    written = [folded] if folded.isascii() else _transliterations(folded)
    forms = list(written)
    if kind in _GLUED_KINDS:
        forms += [_NOT_CODE_CHARACTERS.sub("", form) for form in written]
        if not folded.isascii():  # and glued as written (a URL's segment: RenéeBrontëwald)
            forms.append(_SEPARATORS.sub("", folded))
    return tuple(f for f in dict.fromkeys(forms) if f != folded and len(f) >= MIN_TEXT)


# Other ways than anyascii's of writing letters outside ASCII, each in common use for names:
# German and Nordic letters as two (Müller as mueller, Grønlund as groenlund, Åshild as aashild,
# where anyascii writes muller, gronlund, ashild), and Cyrillic as ICAO Doc 9303 writes it in
# machine-readable passports (Петровский as petrovskii, Юлия as iuliia, Хрущёв as khrushchev;
# anyascii writes petrovskiy, yuliya). Applied to a case-folded canary; anyascii then writes
# whatever is left.
_CYRILLIC = "абвгдеёжзийклмнопрстуфхцчшщъыэюяіїєґ"
_ICAO_9303 = "a b v g d e e zh z i i k l m n o p r s t u f kh ts ch sh shch ie y e iu ia i i ie g"
_OTHER_CONVENTIONS: tuple[dict[int, str], ...] = (
    str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ø": "oe", "å": "aa", "æ": "ae"}),
    # ь (the soft sign) is not written
    str.maketrans(dict(zip(_CYRILLIC, _ICAO_9303.split(), strict=True)) | {"ь": ""}),
)


def _transliterations(folded: str) -> list[str]:
    """A case-folded canary with letters outside ASCII written in ASCII: by anyascii, and by
    each other convention that writes it otherwise (:data:`_OTHER_CONVENTIONS`)."""
    forms = []
    for table in (None, *_OTHER_CONVENTIONS):
        converted = folded if table is None else folded.translate(table)
        if table is None or converted != folded:
            forms.append(" ".join(anyascii(converted).casefold().split()))
    return list(dict.fromkeys(forms))


def _key_forms(folded: str) -> set[str]:
    """A case-folded canary as a batch key made safe shows it, separators as spaces: every
    letter outside ASCII a separator too (``müller`` is ``m ller``), whether the folder's name
    was written composed or decomposed (macOS: ``u`` and a combining diaeresis, ``mu ller``),
    and an ``ß`` that case folding wrote ``ss`` (``straße``, folded ``strasse``, is
    ``stra e``). Empty for ASCII text without ``ss``, which the other forms cover."""
    if folded.isascii() and "ss" not in folded:
        return set()
    forms = set()
    for text in {folded, folded.replace("ss", "ß")}:
        for normal in ("NFC", "NFD"):
            forms.add(" ".join(_NOT_KEY_CHARACTERS.split(unicodedata.normalize(normal, text))))
    return {form.strip() for form in forms}


# Where a text canary's kind is kept in its automaton's value (see ``_TextStore``): the kind
# it has as written, with punctuation as spaces (``_WORDS``: several words only), and in the
# spaced set (``CanarySet.spaced``: as written and as a batch key shows it, and of those the
# ones of several words); the canary's length last.
_AS_WRITTEN, _WORDS, _SPACED, _SPACED_WORDS, _LENGTH = range(5)


def _searched_as_words(spaced: str, kind: str) -> bool:
    """Whether a canary, its punctuation written as spaces (``spaced``), is also searched in
    text read the same way: one of several words, not a phone or an SSN (those are matched as
    digits however they are punctuated)."""
    return " " in spaced and kind not in ("phone", "ssn")


# The longest canary an automaton holds. pyahocorasick frees its trie recursively, a C stack
# frame per character: a word of some 500,000 characters (a name or an address line padded to
# a megabyte in one NDJSON line, valid or refused) overflowed the stack and killed the process
# when the set was freed, and with it every run that loaded the canaries.
MAX_AUTOMATON_WORD = 1024


class _TextStore:
    """The canaries of a set, held in their automatons only: no dict of the strings beside
    them. One automaton over case-folded text holds every text canary in every form a pass
    searches (as written, punctuation as spaces, as a batch key shows it), its value the kind
    of each pass that has it (None for the others) and its length; one holds the digit
    canaries. A value is a tuple shared by every canary with the same kinds and length. A
    text canary longer than ``MAX_AUTOMATON_WORD`` is kept beside them (``long_text``) and
    searched in text at least as long; a digit canary that long is searched as text only."""

    def __init__(self) -> None:
        self.text: Any = ahocorasick.Automaton()
        self.digits: Any = ahocorasick.Automaton()
        self.long_text: dict[str, tuple[Any, ...]] = {}
        self.counts = [0, 0, 0, 0]  # canaries of each pass (_AS_WRITTEN ... _SPACED_WORDS)
        self.digit_count = 0
        self.built = True  # both automatons hold what was added (none empty and not built)
        self._values: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def _value(self, value: tuple[Any, ...]) -> tuple[Any, ...]:
        return self._values.setdefault(value, value)

    def add_text(self, text: str, kind: str) -> None:
        """A text canary as written, unless it is one already (the first kind stays); the
        forms the other passes search it in, each keeping the kind it was first given."""
        if not self._set(text, _AS_WRITTEN, kind):
            return
        spaced = " ".join(_SEPARATORS.split(text)).strip()
        if _searched_as_words(spaced, kind):
            self._set(spaced, _WORDS, kind)
        for words in {spaced, *_key_forms(text)}:
            if len(words) >= MIN_TEXT and self._set(words, _SPACED, kind):
                # a spaced form is its own form with punctuation as spaces
                if _searched_as_words(words, kind):
                    self._set(words, _SPACED_WORDS, kind)

    def _set(self, text: str, slot: int, kind: str) -> bool:
        """``kind`` for ``text`` in the pass ``slot`` unless that pass has it already."""
        long = len(text) > MAX_AUTOMATON_WORD
        before = self.long_text.get(text) if long else self.text.get(text, None)
        if before is not None and before[slot] is not None:
            return False
        value = list(before) if before is not None else [None, None, None, None, len(text)]
        value[slot] = kind
        if long:
            self.long_text[text] = self._value(tuple(value))
        else:
            self.text.add_word(text, self._value(tuple(value)))
        self.counts[slot] += 1
        self.built = False
        return True

    def add_digits(self, digits: str, kind: str) -> None:
        if len(digits) <= MAX_AUTOMATON_WORD and digits not in self.digits:
            self.digits.add_word(digits, self._value((kind, len(digits))))
            self.digit_count += 1
            self.built = False

    def build(self) -> None:
        if not self.built:
            for automaton in (self.text, self.digits):
                if len(automaton) and automaton.kind != ahocorasick.AHOCORASICK:
                    automaton.make_automaton()
            self.built = True

    def text_matches(self, folded: str) -> Iterable[tuple[int, tuple[Any, ...]]]:
        """(index of the last character, value) of every text canary in ``folded``."""
        if len(self.text):
            yield from self.text.iter(folded)
        for text, value in self.long_text.items() if len(folded) > MAX_AUTOMATON_WORD else ():
            start = folded.find(text)
            while start >= 0:
                yield start + len(text) - 1, value
                start = folded.find(text, start + 1)


class CanarySet:
    """Canaries of a set of patients, compiled into two automatons: one over case-folded text,
    one over digit runs (phones, SSNs and identifiers match however they are punctuated).

    The automatons are the only copy of the canaries (``_TextStore``); a patient's birth dates
    are kept as their ISO dates, and their written forms made when a string holds the year."""

    def __init__(self, store: _TextStore | None = None, spaced: bool = False) -> None:
        self._store = store if store is not None else _TextStore()
        # the passes this set searches text in: as written and punctuation as spaces, or the
        # spaced set's (see ``spaced``), which shares the automatons of the set it is made from
        self._slots = (_SPACED, _SPACED_WORDS) if spaced else (_AS_WRITTEN, _WORDS)
        self._read_only = spaced
        self._births: dict[str, tuple[str, ...]] = {}  # pseudonym -> ISO birth dates
        self._forms: dict[tuple[str, ...], tuple[str, ...]] = {}  # see _birth_forms
        self._spaced: CanarySet | None = None
        self._ids: set[str] = set()  # the patients' own resource ids: see add_source_id
        # (text, terminology) -> (kinds found, decoded base64 runs case-folded)
        self._memo: dict[tuple[str, bool], tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return self._store.counts[self._slots[0]] + self._store.digit_count + len(self._births)

    def __getstate__(self) -> dict[str, Any]:
        """What a pickled set keeps (a sealed copy, :class:`deid.release.ReleaseCanaryCache`):
        its canaries, not what it found in the texts searched so far nor its spaced view."""
        state = dict(self.__dict__)
        state["_memo"], state["_spaced"] = {}, None
        return state

    def add(self, kind: str, text: str) -> None:
        """A canary of ``kind``, case-folded in its compatibility form (an SSN in full-width
        digits is these digits in ASCII, as released text is compared: :func:`as_compared`),
        with the forms it takes in ASCII text (:func:`ascii_forms`)."""
        self._writable()
        folded = " ".join(as_compared(text).casefold().split())
        if kind in _DIGIT_KINDS:
            digits = _DIGITS.sub("", folded)
            # identifiers are digit canaries only when mostly digits ("MRN-778812" stays text)
            if len(digits) >= MIN_DIGITS and (
                kind != "identifier" or len(digits) * 2 > len(folded)
            ):
                for form in _phone_forms(digits) if kind == "phone" else (digits,):
                    self._store.add_digits(form, kind)
                self._changed()
        # a form is kept by its own length (ascii_forms): a canary under MIN_TEXT characters
        # can have a longer one (a Chinese full name of three, 张小明, is zhangxiaoming)
        forms = ascii_forms(folded, kind)
        if len(folded) >= MIN_TEXT:
            self._store.add_text(folded, kind)
        for form in forms:
            self._store.add_text(form, kind)
        if len(folded) >= MIN_TEXT or forms:
            self._changed()

    def _writable(self) -> None:
        if self._read_only:
            raise TypeError("the spaced set is read only: add canaries to the set it is made from")

    def _changed(self) -> None:
        """A canary was added: the automatons are built again and nothing found is remembered
        (the spaced view, which remembers its own, is made again when next asked for)."""
        self._memo = {}
        self._spaced = None

    def add_person(self, parts: list[str]) -> None:
        """The name parts of one person: a long part alone, a short part (a name under four
        letters matches inside ordinary words and prose) only beside another part of the
        same person, in either order. The parts of a double name, or of one with an apostrophe,
        are parts of their own too."""
        self._writable()
        words = list(dict.fromkeys(p.casefold() for p in parts if len(p) >= MIN_SHORT))
        # each part of a double name, or of one with an apostrophe, is a part too: a code
        # holds PEMBERLY of Pemberly-Quasht, QUARRIGAN of O'Quarrigan
        pieces = [piece for w in words for piece in _NAME_JOINERS.split(w) if piece != w]
        words = list(dict.fromkeys([*words, *(p for p in pieces if len(p) >= MIN_SHORT)]))
        for word in words:
            # a short part outside ASCII is a name by its ASCII forms of MIN_TEXT or more
            # (小明 as xiaoming; ascii_forms keeps each form by its own length)
            if len(word) >= MIN_TEXT or not word.isascii():
                self.add("name", word)
        for short in (w for w in words if len(w) < MIN_TEXT):
            for other in (w for w in words if w != short):
                for phrase in (f"{short} {other}", f"{other} {short}", f"{other}, {short}"):
                    self._store.add_text(phrase, "full_name")
        self._changed()

    def add_name(self, name: Any) -> None:
        """A HumanName or a name string: its parts; a given name or a family name written with
        punctuation or spaces (``O'Quarrigan``, ``Mary Ann``) as a name of its own too; and
        each given + family as a full name, and all given names + family (also glued into one
        word, either way round; the first and
        last given names of a name without a family name), or, for a
        name given as text alone, its first and last words past its titles and suffixes
        (``Zephyrine`` and ``Quillfeather`` of ``Mrs. Zephyrine Quillfeather, Jr``)."""
        self.add_person(_name_parts(name))
        text = name if isinstance(name, str) else None
        pairs: list[tuple[str, str]] = []
        if isinstance(name, dict):
            given = [g for g in repeated(name.get("given")) if isinstance(g, str)]
            family = name.get("family")
            for whole in (*given, family):
                if isinstance(whole, str) and not _WORD.fullmatch(whole.strip()):
                    self.add("name", whole)
            if given and isinstance(family, str):
                # every given name with the family name, not the first only: a middle name is
                # the one some people go by, and a code writes it glued (JenniferBarajas)
                pairs.extend((first, family) for first in given)
                if len(given) > 1:  # the whole name glued too (CourtneyJenniferBarajas)
                    self.add("full_name", " ".join((*given, family)))
                    # family first as well, as a pair is (BarajasCourtneyJennifer: a record
                    # system's LAST FIRST MIDDLE glued into a code)
                    self.add("full_name", " ".join((family, *given)))
            elif len(given) >= 2 and family is None:  # the whole name given as given names
                pairs.append((given[0], given[-1]))
            text = name.get("text") if isinstance(name.get("text"), str) else None
        words = _name_words(text) if text else []
        if len(words) >= 2:
            pairs.append((words[0], words[-1]))
        for first, last in dict.fromkeys(pairs):
            # its forms hold it glued, as local code systems and URLs write it (ascii_forms:
            # CourtneyBarajas); glued the other way round too (BarajasCourtney)
            self.add("full_name", f"{first} {last}")
            if not any(c.isspace() for c in f"{last}{first}"):
                self.add("full_name", f"{last}{first}")
                # family name first and spaced, as a Chinese, Japanese or Korean name is said
                # and romanized (张小明 as zhang xiaoming), and a list writes any (Quist, Ivo)
                self.add("full_name", f"{last} {first}")

    def add_contact_points(self, resource: dict[str, Any]) -> None:
        """Telecom, address (lines, city with ZIP) and identifiers of a person or contact."""
        for telecom in repeated(resource.get("telecom")):
            value = telecom.get("value") if isinstance(telecom, dict) else None
            if isinstance(value, str):
                self.add("email" if telecom.get("system") == "email" else "phone", value)
        for addr in repeated(resource.get("address")):
            if isinstance(addr, dict):
                self._add_address(addr)
            elif isinstance(addr, str):  # a refused record's address written as its text
                self.add("address", addr)
        self.add_identifiers(resource)

    def add_identifiers(self, resource: dict[str, Any]) -> None:
        """The values of a resource's ``identifier`` list, each of its kind (an SSN or not)."""
        for ident in repeated(resource.get("identifier")):
            value = ident.get("value") if isinstance(ident, dict) else None
            if isinstance(value, str):
                self.add(_identifier_kind(ident), value)

    def _add_address(self, addr: dict[str, Any]) -> None:
        for line in repeated(addr.get("line")):
            if isinstance(line, str):
                self.add("address", line)
        if isinstance(addr.get("text"), str):
            self._add_address_text(addr["text"])
        city, state, zip_ = (addr.get(k) for k in ("city", "state", "postalCode"))
        if not (isinstance(city, str) and isinstance(zip_, str) and len(zip_) >= 5):
            return
        # a city or a ZIP alone is common text; together they place a person
        places = [f"{city} {zip_}", f"{city}, {zip_}"]
        if isinstance(state, str):
            places += [f"{city}, {state} {zip_}", f"{city} {state} {zip_}"]
        for place in places:
            self.add("city_zip", place)

    def _add_address_text(self, text: str) -> None:
        """An address written as text (``Address.text``, which a source may send without its
        lines): the whole text, and each of its parts between line breaks, commas or
        semicolons that holds a letter and a digit (a street with its number, a city with its
        ZIP), as address lines; a part without a digit (a city, a state) is common text."""
        self.add("address", text)
        for part in _ADDRESS_TEXT_PARTS.split(text):
            if _has_letter(part) and any(ch.isdigit() for ch in part):
                self.add("address", part)

    def add_birth_date(self, birth: Any, pseudonym: str | None) -> None:
        self._writable()
        if not (isinstance(birth, str) and len(birth) == 10):
            return
        if pseudonym is not None:
            # every birth date a patient's versions gave (a corrected one is still on old papers)
            self._births[pseudonym] = tuple(
                dict.fromkeys((*self._births.get(pseudonym, ()), birth))
            )
            return
        for form in birth_date_forms(birth):
            self._store.add_text(form, "birth_date")
        self._changed()

    def add_patient(self, patient: dict[str, Any], pseudonym: str | None = None) -> None:
        """Every direct identifier of a Patient resource and of its contacts, and its own id
        (:meth:`add_source_id`); with ``pseudonym``, the birth date is searched in that
        patient's rows only."""
        self.add_source_id(patient.get("id"))
        for name in repeated(patient.get("name")):
            self.add_name(name)
        self.add_contact_points(patient)
        for contact in repeated(patient.get("contact")):
            if isinstance(contact, dict):
                self.add_name(contact.get("name"))
                self.add_contact_points(contact)
        for ext in repeated(patient.get("extension")):
            if isinstance(ext, dict) and ext.get("url") == _MAIDEN_NAME:
                self.add_name(ext.get("valueString"))
        self.add_person_extensions(patient)
        # the identifier of the record this one replaced or duplicates is hers too
        others = [_object(link).get("other") for link in repeated(patient.get("link"))]
        self.add_identifiers({"identifier": [_object(o).get("identifier") for o in others]})
        self.add_birth_date(patient.get("birthDate"), pseudonym)

    def add_person_extensions(self, resource: dict[str, Any]) -> None:
        """The names, addresses, telecoms and identifiers a person's record holds in
        extensions, at any depth and on any element (:func:`_person_extension_values`): an
        alias as ``valueHumanName``, a former MRN as ``valueIdentifier``, a second phone as
        ``valueContactPoint``, a place of birth with its street as ``valueAddress``. Before,
        none was read, and a local code holding one was released."""
        held: dict[str, list[Any]] = {"telecom": [], "address": [], "identifier": []}
        for kind, value in _person_extension_values(resource):
            if kind == "name":
                self.add_name(value)
            else:
                held[kind].append(value)
        self.add_contact_points(held)

    def add_resource(self, resource: dict[str, Any], pseudonym: str | None = None) -> None:
        """The canaries of a resource about a patient or a relative (see ``_ADDERS``), and of
        each resource it holds inside it (:func:`fhirlake.nested.held_resources`: a Patient
        sent as ``Parameters``, in a Bundle inside a Bundle, contained in a RelatedPerson)."""
        for one in (resource, *held_resources(resource)):
            adder = _ADDERS.get(str(one.get("resourceType")))
            if adder is not None:
                adder(self, one, pseudonym)

    def add_source_id(self, resource_id: Any) -> None:
        """A patient's resource id in the source (``Patient/<id>``), of ``MIN_TEXT`` characters
        or more: looked for in a batch key (``source_id_in``). An id of letters and digits
        both, of six characters or more (``pt-55190377``, a UUID), is a text canary too, kind
        ``id``: it links a released row to the source's record, where released rows hold a
        pseudonym in its place. A shorter id, or one of digits or of letters alone (``1001``,
        ``example``), equals ordinary values and words, and is looked for in batch keys only."""
        if isinstance(resource_id, str) and len(resource_id) >= MIN_TEXT:
            self._ids.add(resource_id.casefold())
            if _LINKING_ID.fullmatch(resource_id):
                self.add("id", resource_id)

    def source_id_in(self, text: str) -> bool:
        """Whether ``text`` holds one of the source ids as a whole token (``Patient-p4471x9``
        holds ``p4471x9``, ``p4471x90`` does not). A FHIR id is letters, digits, ``-`` and
        ``.`` only, which a batch key keeps as written."""
        folded = text.casefold()
        return any(self._has_token(folded, resource_id) for resource_id in self._ids)

    def spaced(self) -> CanarySet:
        """The text canaries with every run of characters other than letters and digits
        written as one space (``zquix@example.org`` as ``zquix example org``, ``MRN-ZQ/99173``
        as ``mrn zq 99173``), and, for text with letters outside ASCII, as a batch key shows
        it (:func:`_key_forms`: ``müller`` as ``m ller``), beside the digit canaries: for
        text whose punctuation was rewritten, as a batch key made safe is (``@`` and ``/``
        become ``-``) and compared with its separators as spaces. Not for released rows, where
        a canary's words apart are ordinary words. It shares this set's automatons (each
        canary's value names its kind in the spaced set too) and is read only."""
        if self._read_only:
            return self  # a spaced form is its own form with punctuation as spaces
        if self._spaced is None:
            self._spaced = CanarySet(self._store, spaced=True)
        return self._spaced

    def birth_dates_only(self) -> CanarySet:
        """The same patients' own birth dates, and no other canary (for rows whose other
        text was already scanned)."""
        births = CanarySet()
        births._births = dict(self._births)
        return births

    def birth_dates_of(self, pseudonym: str | None) -> tuple[str, ...]:
        """Every written form (:func:`birth_date_forms`) of the birth dates of ``pseudonym``."""
        dates = self._births.get(pseudonym, ()) if pseudonym is not None else ()
        return self._birth_forms(dates)

    def _birth_forms(self, dates: tuple[str, ...]) -> tuple[str, ...]:
        """The written forms of ``dates`` (:func:`birth_date_forms`), remembered for the last
        ``BIRTH_FORMS_LIMIT`` patients whose rows held their year: made when needed, not kept
        for every patient (with the set, never beyond it: they are PHI)."""
        forms = self._forms.get(dates)
        if forms is None:
            if len(self._forms) >= BIRTH_FORMS_LIMIT:
                self._forms.clear()
            forms = self._forms[dates] = _forms_of_dates(dates)
        return forms

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
        self._store.build()

    def find(self, text: str, terminology: bool = False) -> list[str]:
        """Kinds of the canaries found in ``text`` as whole tokens (not inside longer words);
        in terminology text, single name parts are not counted. ``text`` is compared in its
        compatibility form (:func:`as_compared`)."""
        store, (as_written, in_words) = self._store, self._slots
        store.build()
        text = as_compared(text)
        found = self._find_digits(text) if store.digit_count else []
        if not store.counts[as_written]:
            return found
        folded = text.casefold()
        found.extend(self._whole_words(as_written, folded, terminology))
        words = " ".join(_SEPARATORS.split(folded))
        if words != folded and store.counts[in_words]:
            # a canary of several words written with punctuation for its spaces, as a code or
            # a URL's segment must be (709-Michele-Prairie, zquix42.example.org): counted once
            # for a kind the text as written did not already show
            spaced = self._whole_words(in_words, words, terminology)
            found.extend(dict.fromkeys(kind for kind in spaced if kind not in found))
        return found

    def _whole_words(self, slot: int, folded: str, terminology: bool) -> list[str]:
        """Kinds of the text canaries of the pass ``slot`` in ``folded`` as whole tokens. The
        text canaries of several words (an address line, a city with its ZIP, a full name, an
        email, an identifier with punctuation) are searched with every run of characters
        other than letters and digits written as one space too (``_WORDS``), in text read the
        same way; phones and SSNs are matched as digits however they are punctuated. A token
        is also whole with digits glued to it (:func:`_glued_to_digits`)."""
        found: list[str] = []
        for end, value in self._store.text_matches(folded):
            kind = value[slot]
            if kind is None:
                continue  # a form of another pass
            start = end - value[_LENGTH] + 1
            before = folded[start - 1] if start > 0 else " "
            after = folded[end + 1] if end + 1 < len(folded) else " "
            whole = not before.isalnum() and not after.isalnum()
            if whole or (
                (before.isdigit() or after.isdigit()) and _glued_to_digits(folded, start, end + 1)
            ):
                if not (terminology and kind == "name"):
                    found.append(kind)
        return found

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
            if len(run) < MIN_DIGITS or _DATE_RUN.fullmatch(run) or _TIME_RUN.fullmatch(run):
                continue  # dates are searched as birth dates, per patient; times are none
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
            for last, (kind, length) in self._store.digits.iter(digits):
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
        dates = self._births.get(patient, ()) if patient is not None else ()
        years = tuple(dict.fromkeys(date[:4] for date in dates))
        births: tuple[str, ...] | None = None  # their written forms, made when a year is found
        for written, terminology in _strings(value, provider):
            text = as_compared(written)
            found, decoded = self._findings(text, terminology)
            kinds.extend(found)
            for folded in (*decoded, text.casefold()) if years else ():
                if any(year in folded for year in years):  # every written form holds its year
                    births = self._birth_forms(dates) if births is None else births
                    kinds.extend(self._birth_hits(folded, births))
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


def _birth_date_in(text: str, form: str) -> bool:
    """Whether ``text`` holds the birth date written as ``form``, not inside a longer number
    (``119-feb-1946``, ``194602190``) or word (``xfeb-19-1946``). The compact form and a form
    with the month's name count glued to letters at a digit of theirs (``dob19460219``,
    ``dob19-feb-1946``), as a digit canary does, unless all the letters and digits they are
    glued to are hex digits (a pseudonym or a digest, whose digit runs are chance). A numeric
    form with separators counts glued to letters before it only (``dob1946-02-19``,
    ``dob02/19/1946``: a local code, a version, a UCUM annotation keep it so), not after it:
    ``1977-07-27T00:00:00Z`` is a date-time of that day, and nothing precedes its year."""
    may_glue_after = form.isdigit() or _has_letter(form)
    start = text.find(form)
    while start >= 0:
        end = start + len(form)
        before = text[start - 1] if start > 0 else " "
        after = text[end] if end < len(text) else " "
        if (
            _may_touch(before, form[0], True) and _may_touch(after, form[-1], may_glue_after)
        ) and not ((before.isalnum() or after.isalnum()) and _in_hex_word(text, start, end)):
            return True
        start = text.find(form, start + 1)
    return False


def _has_letter(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def _may_touch(neighbour: str, edge: str, may_glue: bool) -> bool:
    """Whether a birth date form whose first (last) character is ``edge`` stands whole next to
    ``neighbour``: anything but a letter or a digit, or a letter next to a digit of a form
    that may be glued."""
    if not neighbour.isalnum():
        return True
    return may_glue and neighbour.isalpha() and edge.isdigit()


def _glued_to_digits(folded: str, start: int, end: int) -> bool:
    """Whether the text canary at ``folded[start:end]`` stands as a word with digits glued to
    it, as a local code or a user name writes one (``barajas01``, ``2019smith``): on each side
    that touches digits, the canary's first (last) MIN_TEXT characters are letters, and past
    the digits is no letter or digit. Not inside a longer word (``xbarajas01``), nor a canary
    ending in a digit or a short word before digits (``quimby row 95`` is another address,
    ``al li2`` no name: short parts are common text), nor a word of hex digits only (a
    pseudonym or a digest holds letters and digits by chance: ``ebba1234``)."""
    left, right = start, end
    while left > 0 and folded[left - 1].isdigit():
        left -= 1
    while right < len(folded) and folded[right].isdigit():
        right += 1
    if (left > 0 and folded[left - 1].isalnum()) or (
        right < len(folded) and folded[right].isalnum()
    ):
        return False
    if (left < start and not folded[start : start + MIN_TEXT].isalpha()) or (
        right > end and not folded[max(start, end - MIN_TEXT) : end].isalpha()
    ):
        return False
    return not all(ch in _HEX_DIGITS for ch in folded[left:right])


def _in_hex_word(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` and the letters and digits glued to it are all hex digits."""
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return all(ch in _HEX_DIGITS for ch in text[start:end] if ch.isalnum())


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_MAIDEN_NAME = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
_SSN_SYSTEMS = ("http://hl7.org/fhir/sid/us-ssn",)


def _identifier_kind(ident: dict[str, Any]) -> str:
    coding = repeated(_object(ident.get("type")).get("coding"))
    is_ssn = ident.get("system") in _SSN_SYSTEMS or any(
        isinstance(c, dict) and c.get("code") == "SS" for c in coding
    )
    return "ssn" if is_ssn else "identifier"


def _add_relative(canaries: CanarySet, resource: dict[str, Any], _: str | None) -> None:
    for name in repeated(resource.get("name")):
        canaries.add_name(name)
    canaries.add_contact_points(resource)
    canaries.add_person_extensions(resource)


# An extension's value of the datatypes that name a person, by the element a person's record
# keeps them in. A valueString is any text (a race's ``text``, ``White``), so it is not read
# (but for the mother's maiden name, read by its URL).
_PERSON_VALUES = {
    "valueHumanName": "name",
    "valueAddress": "address",
    "valueContactPoint": "telecom",
    "valueIdentifier": "identifier",
}


def _person_extension_values(resource: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    """(element, value) of each extension of ``resource`` at any depth, nested extensions and
    primitive ones (``_birthDate``) included, whose value is a name, an address, a telecom or
    an identifier; not within its contained resources, which are read as resources of their
    own. Walked without recursion."""
    pending: list[Any] = [v for k, v in resource.items() if k != "contained"]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            if isinstance(node.get("url"), str):
                for key, kind in _PERSON_VALUES.items():
                    if key in node:
                        yield kind, node[key]
            pending.extend(node.values())


def _add_identifiers(canaries: CanarySet, resource: dict[str, Any], _: str | None) -> None:
    """The identifiers a record of the patient's holds: a health plan's member number
    (``Coverage.subscriberId``, a string in R4, an Identifier in R5), an account number, a
    visit or a claim number."""
    subscriber = resource.get("subscriberId")
    if isinstance(subscriber, dict):
        subscriber = subscriber.get("value")
    if isinstance(subscriber, str):
        canaries.add("identifier", subscriber)
    canaries.add_identifiers(resource)


# Which resources carry whose identifiers: the patient's own, a relative's (RelatedPerson, and
# FamilyMemberHistory.name, a relative's name in free text), or the patient's in another record
# of theirs (a Coverage's member number, an Account's number, an Encounter's visit number, a
# Claim's number).
_ADDERS: dict[str, Callable[[CanarySet, dict[str, Any], str | None], None]] = {
    "Patient": lambda c, r, p: c.add_patient(r, p),
    # a person's demographics held apart from their Patient records (a master patient index's
    # Person, linked to them): its name, telecom, address, identifiers and birth date
    "Person": lambda c, r, p: c.add_patient(r, p),
    "RelatedPerson": _add_relative,
    "FamilyMemberHistory": _add_relative,
    "Coverage": _add_identifiers,
    "Account": _add_identifiers,
    "Encounter": _add_identifiers,
    "Claim": _add_identifiers,
}
# Records that hold whole resources rather than being about anyone (an operation's Parameters,
# a Bundle sent as one resource): read for the persons they carry
CARRIER_TYPES = ("Parameters", "Bundle")
# the resources a patient's canaries are read from
CANARY_RESOURCE_TYPES = (*_ADDERS, *CARRIER_TYPES)
# Of those, the types read only where a record holds an identifier (the vault's identifier
# index lists it): tens of them a patient, most without one, where a patient has one Patient
IDENTIFIED_ONLY_TYPES = ("Encounter", "Claim")


def _forms_of_dates(dates: tuple[str, ...]) -> tuple[str, ...]:
    """The written forms of a patient's birth dates, each once, in order."""
    if len(dates) == 1:
        return birth_date_forms(dates[0])
    return tuple(dict.fromkeys(form for date in dates for form in birth_date_forms(date)))


def _base64_texts(text: str) -> Iterable[str]:
    """Decoded base64 runs of ``text`` that read as text."""
    for run in _BASE64_RUN.findall(text):
        if _HEX_RUN.fullmatch(run):
            continue  # pseudonyms and digests are hex, not base64 text
        try:
            decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        content = decoded.decode("utf-8", "replace")
        if _mostly_text(content):
            yield content


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
