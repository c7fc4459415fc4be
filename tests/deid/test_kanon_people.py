"""k-anonymity counts people, not Patient records. A hospital sends one person under several
Patient ids (a resend under a new id, one MRN under two ids, records later merged): five
records of two people in one group of quasi-identifiers are a group of two, and are withheld
under k = 5. Who is one person is the erasure's rule: Patient resources sharing an identifier
criteria key (``identifier_index``) or linked by ``Patient.link`` (``resource_references``),
directly or through others.

Each record's person is written in the cohort below; the identifier keys are made from it, and
the groups, their sizes in people and who must be withheld are worked out here from the
cohort, not by the release's code."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import date

import duckdb
import orjson
import pytest

from deid.kanon import RACE_URL, build_k_anonymous_release
from deid.release import DEID_DDL
from vault.lifecycle import person_keys, same_person
from vault.warehouse import SCHEMA

AS_OF = date(2026, 1, 1)
WHITE = ("urn:oid:2.16.840.1.113883.6.238", "2106-3", "White")
K = 5
# (record id, person, sex, birth year, identifier keys): the keys are opaque criteria keys as
# the vault indexes them; records of one person share at least one, and a chain through a
# second key (r-c1 and r-c3 share nothing, both share a key with r-c2) is still one person
COHORT = [
    # five records of two people: A three times (one MRN), B twice (one SSN)
    ("r-a1", "A", "other", 1970, ["mrn:A"]),
    ("r-a2", "A", "other", 1970, ["mrn:A", "ssn:A"]),
    ("r-a3", "A", "other", 1970, ["ssn:A"]),
    ("r-b1", "B", "other", 1970, ["ssn:B"]),
    ("r-b2", "B", "other", 1970, ["ssn:B"]),
    # six records of six people: a group of six
    *((f"r-f{i}", f"F{i}", "female", 1960, [f"mrn:F{i}"]) for i in range(6)),
    # six records of four people: C through a chain of keys, and three more
    ("r-c1", "C", "male", 1950, ["mrn:C"]),
    ("r-c2", "C", "male", 1950, ["mrn:C", "dl:C"]),
    ("r-c3", "C", "male", 1950, ["dl:C"]),
    *((f"r-m{i}", f"M{i}", "male", 1950, [f"mrn:M{i}"]) for i in range(3)),
    # six records of three people: L's four records share no identifier, the hospital links
    # them (Patient.link: r-l1 names r-l2, r-l2 names r-l3, r-l3 names the holder of an MRN,
    # r-l4)
    ("r-l1", "L", "female", 1980, []),
    ("r-l2", "L", "female", 1980, []),
    ("r-l3", "L", "female", 1980, []),
    ("r-l4", "L", "female", 1980, ["mrn:L4"]),
    ("r-l5", "L5", "female", 1980, ["mrn:L5"]),
    ("r-l6", "L6", "female", 1980, ["mrn:L6"]),
    # five records of five people, one with no identifier at all (a person of its own)
    *((f"r-g{i}", f"G{i}", "unknown", 1990, [f"mrn:G{i}"]) for i in range(4)),
    ("r-g4", "G4", "unknown", 1990, []),
]


# Patient.link references as ingest indexes them: (from, to, kind); a literal reference's
# target is the Patient's pseudonym, a conditional one's the criteria key it names
LINKS = [
    ("r-l1", "r-l2", "relative"),
    ("r-l2", "r-l3", "relative"),
    ("r-l3", "mrn:L4", "conditional"),
]


def pid(name: str) -> str:
    """A pseudonym-shaped id for a record of the cohort (32 lowercase hex characters)."""
    return hashlib.md5(name.encode()).hexdigest()


def _patient(rid: str, sex: str, year: int) -> dict:
    system, code, display = WHITE
    return {
        "resourceType": "Patient",
        "id": rid,
        "gender": sex,
        "birthDate": f"{year}-06-01",
        "address": [{"state": "MA", "postalCode": "02139"}],
        "extension": [
            {
                "url": RACE_URL,
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": system, "code": code, "display": display},
                    }
                ],
            }
        ],
    }


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(DEID_DDL)
    for statement in SCHEMA:  # the vault's own tables: identifier_index, erased_subjects...
        con.execute(statement)
    for name, _, sex, year, keys in COHORT:
        rid = pid(name)
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Patient', ?, ?, 'b', ?)",
            [rid, rid, orjson.dumps(_patient(rid, sex, year)).decode()],
        )
        for key in keys:
            con.execute("INSERT INTO identifier_index VALUES ('b', ?, ?, 'Patient')", [key, rid])
    for one, other, kind in LINKS:
        target = pid(other) if kind == "relative" else other
        con.execute(
            "INSERT INTO resource_references VALUES ('b', ?, 'mac', 'link.other', 'ref', ?, "
            "'Patient', ?, true)",
            [pid(one), kind, target],
        )
    # an Observation's reference to a Patient is no link between people
    con.execute(
        "INSERT INTO resource_references VALUES ('b', ?, 'mac', 'subject', 'ref', 'relative', "
        "'Patient', ?, true)",
        [pid("r-l5"), pid("r-l6")],
    )
    # an Encounter indexed under a shared-looking key links no person
    con.execute("INSERT INTO identifier_index VALUES ('b', 'mrn:A', ?, 'Encounter')", [pid("e-1")])
    return con


def _expected_withheld() -> set[str]:
    """Records in groups (sex, birth year: the rest is the same for all) of fewer than K
    people, the people counted from the cohort's own person column."""
    people: dict[tuple[str, int], set[str]] = defaultdict(set)
    for _, person, sex, year, _ in COHORT:
        people[(sex, year)].add(person)
    return {pid(n) for n, _, sex, year, _ in COHORT if len(people[(sex, year)]) < K}


def test_records_of_one_person_count_once_in_a_group(con: duckdb.DuckDBPyConnection) -> None:
    withheld = _expected_withheld()
    small = ("a1", "a2", "a3", "b1", "b2", "c1", "c2", "c3", "m0", "m1", "m2")
    small += ("l1", "l2", "l3", "l4", "l5", "l6")
    assert withheld == {pid(f"r-{x}") for x in small}
    report = build_k_anonymous_release(con, K, as_of=AS_OF, max_withheld=1.0, ladder=[])
    assert report.published
    got = {p for (p,) in con.execute("SELECT patient_id FROM withheld_patients").fetchall()}
    assert got == withheld
    assert report.withheld == len(withheld)
    # the smallest group before, in people: A and B's group of five records is two people
    assert report.before.min_group == 2
    assert report.after.min_group == 5 and report.after.passed
    released = {p for (p,) in con.execute("SELECT patient_id FROM released_patients").fetchall()}
    assert released == {pid(n) for n, *_ in COHORT} - withheld
    # who is whom is not published: the table links no two pseudonyms
    columns = {c for (c, *_) in con.execute("DESCRIBE released_patients").fetchall()}
    assert "person_key" not in columns


def test_counted_in_records_the_same_cohort_would_pass() -> None:
    """The defect this guards against, worked out: counted in records, A and B's group of
    five and C's and L's groups of six would be released at k = 5."""
    records: dict[tuple[str, int], int] = defaultdict(int)
    for _, _, sex, year, _ in COHORT:
        records[(sex, year)] += 1
    assert records[("other", 1970)] == 5 and records[("male", 1950)] == 6
    assert records[("female", 1980)] == 6


def test_person_keys_agree_with_same_person(con: duckdb.DuckDBPyConnection) -> None:
    """The release's people and the erasure's are one rule: for every Patient, the records
    sharing its person key are the ones ``same_person`` walks to, and the key is the smallest
    pseudonym among them."""
    persons = person_keys(con)
    assert pid("e-1") not in persons
    for name, *_ in COHORT:
        rid = pid(name)
        group = {q for q, key in persons.items() if key == persons.get(rid, rid)} | {rid}
        assert group == {rid, *same_person(con, rid)}
        assert persons.get(rid, rid) == min(group)
    by_person: dict[str, set[str]] = defaultdict(set)
    for name, person, *_ in COHORT:
        by_person[person].add(persons.get(pid(name), pid(name)))
    assert all(len(keys) == 1 for keys in by_person.values())
    assert len({k for keys in by_person.values() for k in keys}) == len(by_person)
