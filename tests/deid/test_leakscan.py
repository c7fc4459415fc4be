from __future__ import annotations

import base64
import random
from datetime import date

import pytest

from deid.leakscan import CanarySet, ascii_forms, scan_rows

PATIENT = {
    "resourceType": "Patient",
    "name": [{"family": "Quillfeather", "given": ["Marisol", "Jo"]}],
    "identifier": [{"value": "999-12-3456"}, {"value": "MRN778812"}],
    "address": [{"line": ["42 Wallaby Way"]}],
    "telecom": [
        {"system": "phone", "value": "(555) 013-4477"},
        {"system": "email", "value": "marisol.q@example.org"},
    ],
    "birthDate": "1948-02-29",
}


def canaries() -> CanarySet:
    c = CanarySet()
    c.add_patient(PATIENT)
    return c


def test_clean_release_passes() -> None:
    rows = [("p1", {"resourceType": "Patient", "id": "ab12", "birthDate": "1948"})]
    result = scan_rows(canaries(), rows)
    assert result.passed and result.scanned_rows == 1 and result.canaries > 5


def test_planted_leaks_are_found_case_folded_and_in_base64() -> None:
    note = base64.b64encode(b"Seen today: MARISOL QUILLFEATHER, dob 1948-02-29").decode()
    rows = [
        ("r1", {"note": [{"text": "pt quillfeather called"}]}),
        ("r2", {"attachment": {"data": note}}),
        ("r3", {"telecom": "5550134477"}),
        ("r4", {"identifier": "MRN778812"}),
        ("r5", {"text": "short name Jo and marisolxyz do not count"}),
    ]
    result = scan_rows(canaries(), rows)
    assert not result.passed
    assert {h.row for h in result.hits} == {"r1", "r2", "r3", "r4"}
    assert result.by_kind()["name"] >= 2
    assert "birth_date" in result.by_kind()
    # results name rows and kinds, never the text that matched
    assert all("quill" not in repr(h).lower() for h in result.hits)


def test_surnames_that_are_category_names_do_not_trip_terminology() -> None:
    c = CanarySet()
    c.add_patient({"name": [{"family": "Black", "given": ["Anna"]}], "identifier": []})
    race = {
        "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "extension": [
            {
                "url": "ombCategory",
                "valueCoding": {
                    "system": "urn:oid:2.16.840.1.113883.6.238",
                    "code": "2054-5",
                    "display": "Black or African American",
                },
            },
            {"url": "text", "valueString": "Black or African American"},
        ],
    }
    assert scan_rows(c, [("p", {"extension": [race]})]).passed
    assert not scan_rows(c, [("p", {"note": "seen: Black"})]).passed
    assert not scan_rows(c, [("p", {"display": "Anna Black"})]).passed  # full name anywhere


def test_birth_date_counts_only_in_its_patients_rows() -> None:
    c = CanarySet()
    c.add_patient({"birthDate": "1977-07-27"}, "p1")
    shifted_visit = {"resourceType": "Patient", "birthDate": "1977-07-27"}
    assert scan_rows(c, [("r", shifted_visit, "p2")]).passed  # somebody else's shifted date
    assert not scan_rows(c, [("r", shifted_visit, "p1")]).passed
    assert scan_rows(c, [("r", {"effectiveDateTime": "1977-07-27T00:00:00Z"}, "p1")]).passed
    unscoped = CanarySet()
    unscoped.add_patient({"birthDate": "1977-07-27"})
    assert not scan_rows(unscoped, [("r", shifted_visit, "p2")]).passed


def test_hex_pseudonyms_and_random_bytes_are_not_base64_text() -> None:
    c = CanarySet()
    c.add_patient({"name": [{"family": "Soto", "given": ["Tony"]}]}, "p1")
    # real pseudonyms from a release whose base64 decoding holds "soto" and "tony" by chance
    for pseudonym in ("c290b5b7c69bcaca7ec9d1568f436780", "c86a6ebc0c75c580a7d0b25556d74998"):
        assert scan_rows(c, [("r", {"reference": f"Patient/{pseudonym}"}, "p1")]).passed
    note = base64.b64encode(b"Seen today: Tony Soto, follow up.").decode()
    assert not scan_rows(c, [("r", {"data": note}, "p1")]).passed


def test_phones_and_ssns_match_however_punctuated() -> None:
    c = CanarySet()
    c.add_patient(
        {
            "telecom": [{"system": "phone", "value": "(555) 867-5309"}],
            "identifier": [
                {"type": {"coding": [{"code": "SS"}]}, "value": "999-12-3456"},
                {"value": "10234567"},
            ],
        }
    )
    for text in (
        "call 555.867.5309",
        "5558675309",
        "+1 (555) 867-5309",
        "tel 555 867 5309 or later",
        "ssn 999123456",
        "ssn 999 12 3456",
        "mrn: 10-234-567",
    ):
        assert not scan_rows(c, [("r", {"text": text})]).passed, text
    for text in (
        "15558675309123",  # inside a longer number
        "value 5558675.3",  # not a whole group
        "Patient/ab5558675309cd",  # inside a hex pseudonym
        "1023-45-67",  # a date-shaped run is not an identifier
        "9991234567",
    ):
        assert scan_rows(c, [("r", {"text": text})]).passed, text
    assert scan_rows(c, [("r", {"text": "ssn 999123456"})]).by_kind() == {"ssn": 1}


def test_birth_dates_in_us_formats_count_in_their_own_patients_rows() -> None:
    c = CanarySet()
    c.add_patient({"birthDate": "1931-02-03"}, "p1")
    for text in (
        "dob 02/03/1931",
        "born 2/3/1931.",
        "02-03-1931",
        "Feb 3 1931",
        "February 3, 1931",
    ):
        assert not scan_rows(c, [("r", {"text": text}, "p1")]).passed, text
        assert scan_rows(c, [("r", {"text": text}, "p2")]).passed, text
    note = base64.b64encode(b"Patient born 2/3/1931, seen today.").decode()
    assert not scan_rows(c, [("r", {"data": note}, "p1")]).passed


def test_day_first_and_dotted_birth_dates_count_in_their_own_patients_rows() -> None:
    """Written here by strftime: day first with slashes, dashes or dots, with and without
    leading zeros, and year first with dots. Found in the patient's rows and inside base64,
    not in another patient's, not inside a longer number; a two-digit year is not searched in
    released rows (short runs such as 7/3/46 are ordinary text there)."""
    born = date(1946, 3, 7)  # day and month both under 13: 07/03/1946 is day first
    c = CanarySet()
    c.add_patient({"birthDate": born.isoformat()}, "p1")
    forms = [born.strftime(f"%d{sep}%m{sep}%Y") for sep in "/-."]
    forms += [f"{born.day}{sep}{born.month}{sep}{born:%Y}" for sep in "/-."]
    forms += [born.strftime("%Y.%m.%d")]
    for form in forms:
        row = {"text": f"dob {form}, seen today"}
        assert scan_rows(c, [("r", row, "p1")]).by_kind() == {"birth_date": 1}, form
        assert scan_rows(c, [("r", row, "p2")]).passed, form
        assert scan_rows(c, [("r", {"text": f"lot 1{form}9"}, "p1")]).passed, form
    note = base64.b64encode(f"Patient born {born:%d.%m.%Y}, seen today.".encode()).decode()
    assert not scan_rows(c, [("r", {"data": note}, "p1")]).passed
    for text in (f"ratio {born:%d/%m/%y}", f"{born.month}/{born.day}/{born:%y}"):
        assert scan_rows(c, [("r", {"text": text}, "p1")]).passed, text
    # the same day and month of another year is not the birth date
    assert scan_rows(c, [("r", {"text": "07/03/1947 and 07.03.1945"}, "p1")]).passed
    assert scan_rows(c, [("r", {"text": "12/3/1931 and 2/3/19312"}, "p1")]).passed


def test_city_with_zip_address_and_email() -> None:
    c = CanarySet()
    c.add_patient(
        {
            "address": [
                {
                    "line": ["7 Elm Court"],
                    "city": "Springfield",
                    "state": "MA",
                    "postalCode": "01103",
                }
            ],
            "telecom": [{"system": "email", "value": "a.b@example.org"}],
        }
    )
    assert not scan_rows(c, [("r", {"text": "lives in Springfield, MA 01103"})]).passed
    assert not scan_rows(c, [("r", {"text": "springfield 01103"})]).passed
    assert not scan_rows(c, [("r", {"text": "7 ELM COURT"})]).passed
    assert not scan_rows(c, [("r", {"text": "mail A.B@example.org"})]).passed
    # a city alone, a ZIP alone: common text, not this patient
    assert scan_rows(c, [("r", {"text": "Springfield Clinic, ZIP 01103"})]).passed


def test_contacts_relatives_and_short_names() -> None:
    c = CanarySet()
    c.add_patient(
        {
            "name": [{"family": "Li", "given": ["Al"]}, {"family": "Quan", "given": ["Al"]}],
            "contact": [{"name": {"family": "Okonkwo", "given": ["Ngozi"]}}],
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                    "valueString": "Ruth Bellweather",
                }
            ],
        },
        "p1",
    )
    c.add_resource({"resourceType": "RelatedPerson", "name": [{"text": "Herminia Vasquez"}]})
    c.add_resource({"resourceType": "FamilyMemberHistory", "name": "Uncle Bartholomew"})
    for text in ("spoke to Ngozi", "mother Bellweather", "Herminia called", "bartholomew"):
        assert not scan_rows(c, [("r", {"text": text})]).passed, text
    # short names count next to another part of the same person, in either order
    for text in ("Al Li", "seen: li, al", "AL QUAN", "quan al"):
        assert scan_rows(c, [("r", {"text": text})]).by_kind().get("full_name") == 1, text
    for text in ("Al said", "Li is a unit", "ALT 40 IU/L", "al li2"):
        assert scan_rows(c, [("r", {"text": text})]).passed, text
    assert scan_rows(c, [("r", {"resourceType": "FamilyMemberHistory"}, "p1")]).passed


def _memo_patients() -> CanarySet:
    c = CanarySet()
    c.add_patient(PATIENT, "p1")
    c.add_patient(
        {"name": [{"family": "Okonkwo", "given": ["Ada"]}], "birthDate": "1957-03-04"}, "p2"
    )
    return c


def test_remembered_strings_keep_birth_dates_to_their_own_patient() -> None:
    """A string's findings are remembered across rows; a birth date in it still counts only in
    its own patient's rows, in either order."""
    note = base64.b64encode(b"Follow-up, born March 4, 1957, stable.").decode()
    c = _memo_patients()
    rows = [("a", {"data": note}, "p1"), ("b", {"data": note}, "p2"), ("c", {"data": note}, "p1")]
    assert [h.row for h in scan_rows(c, rows).hits] == ["b"]
    assert [h.row for h in scan_rows(c, list(reversed(rows))).hits] == ["b"]


def test_a_canary_added_after_a_scan_is_found_in_a_remembered_string() -> None:
    c = _memo_patients()
    row = [("r", {"note": "called Zebedee Farquharson back"}, "p1")]
    assert scan_rows(c, row).passed  # remembered as clean
    c.add_patient({"name": [{"family": "Farquharson", "given": ["Zebedee"]}]}, "p3")
    assert not scan_rows(c, row).passed


def test_a_shared_canary_set_finds_what_a_fresh_one_finds_row_by_row() -> None:
    """The oracle: each row scanned by a canary set of its own (nothing remembered)."""
    rng = random.Random(5)
    born = base64.b64encode(b"dob 1948-02-29, seen by Dr Who").decode()
    strings = [
        "final", "http://loinc.org", "Marisol Quillfeather", "(555) 013-4477", "MRN778812",
        "1957-03-04", "March 4, 1957", "1948-02-29", born, "Ada Okonkwo", "ok", "4 mar 1957",
    ]  # fmt: skip
    rows = [
        (f"r{i}", {"text": rng.sample(strings, 3), "code": rng.choice(strings)}, pid)
        for i, pid in enumerate(rng.choice(["p1", "p2", "px", None]) for _ in range(300))
    ]
    shared = _memo_patients()
    found = [sorted(shared.scan_value(value, patient)) for _, value, patient in rows]
    oracle = [sorted(_memo_patients().scan_value(value, patient)) for _, value, patient in rows]
    assert found == oracle
    assert any("birth_date" in kinds for kinds in found)
    assert any(kinds and "birth_date" not in kinds for kinds in found)


# the identifiers of one patient: MRN, SSN, phone, and an identifier too short to be digits
GLUED = {
    "identifier": [
        {"value": "55190377"},
        {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "624-18-3307"},
        {"value": "4471902"},
        {"value": "778812"},
    ],
    "telecom": [{"system": "phone", "value": "(508) 555-0163"}],
}


def _glued_canaries() -> CanarySet:
    c = CanarySet()
    c.add_patient(GLUED, "p1")
    return c


def test_digit_identifiers_glued_to_letters_are_found() -> None:
    c = _glued_canaries()
    for text, kinds in (
        ("MRN55190377", {"identifier": 1}),
        ("SSN624183307", {"ssn": 1}),
        ("ID:55190377x", {"identifier": 1}),
        ("mrn55190377/v2", {"identifier": 1}),
        ("LAB4471902", {"identifier": 1}),  # seven digits: the shortest digit canary
        ("tel+15085550163", {"phone": 1}),
        ("ssn624-18-3307x", {"ssn": 1}),
        ("ab1111111cd2222222 55190377x", {"identifier": 1}),  # after a hex word, glued to x
    ):
        assert scan_rows(c, [("r", {"code": text})]).by_kind() == kinds, text


def test_glued_identifiers_in_the_elements_a_release_keeps_are_found() -> None:
    """The shapes a release carries: a Patient's state, a Coding's code and version."""
    c = _glued_canaries()
    observation = {
        "resourceType": "Observation",
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "8302-2"},
                {
                    "system": "http://hospital.example.org/local",
                    "version": "SSN624183307",
                    "code": "MRN55190377",
                },
            ]
        },
        "category": [
            {"coding": [{"system": "http://hospital.example.org/cat", "code": "tel+15085550163"}]}
        ],
    }
    encounter = {
        "resourceType": "Encounter",
        "type": [{"coding": [{"system": "urn:oid:2.16.840.1.113883.4.1", "code": "SSN624183307"}]}],
    }
    patient = {"resourceType": "Patient", "address": [{"state": "MRN55190377", "country": "US"}]}
    rows = [("o", observation, "p1"), ("e", encounter, "p1"), ("p", patient, "p1")]
    result = scan_rows(c, rows)
    assert sorted((h.row, h.kind) for h in result.hits) == [
        ("e", "ssn"),
        ("o", "identifier"),
        ("o", "phone"),
        ("o", "ssn"),
        ("p", "identifier"),
    ]


def test_a_phone_is_found_with_and_without_its_country_code() -> None:
    national = _glued_canaries()  # the phone stored as (508) 555-0163
    international = CanarySet()
    international.add_patient({"telecom": [{"system": "phone", "value": "+1 508 555 0163"}]})
    for c in (national, international):
        for text in (
            "+15085550163",
            "0015085550163",
            "1-508-555-0163",
            "tel+15085550163",
            "call 508.555.0163",
            "5085550163",
        ):
            assert scan_rows(c, [("r", {"code": text})]).by_kind() == {"phone": 1}, text
    assert scan_rows(international, [("r", {"code": "(508) 555-0163"})]).by_kind() == {"phone": 1}


def test_glued_digits_stay_whole_groups_and_short_identifiers_stay_words() -> None:
    c = _glued_canaries()
    for text in (
        "123455190377999",  # the MRN inside a longer number
        "MRN123455190377999",
        "MRN5519037799",
        "SSN6241833070",
        "code 9624183307",
        "215085550163",  # a phone after a digit that is no country code
        "+15085550163999",
        "9915085550163",
        "LAB44719021",
        "Patient/ab55190377cd",  # inside hex pseudonyms and digests
        "c29a55190377b5b7c69bcaca7ec9d1f0",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca55190377",
        "ab1111111cd55190377ef 9",
        "MRN778812",  # an identifier under seven digits is a word, never part of one
        "x778812y",
        "abc778812",
        "lab7788120",
    ):
        assert scan_rows(c, [("r", {"code": text})]).passed, text
    for text in ("778812", "mrn: 778812"):
        assert scan_rows(c, [("r", {"code": text})]).by_kind() == {"identifier": 1}, text


def test_identifiers_typed_as_numbers_are_found() -> None:
    """A number carries an identifier as well as a string: an SSN, an MRN or a phone typed into
    a lab value (as JSON integers or as floats), the birth date written 19460219 in the
    patient's own rows. Fractions, short numbers and booleans are no identifier."""
    c = _glued_canaries()
    c.add_birth_date("1946-02-19", "p1")
    for value, kinds in (
        (624183307, {"ssn"}),
        (624183307.0, {"ssn"}),
        (55190377, {"identifier"}),
        (5085550163, {"phone"}),
        (15085550163, {"phone"}),  # with its country code
        (19460219, {"birth_date"}),
        (624183307.5, set()),
        (6241833, set()),  # seven digits that are none of them
        (551903, set()),
        (True, set()),
        (float("inf"), set()),
        (float("nan"), set()),
    ):
        row = ("r", {"valueQuantity": {"value": value, "unit": "%"}}, "p1")
        assert set(scan_rows(c, [row]).by_kind()) == kinds, value
    # a birth date is searched in its own patient's rows only
    assert not scan_rows(c, [("r", {"value": 19460219}, "p2")]).hits
    assert set(scan_rows(c, [("r", {"value": "19460219"}, "p1")]).by_kind()) == {"birth_date"}


def test_a_name_glued_to_digits_is_found_as_a_code_or_a_user_name_writes_it() -> None:
    """A local code or a user name glues digits to a name (``BARAJAS01``, ``2019Courtney``;
    ``cbarajas7`` is not one: its letters are another word). Only digits may be glued, to a
    canary whose four characters on that side are letters, and past them the word must end; a
    word of hex digits only is a pseudonym or a digest whose letters are chance
    (``ebba1234``, ``1234ebba``)."""
    c = CanarySet()
    c.add_name({"given": ["Courtney"], "family": "Barajas"})
    c.add_name({"given": ["Ebba"], "family": "Quimbleton"})
    c.add_contact_points({"address": [{"line": ["9 Quimby Crescent"], "city": "Zanderford"}]})
    for text, found in (
        ("BARAJAS01", True),
        ("barajas-01", True),  # found before as well: the dash stands between them
        ("2019Courtney", True),
        ("01Barajas99", True),
        ("PT/BARAJAS01/2", True),
        ("QUIMBLETON7 and more", True),
        ("Zanderford2024", False),  # a city alone is no canary
        ("cbarajas7", False),  # glued to letters: another word
        ("BARAJAS01X", False),  # past the digits, letters: another word
        ("X01BARAJAS", False),
        ("ebba1234", False),  # hex digits only: a pseudonym's or a digest's run
        ("1234ebba", False),
        ("ebba1234g", False),
        ("9 QUIMBY CRESCENT7", True),  # a line of several words, digits glued to its end
        ("89 quimby crescent", False),  # another house number: digits glued at a digit
        ("flat 2, 9 quimby crescent", True),
    ):
        assert bool(scan_rows(c, [("r", {"code": text})]).hits) == found, text
    # a line ending in a digit, glued to more digits, is a longer number; one ending in a short
    # word is glued to digits as common text is ("row7")
    d = CanarySet()
    d.add_contact_points({"address": [{"line": ["Quimby Row 9", "12 Quimby Row"]}]})
    for text, found in (
        ("quimby row 9", True),
        ("quimby row 95", False),
        ("12 quimby row", True),
        ("12 quimby row7", False),
    ):
        assert bool(scan_rows(d, [("r", {"code": text})]).hits) == found, text
    # single name parts stay unsearched in terminology text, glued or not
    assert not c.find("BARAJAS01", terminology=True)
    assert c.find("BARAJAS01") == ["name"]


def test_a_full_name_written_as_one_word_is_found() -> None:
    """Local code systems and URLs glue a name into one token: ``CourtneyBarajas`` as a code,
    ``.../pt/CourtneyBarajas`` as a system, ``BarajasCourtney`` as a version. Whole tokens
    only: the glued name inside a longer word is not counted."""
    c = CanarySet()
    c.add_name({"given": ["Courtney"], "family": "Barajas"})
    for text, found in (
        ("CourtneyBarajas", True),
        ("http://hospital.example.org/pt/CourtneyBarajas", True),
        ("BarajasCourtney", True),
        ("courtneybarajas", True),
        ("XCourtneyBarajasY", False),
        ("CourtneyBarajasville", False),
    ):
        assert bool(scan_rows(c, [("r", {"code": text})]).hits) == found, text
    assert scan_rows(c, [("r", {"code": "CourtneyBarajas"})]).by_kind() == {"full_name": 1}


def test_a_full_name_with_a_middle_name_written_as_one_word_is_found() -> None:
    """A name of two given names glued as a code writes it: with the middle name, the one
    some people go by (``JenniferBarajas``), or with every given name
    (``CourtneyJenniferBarajas``, or family first, ``BarajasCourtneyJennifer``). Only the
    first given name was glued with the family name, and each of these was released as a local
    code (the family-first whole name after that too). Whole tokens only."""
    c = CanarySet()
    c.add_name({"given": ["Courtney", "Jennifer"], "family": "Barajas"})
    for text, found in (
        ("JenniferBarajas", True),
        ("BarajasJennifer", True),
        ("CourtneyJenniferBarajas", True),
        ("BarajasCourtneyJennifer", True),
        ("courtney-jennifer-barajas", True),
        ("http://hospital.example.org/pt/JenniferBarajas", True),
        ("XJenniferBarajasY", False),
        ("CourtneyJenniferBarajasville", False),
    ):
        assert bool(scan_rows(c, [("r", {"code": text})]).hits) == found, text
    for text in ("JenniferBarajas", "CourtneyJenniferBarajas", "BarajasCourtneyJennifer"):
        assert scan_rows(c, [("r", {"code": text})]).by_kind() == {"full_name": 1}, text


def _full_width(text: str) -> str:
    """``text`` with its ASCII digits and letters in their full-width forms (U+FF10...)."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in text)


def test_identifiers_and_names_in_full_width_characters_are_found() -> None:
    """A value written in compatibility characters names the patient as its ASCII form does:
    an SSN in full-width digits, a name in full-width letters, in a row and in a value."""
    c = canaries()
    ssn, name = _full_width("999123456"), _full_width("Marisol Quillfeather")
    assert ssn != "999123456" and not ssn.isascii()
    assert c.find(ssn) == ["identifier"] and "name" in c.find(name)
    rows = [("p1", {"resourceType": "Observation", "code": {"coding": [{"code": ssn}]}})]
    assert not scan_rows(c, rows).passed


def _local_coding_row(code: str, patient: str = "p1") -> tuple[str, dict[str, object], str]:
    """A released Observation whose only coding is a local one: the code, the version and the
    system's last segment are kept as written (a token of letters, digits and ``._:/+<>=-``)."""
    coding = {"system": "http://hospital.example.org/lab", "version": code, "code": code}
    return ("r", {"resourceType": "Observation", "code": {"coding": [coding]}}, patient)


def test_a_birth_date_with_its_month_abbreviated_between_dashes_or_glued_is_found() -> None:
    """Oracle writes a date 19-FEB-1946 (DD-MON-YYYY), SAS 19FEB1946 (DATE9.), and exports
    glue the compact form to a label (DOB19460219): each is a code token the release keeps,
    and each was released as the patient's birth date. Found in the patient's rows only, not
    glued to other digits, and not inside a hex word (a pseudonym or a digest)."""
    c = CanarySet()
    c.add_patient({"birthDate": "1946-02-19"}, "p1")
    for code in (
        "19-FEB-1946",
        "19FEB1946",
        "19.Feb.1946",
        "19/feb/1946",
        "19-February-1946",
        "Feb-19-1946",
        "1946-FEB-19",
        "1946FEB19",
        "DOB19460219",
        "dob19-feb-1946",
        "19460219x",
    ):
        assert scan_rows(c, [_local_coding_row(code)]).by_kind() == {"birth_date": 2}, code
        assert scan_rows(c, [_local_coding_row(code, "p2")]).passed, code
    for code in ("119-FEB-1946", "19FEB19461", "ab19460219cd", "x19-feb-19467", "19FEB1947"):
        assert scan_rows(c, [_local_coding_row(code)]).passed, code
    # a form starting or ending with a letter is not found inside a longer word
    assert scan_rows(c, [_local_coding_row("XFeb-19-1946")]).passed


def test_a_birth_date_compact_month_or_day_first_is_found() -> None:
    """US forms and exports write a birth date compact month first (MMDDYYYY: 02191946, a
    local code DOB02191946), others day first (19021946), and a number drops the leading
    zero (2191946): each was released as the patient's birth date in a local code or a lab
    value. Found in the patient's rows only, not inside a longer number, and not another
    date of the same year."""
    c = CanarySet()
    c.add_patient({"birthDate": "1946-02-19"}, "p1")
    for code in ("02191946", "DOB02191946", "19021946", "dob-19021946"):
        assert scan_rows(c, [_local_coding_row(code)]).by_kind() == {"birth_date": 2}, code
        assert scan_rows(c, [_local_coding_row(code, "p2")]).passed, code
    for code in ("021919461", "102191946", "02201946", "ab02191946cd"):
        assert scan_rows(c, [_local_coding_row(code)]).passed, code
    row = ("r", {"valueQuantity": {"value": 2191946, "unit": "%"}}, "p1")
    assert scan_rows(c, [row]).by_kind() == {"birth_date": 1}
    assert scan_rows(c, [("r", {"valueQuantity": {"value": 2191946}}, "p2")]).passed


def test_an_address_and_an_email_written_with_punctuation_for_spaces_are_found() -> None:
    """A code, a version or a system URL's last segment cannot hold a space, so a local code
    system writes an address line 709-Michele-Prairie, a city with its ZIP
    New-Donaldton-MA-01984, an email zquix42.example.org: each was released as written."""
    c = CanarySet()
    c.add_patient(
        {
            "address": [
                {
                    "line": ["709 Michele Prairie"],
                    "city": "New Donaldton",
                    "state": "MA",
                    "postalCode": "01984",
                }
            ],
            "telecom": [{"system": "email", "value": "zquix42@example.org"}],
        }
    )
    for code, kind in (
        ("709-Michele-Prairie", "address"),
        ("709.michele.prairie", "address"),
        ("709_Michele_Prairie", "address"),
        ("New-Donaldton-MA-01984", "city_zip"),
        ("zquix42.example.org", "email"),
    ):
        assert scan_rows(c, [_local_coding_row(code)]).by_kind() == {kind: 2}, code
    # whole words only: the same words inside longer ones are not the address
    for code in ("1709-Michele-Prairies", "X709-Michele-Prairie", "Michele-Prairie"):
        assert scan_rows(c, [_local_coding_row(code)]).passed, code


# A patient's name as a code writes it (ASCII letters and digits only): every form written
# out by hand here, with the kind it must be found as, and near misses that must not be.
_NAMES_IN_CODES = [
    # an apostrophe a code cannot hold, and the part after it alone
    ({"given": ["Siobhan"], "family": "O'Quarrigan"}, "OQUARRIGAN", "name"),
    ({"given": ["Siobhan"], "family": "O'Quarrigan"}, "QUARRIGAN", "name"),
    ({"given": ["Siobhan"], "family": "O\u2019Quarrigan"}, "OQUARRIGAN", "name"),
    ({"given": ["Siobhan"], "family": "O'Quarrigan"}, "SiobhanOQuarrigan", "full_name"),
    # accents a code cannot hold, and letters with no accent to drop (ø, æ)
    ({"given": ["Renée"], "family": "Brontëwald"}, "BRONTEWALD", "name"),
    ({"given": ["Renée"], "family": "Brontëwald"}, "RENEEBRONTEWALD", "full_name"),
    ({"given": ["Renée"], "family": "Brontëwald"}, "RenéeBrontëwald", "full_name"),
    ({"given": ["Søren"], "family": "Øyangrud"}, "OYANGRUD", "name"),
    ({"given": ["Ærwen"], "family": "Dalby"}, "AERWENDALBY", "full_name"),
    # another script, in anyascii's romanization and in ICAO Doc 9303's (passports)
    ({"given": ["Иван"], "family": "Петровский"}, "PETROVSKIY", "name"),
    ({"given": ["Иван"], "family": "Петровский"}, "PETROVSKII", "name"),
    ({"given": ["Юлия"], "family": "Хрущёва"}, "IULIIA", "name"),
    ({"given": ["Юлия"], "family": "Хрущёва"}, "KHRUSHCHEVA", "name"),
    ({"given": ["Юлия"], "family": "Хрущёва"}, "IuliiaKhrushcheva", "full_name"),
    ({"given": ["Дарья"], "family": "Ильина"}, "ILINA", "name"),  # the soft sign unwritten
    # umlauts and Nordic letters as two letters, as German and Nordic registers write them
    ({"given": ["Jürgen"], "family": "Müller"}, "MUELLER", "name"),
    ({"given": ["Jürgen"], "family": "Müller"}, "MULLER", "name"),
    ({"given": ["Jürgen"], "family": "Müller"}, "JUERGENMUELLER", "full_name"),
    ({"given": ["Søren"], "family": "Grønlund"}, "GROENLUND", "name"),
    ({"given": ["Åshild"], "family": "Dalby"}, "AASHILD", "name"),
    # each part of a double surname, and the surname as one word
    ({"given": ["Anouk"], "family": "Pemberly-Quasht"}, "PEMBERLY", "name"),
    ({"given": ["Anouk"], "family": "Pemberly-Quasht"}, "QUASHT", "name"),
    ({"given": ["Anouk"], "family": "Pemberly-Quasht"}, "PEMBERLYQUASHT", "name"),
    ({"given": ["Anouk"], "family": "Pemberly-Quasht"}, "AnoukPemberlyQuasht", "full_name"),
    # a given name of two words as one
    ({"given": ["Mary Zelda"], "family": "Quist"}, "MARYZELDA", "name"),
    # a name given as text alone: its first and last words, glued either way round
    ({"text": "Ivo Zanderquist"}, "IvoZanderquist", "full_name"),
    ({"text": "Ivo B. Zanderquist"}, "ZANDERQUISTIVO", "full_name"),
]


@pytest.mark.parametrize(("name", "code", "kind"), _NAMES_IN_CODES)
def test_a_name_written_as_a_code_writes_it_is_found(
    name: dict[str, object], code: str, kind: str
) -> None:
    c = CanarySet()
    c.add_patient({"resourceType": "Patient", "id": "p1", "name": [name]}, "p1")
    rows = [_local_coding_row(code)]
    assert set(scan_rows(c, rows).by_kind()) == {kind}, code


@pytest.mark.parametrize(
    "code",
    [
        "OQUARRIGANS",  # inside a longer word
        "BRONTE",  # a prefix
        "PEMBERLYX",
        "IVO",  # a short part alone
        "SIOBHANO",
        "MUELLERS",  # the other conventions' forms are whole words too
        "PETROVSKI",
        "GROENLUNDX",
    ],
)
def test_near_misses_of_names_written_as_codes_are_not_found(code: str) -> None:
    c = CanarySet()
    for name in (
        {"given": ["Siobhan"], "family": "O'Quarrigan"},
        {"given": ["Renée"], "family": "Brontëwald"},
        {"given": ["Anouk"], "family": "Pemberly-Quasht"},
        {"text": "Ivo Zanderquist"},
        {"given": ["Jürgen"], "family": "Müller"},
        {"given": ["Иван"], "family": "Петровский"},
        {"given": ["Søren"], "family": "Grønlund"},
    ):
        c.add_patient({"resourceType": "Patient", "id": "p1", "name": [name]}, "p1")
    assert scan_rows(c, [_local_coding_row(code)]).passed, code


def test_an_ascii_name_has_no_other_conventions_form() -> None:
    """The other conventions rewrite letters outside ASCII only: an ASCII name, or one that
    casefolds to ASCII (Straße), gains no form."""
    assert ascii_forms("mueller", "name") == ()
    assert ascii_forms("strasse", "name") == ()
    assert ascii_forms("müller", "name") == ("muller", "mueller")


def test_an_ssn_the_source_wrote_in_full_width_digits_is_found_in_ascii() -> None:
    """Released text is compared in its compatibility form: the canary is made the same way,
    or a full-width SSN in the source was never found where a code wrote it in ASCII."""
    c = CanarySet()
    ssn = {"system": "http://hl7.org/fhir/sid/us-ssn", "value": _full_width("999-41-7733")}
    c.add_patient({"resourceType": "Patient", "id": "p1", "identifier": [ssn]}, "p1")
    for written in ("SSN999417733", "999-41-7733", _full_width("999417733")):
        assert set(scan_rows(c, [_local_coding_row(written)]).by_kind()) == {"ssn"}, written


def test_a_member_number_and_an_account_number_are_canaries() -> None:
    c = CanarySet()
    c.add_resource(
        {"resourceType": "Coverage", "subscriberId": "ZQW88127734", "identifier": []}, "p1"
    )
    c.add_resource({"resourceType": "Account", "identifier": [{"value": "ACCT-7731-0452"}]}, "p1")
    for code in ("ZQW88127734", "ACCT77310452"):
        assert set(scan_rows(c, [_local_coding_row(code)]).by_kind()) == {"identifier"}, code


@pytest.mark.parametrize(
    ("patient_id", "text", "found"),
    [
        ("pt-55190377", "pt-55190377", True),  # as a local code
        ("pt-55190377", "http://hospital.example/Patient/pt-55190377", True),
        ("pt-55190377", "PT-55190377", True),
        ("f47ac10b-58cc-4372-a567-0e02b2c3d479", "f47ac10b-58cc-4372-a567-0e02b2c3d479", True),
        ("pt-55190377", "xpt-55190377", False),  # inside a longer token
        ("1001", "1001", False),  # digits alone: an ordinary number
        ("example", "example", False),  # letters alone: an ordinary word
        ("p7x", "p7x", False),  # shorter than six characters
    ],
)
def test_a_patients_source_id_in_released_text_is_found_when_it_links(
    patient_id: str, text: str, found: bool
) -> None:
    """The source's id of a Patient links a row to the hospital's record; released rows hold a
    pseudonym in its place. An id of letters and digits both, six characters or more, is
    looked for as a whole token; others equal ordinary numbers and words."""
    c = CanarySet()
    c.add_patient({"resourceType": "Patient", "id": patient_id}, "p1")
    assert (set(scan_rows(c, [_local_coding_row(text)]).by_kind()) == {"id"}) == found, text


def test_an_address_line_and_an_email_glued_as_a_code_writes_them_are_found() -> None:
    c = CanarySet()
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "address": [{"line": ["9 Quimby Row"], "city": "Dunmere", "postalCode": "01984"}],
        "telecom": [{"system": "email", "value": "zquix42@example.org"}],
    }
    c.add_patient(patient, "p1")
    for code, kind in (("9QUIMBYROW", "address"), ("ZQUIX42EXAMPLEORG", "email")):
        assert set(scan_rows(c, [_local_coding_row(code)]).by_kind()) == {kind}, code
    for near in ("9QUIMBY", "QUIMBYROW", "ZQUIX42"):  # a part alone is no finding
        assert scan_rows(c, [_local_coding_row(near)]).passed, near


def test_a_city_with_its_zip_glued_as_a_code_writes_it_is_found() -> None:
    """A local code glues a city to its ZIP (``NewDonaldton01984``, with the state
    ``NEWDONALDTONMA01984``), as it glues an address line: each was released as written,
    where ``New-Donaldton-01984`` was found. The city alone or the ZIP alone is common text."""
    c = CanarySet()
    c.add_patient(
        {
            "resourceType": "Patient",
            "id": "p1",
            "address": [{"city": "New Donaldton", "state": "MA", "postalCode": "01984"}],
        },
        "p1",
    )
    for code in ("NewDonaldton01984", "NEWDONALDTONMA01984", "New-Donaldton-01984"):
        assert set(scan_rows(c, [_local_coding_row(code)]).by_kind()) == {"city_zip"}, code
    for near in ("NewDonaldton", "01984", "XNewDonaldton01984", "NewDonaldton019845"):
        assert scan_rows(c, [_local_coding_row(near)]).passed, near


def test_short_non_ascii_full_name_found_in_ascii_either_way_round():
    """A Chinese full name of three characters (family 张, given 小明) is under MIN_TEXT as
    written, but its ASCII forms are not: glued either way round, as a code writes it."""
    canaries = CanarySet()
    canaries.add_patient(
        {"resourceType": "Patient", "id": "x", "name": [{"family": "张", "given": ["小明"]}]}
    )
    assert "full_name" in canaries.find("ZHANGXIAOMING")  # family first, as the name is said
    assert "full_name" in canaries.find("XIAOMINGZHANG")
    canaries = CanarySet()
    canaries.add_patient(
        {"resourceType": "Patient", "id": "y", "name": [{"family": "王", "given": ["芳"]}]}
    )
    assert "full_name" in canaries.find("code WANGFANG")
    assert "full_name" in canaries.find("FANGWANG")


def test_a_chinese_name_is_found_spaced_family_name_first_and_by_its_given_name():
    """Romanized as it is said (family name first, spaced) and by the given name alone, whose
    ASCII form is long though it is two characters; a one-character part's form (wang, li)
    stays a part only."""
    canaries = CanarySet()
    canaries.add_patient(
        {"resourceType": "Patient", "id": "x", "name": [{"family": "张", "given": ["小明"]}]}
    )
    assert "full_name" in canaries.find("seen with Zhang Xiaoming today")
    assert "full_name" in canaries.find("ZHANG, XIAOMING")
    assert "name" in canaries.find("code XIAOMING")
    assert canaries.find("zhang and ming") == [] and canaries.find("xiaomingx") == []
    canaries = CanarySet()
    canaries.add_patient(
        {"resourceType": "Patient", "id": "y", "name": [{"family": "王", "given": ["芳"]}]}
    )
    assert "full_name" in canaries.find("Wang Fang")
    assert canaries.find("wang") == [] and canaries.find("fang") == []


def test_digits_joined_by_the_other_characters_a_code_keeps_are_found() -> None:
    """A released code or version keeps ``:+<>=`` between digits (deid.terminology.ANY_CODE):
    an MRN written 8473:6251 or 8473+6251 and a phone written 617:555:0193 reached
    deid_resources and views.observation.code, their digit groups read as runs too short to be
    a canary. A time of day with its zone, whose groups ':' and '+' now join, is no
    identifier."""
    c = CanarySet()
    c.add_patient(
        {
            "telecom": [{"system": "phone", "value": "(617) 555-0193"}],
            "identifier": [{"value": "84736251"}, {"value": "0000530"}],
        }
    )
    for code, kinds in (
        ("8473:6251", {"identifier": 2}),
        ("8473+6251", {"identifier": 2}),
        ("MRN=8473<6251>", {"identifier": 2}),
        ("617:555:0193", {"phone": 2}),
    ):
        assert scan_rows(c, [_local_coding_row(code)]).by_kind() == kinds, code
    for text in (
        "2020-03-01T00:00:00+05:30",  # a zero-padded identifier is not in the time's groups
        "2020-03-01T10:15:30.000-04:00",
        "00:00:00+05:30",
        "1:8473:62519",  # not whole groups
    ):
        assert scan_rows(c, [("r", {"effectiveDateTime": text})]).passed, text


def test_a_numeric_birth_date_glued_to_letters_before_it_is_found() -> None:
    """A local code, a version or a UCUM annotation ({DOB1961-07-23}) keeps a birth date
    written with separators glued to a label before it; it was released in the patient's rows
    (deid_resources, views.observation.code and value_unit). Glued after it, a date is a
    date-time's day; glued to a hex word, it is a pseudonym's digits."""
    c = CanarySet()
    c.add_patient({"birthDate": "1961-07-23"}, "p1")
    for code in ("DOB1961-07-23", "DOB07/23/1961", "dob7-23-1961", "geb23.07.1961", "v1961.07.23"):
        assert scan_rows(c, [_local_coding_row(code)]).by_kind() == {"birth_date": 2}, code
        assert scan_rows(c, [_local_coding_row(code, "p2")]).passed, code
    quantity = {"value": 1, "system": "http://unitsofmeasure.org", "code": "{DOB1961-07-23}"}
    assert not scan_rows(c, [("r", {"valueQuantity": quantity}, "p1")]).passed
    for code in ("1961-07-23T00:00:00Z", "ab1961-07-23", "x11961-07-23", "DOB1961-07-231"):
        assert scan_rows(c, [_local_coding_row(code)]).passed, code


def test_an_address_given_as_text_alone_is_found() -> None:
    """A source may send an address as ``Address.text`` alone, without its lines: the text,
    and its street line with its number, were no canary, and a local code holding the street
    (12-Kestrel-Wynd) reached deid_resources and views.condition. A part without a digit (a
    city, a state) is common text, as a city alone is."""
    c = CanarySet()
    c.add_patient(
        {
            "resourceType": "Patient",
            "id": "p1",
            "address": [{"text": "12 Kestrel Wynd, Falconbury MA 02139", "state": "MA"}],
        },
        "p1",
    )
    for code in (
        "12-Kestrel-Wynd",
        "12KESTRELWYND",
        "12-Kestrel-Wynd-Falconbury-MA-02139",
        "Falconbury-MA-02139",
    ):
        assert set(scan_rows(c, [_local_coding_row(code)]).by_kind()) == {"address"}, code
    for near in ("Falconbury", "Kestrel-Wynd", "12-Kestrel", "MA"):
        assert scan_rows(c, [_local_coding_row(near)]).passed, near


def test_an_address_text_of_lines_is_read_line_by_line() -> None:
    c = CanarySet()
    c.add_contact_points({"address": [{"text": "Flat 3\n88 Lotus Garden Road\nQuincy"}]})
    for code in ("Flat-3", "88-Lotus-Garden-Road", "88LOTUSGARDENROAD"):
        assert set(scan_rows(c, [_local_coding_row(code)]).by_kind()) == {"address"}, code
    assert scan_rows(c, [_local_coding_row("Quincy")]).passed


@pytest.mark.parametrize(
    "text",
    [
        "Mrs. Zephyrine Quillfeather",
        "Zephyrine Quillfeather Jr.",
        "Dr Zephyrine Quillfeather MD",
        "Quillfeather, Zephyrine, Mrs",
    ],
)
def test_a_name_written_as_text_with_a_title_gives_its_full_name(text: str) -> None:
    """A name written as text alone (``HumanName.text``, a reference's ``display``) with a title
    or a suffix: its full name was read from its first and last words, ``Mrs`` and
    ``Quillfeather``, and a local code ``ZEPHYRINEQUILLFEATHER`` passed the scan."""
    c = CanarySet()
    c.add_patient({"resourceType": "Patient", "name": [{"text": text}]}, "p1")
    for code in ("ZEPHYRINEQUILLFEATHER", "QuillfeatherZephyrine", "zephyrine-quillfeather"):
        assert "full_name" in c.find(code), code
    assert not scan_rows(c, [("r", {"code": "ZEPHYRINEQUILLFEATHER"}, "p2")]).passed


@pytest.mark.parametrize(
    "text",
    [
        "Zephyrine Quillfeather, M.D.",
        "Dr. Zephyrine Quillfeather Ph.D.",
        "Zephyrine Quillfeather (deceased)",
        "Zephyrine Quillfeather 3rd",
        "ZEPHYRINE QUILLFEATHER, RN, BSN",
        # titles of other languages
        "Herr Zephyrine Quillfeather",
        "Sra. Zephyrine Quillfeather",
        "Dr. med. Zephyrine Quillfeather",
        "Quillfeather, Zephyrine, Dott.ssa",
        "Mme Zephyrine Quillfeather",
        "Sig.ra Zephyrine Quillfeather",
    ],
)
def test_a_name_written_as_text_with_a_dotted_degree_or_a_remark_gives_its_full_name(
    text: str,
) -> None:
    """A degree written with dots was split at them (``M.D.`` as ``M`` and ``D``), a generation
    written with digits read as ``rd``, and a remark in brackets read as the last name: the
    full name was ``Zephyrine D`` or ``Zephyrine deceased``, and a local code
    ``ZEPHYRINEQUILLFEATHER`` passed the scan."""
    c = CanarySet()
    c.add_patient({"resourceType": "Patient", "name": [{"text": text}]}, "p1")
    for code in ("ZEPHYRINEQUILLFEATHER", "QuillfeatherZephyrine"):
        assert "full_name" in c.find(code), code
    assert not scan_rows(c, [("r", {"code": "ZEPHYRINEQUILLFEATHER"}, "p2")]).passed


def test_a_name_of_given_names_alone_gives_its_full_name() -> None:
    """A name whose source put it all in ``given`` (no family name): no full name was read from
    it, and a local code ``ZEPHYRINEQUILLFEATHER`` passed the scan."""
    c = CanarySet()
    name = {"given": ["Zephyrine", "Ada", "Quillfeather"]}
    c.add_patient({"resourceType": "Patient", "name": [name]}, "p1")
    assert "full_name" in c.find("ZEPHYRINEQUILLFEATHER")
    assert not scan_rows(c, [("r", {"code": "QuillfeatherZephyrine"}, "p2")]).passed


def test_a_persons_values_in_extensions_and_linked_records_are_found() -> None:
    """A name, address, telecom or identifier a Patient (or a relative) holds in an extension,
    at any depth and on any element, and the identifier of the record a Patient links to: an
    alias, a former MRN, a second phone, the street of a place of birth, an identifier's
    prior value, a replaced record's MRN. None was read, and a local code holding one was
    released into views.observation."""
    c = CanarySet()

    def ext(url: str, **value: object) -> dict[str, object]:
        return {"url": f"http://hospital.example/ext/{url}", **value}

    alias = ext("alias", valueHumanName={"family": "Thornquaid", "given": ["Osric"]})
    legacy = ext("legacy-mrn", valueIdentifier={"value": "QL4471902"})
    phone = ext("alt-phone", valueContactPoint={"system": "phone", "value": "617-555-0917"})
    place = ext("birth-place", valueAddress={"line": ["41 Gallowmere Rise"], "city": "X"})
    wrapped = ext("wrap", extension=[ext("ssn", valueIdentifier={"value": "QW5512093"})])
    prior = ext("prior", valueIdentifier={"value": "QE7720481"})
    c.add_patient(
        {
            "id": "p1",
            "name": [{"family": "Grimbleton", "given": ["Osric"]}],
            "extension": [alias, legacy, phone, wrapped],
            "identifier": [{"value": "QX9000001", "extension": [prior]}],
            "_birthDate": {"extension": [place]},
            "link": [{"other": {"identifier": {"value": "QO5582013"}}, "type": "replaces"}],
        },
        "p1",
    )
    relative = ext("alias", valueHumanName={"family": "Vellancourt", "given": ["Ines"]})
    c.add_resource({"resourceType": "RelatedPerson", "extension": [relative]})
    found = {
        "THORNQUAID": "name",
        "QL4471902": "identifier",
        "6175550917": "phone",
        "41-GALLOWMERE-RISE": "address",
        "QW5512093": "identifier",
        "QE7720481": "identifier",
        "QO5582013": "identifier",
        "VELLANCOURT": "name",
    }
    for code, kind in found.items():
        assert kind in scan_rows(c, [("r", {"code": code})]).by_kind(), code
    # an extension's text is not a canary: a race's text is an ordinary word
    c.add_patient({"extension": [ext("race", valueString="White")]}, "p2")
    assert scan_rows(c, [("r", {"code": "WHITE"})]).passed
