"""k-anonymity on what is released, on a tiny cohort where generalisation must withhold,
checked against a computation of its own."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import duckdb
import orjson
import pytest

from deid.kanon import (
    GENERALISATION_LADDER,
    RACE_URL,
    build_k_anonymous_release,
    record_quasi_identifiers,
    released_filter,
    representative_birth_year,
)
from deid.release import DEID_DDL

AS_OF = date(2026, 1, 1)
WHITE = ("urn:oid:2.16.840.1.113883.6.238", "2106-3", "White")
ASIAN = ("urn:oid:2.16.840.1.113883.6.238", "2028-9", "Asian")
# (id, sex, birth date, ZIP, race)
COHORT = [
    *((f"f{y}", "female", f"{y}-05-17", "02139", WHITE) for y in range(1980, 1986)),
    *((f"m{y}", "male", f"{y}-11-02", "02144", WHITE) for y in (1950, 1952, 1955)),
    ("old", "female", "1930-02-03", "02139", ASIAN),
]


def patient(pid: str, sex: str, birth: str, zip_: str, race: tuple[str, str, str]) -> dict:
    system, code, display = race
    return {
        "resourceType": "Patient",
        "id": pid,
        "gender": sex,
        "birthDate": birth,
        "address": [{"city": "kept?", "state": "MA", "postalCode": zip_}],
        "extension": [
            {
                "url": RACE_URL,
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": system, "code": code, "display": display},
                    },
                    {"url": "text", "valueString": display},
                ],
            }
        ],
    }


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(DEID_DDL)
    for pid, *rest in COHORT:
        resource = orjson.dumps(patient(pid, *rest)).decode()
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Patient', ?, ?, 'b', ?)",
            [pid, pid, resource],
        )
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Encounter', ?, ?, 'b', '{}')",
            [f"e-{pid}", pid],
        )
    return con


def band(age: int, width: int) -> str:
    if age >= 90:
        return "90+"
    low = age // width * width
    return f"{low}-{min(low + width - 1, 89)}"


def reference(k: int, limit: float) -> tuple[int, set[str]]:
    """Generalisation levels tried in order (10-year bands, then 20-year bands; ZIP, state and
    ethnicity are the same for all here, both races are common), the first level whose share
    below k is within ``limit``, and who is then withheld. Levels: 0 = 5-year bands."""
    widths = [5, 10, 10, 10, 20, 20, 20, 20, 20]  # the ladder's age width after each step
    for level, width in enumerate(widths):
        key = {pid: (band(AS_OF.year - int(b[:4]), width), s, r[1]) for pid, s, b, _, r in COHORT}
        sizes = Counter(key.values())
        small = {pid for pid, q in key.items() if sizes[q] < k}
        if len(small) / len(COHORT) <= limit or level == len(widths) - 1:
            return level, small
    raise AssertionError("unreachable")


def test_generalises_then_withholds_and_rewrites_every_released_copy(con) -> None:
    level, withheld = reference(3, 0.2)
    report = build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.2)
    assert (len(report.steps_applied), report.withheld) == (level, len(withheld)) == (1, 1)
    assert report.passed and report.published
    assert report.before.min_group == 1 and report.after.min_group >= 3
    assert report.to_dict()["generalised"] == ["age: 5-year to 10-year bands"]
    assert {p for (p,) in con.execute("SELECT patient_id FROM withheld_patients").fetchall()} == (
        withheld
    )
    rows = con.execute(
        "SELECT patient_id, age_band, sex, zip3, state, race FROM released_patients"
    ).fetchall()
    assert {r[0] for r in rows} == {c[0] for c in COHORT} - withheld
    released = {r[0]: r for r in rows}
    for pid, resource in con.execute(
        "SELECT id, resource FROM deid_resources WHERE resource_type = 'Patient'"
    ).fetchall():
        r = orjson.loads(resource)
        if pid in withheld:
            assert not {"gender", "birthDate", "address", "extension"} & set(r)
            continue
        _, age_band, sex, zip3, state, race = released[pid]
        assert race == WHITE[2]
        assert r["gender"] == sex and r["address"] == [
            {"country": "US", "state": state, "postalCode": f"{zip3}00"}
        ]
        assert r["birthDate"] == str(representative_birth_year(age_band, AS_OF.year))
        assert band(AS_OF.year - int(r["birthDate"]), 10) == age_band  # the band, no finer
        (race_ext,) = r["extension"]
        assert race_ext["extension"] == [
            {"url": "ombCategory", "valueCoding": dict(zip(("system", "code", "display"), WHITE))}
        ]
    # the release stages read through the withheld list
    (left,) = con.execute(
        f"SELECT count(*) FROM deid_resources WHERE {released_filter(con)}"
    ).fetchone()
    assert left == 2 * (len(COHORT) - len(withheld))


def test_too_many_withheld_fails_and_changes_nothing(con) -> None:
    build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.2)
    before = con.execute("SELECT * FROM released_patients ORDER BY 1").fetchall()
    resources = con.execute("SELECT resource::VARCHAR FROM deid_resources ORDER BY id").fetchall()
    _, withheld = reference(3, 0.05)
    report = build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.05)
    assert not report.passed and not report.published
    assert report.withheld == len(withheld) and report.withheld_share == pytest.approx(0.1)
    assert con.execute("SELECT * FROM released_patients ORDER BY 1").fetchall() == before
    assert (
        con.execute("SELECT resource::VARCHAR FROM deid_resources ORDER BY id").fetchall()
        == resources
    )
    tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert not {t for t in tables if t.endswith("__staging")}


def test_rerun_starts_from_the_recorded_values(con) -> None:
    first = build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.2)
    rows = con.execute("SELECT * FROM released_patients ORDER BY 1").fetchall()
    second = build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.2)
    assert second.to_dict() == first.to_dict()
    assert con.execute("SELECT * FROM released_patients ORDER BY 1").fetchall() == rows


def test_no_withheld_table_filters_nothing() -> None:
    con = duckdb.connect()
    assert released_filter(con) == "TRUE"


def test_rare_races_merge_into_other_race_in_every_copy() -> None:
    con = duckdb.connect()
    con.execute(DEID_DDL)
    aian = ("urn:oid:2.16.840.1.113883.6.238", "1002-5", "American Indian or Alaska Native")
    other = ("urn:oid:2.16.840.1.113883.6.238", "2131-1", "Other Race")
    for i, race in enumerate([aian, aian, other, other, other]):
        resource = orjson.dumps(patient(f"p{i}", "male", "1970-01-01", "02139", race)).decode()
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Patient', ?, ?, 'b', ?)",
            [f"p{i}", f"p{i}", resource],
        )
    report = build_k_anonymous_release(con, 5, as_of=AS_OF, max_withheld=0.0)
    assert report.published and report.withheld == 0
    assert report.steps_applied[-1] == "race: rare categories to Other Race"
    assert con.execute("SELECT DISTINCT race FROM released_patients").fetchall() == [
        ("Other Race",)
    ]
    for (resource,) in con.execute("SELECT resource FROM deid_resources").fetchall():
        (ext,) = orjson.loads(resource)["extension"]
        assert ext["extension"][0]["valueCoding"]["code"] == "2131-1"


def test_erased_patients_leave_the_recorded_values(con) -> None:
    build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.2)
    con.execute("DELETE FROM deid_resources WHERE patient_id = 'f1980'")  # as erasure does
    build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.5)
    for table in ("release_quasi_identifiers", "released_patients", "withheld_patients"):
        (n,) = con.execute(f"SELECT count(*) FROM {table} WHERE patient_id = 'f1980'").fetchone()
        assert n == 0, table


def test_wide_bands_end_at_89() -> None:
    con = duckdb.connect()
    con.execute(DEID_DDL)
    for i, birth in enumerate(["1940-06-01", "1943-06-01", "1938-06-01", "1937-06-01"]):
        resource = orjson.dumps(patient(f"p{i}", "male", birth, "02139", WHITE)).decode()
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Patient', ?, ?, 'b', ?)",
            [f"p{i}", f"p{i}", resource],
        )
    twenty = next(step for step in GENERALISATION_LADDER if "20-year" in step.name)
    report = build_k_anonymous_release(con, 4, as_of=AS_OF, max_withheld=0.0, ladder=[twenty])
    assert report.published and report.steps_applied == [twenty.name]
    bands = con.execute("SELECT DISTINCT age_band FROM released_patients").fetchall()
    assert bands == [("80-89",)]


def test_a_failed_publish_check_publishes_nothing(con) -> None:
    class Failed:
        passed = False

    report = build_k_anonymous_release(
        con, 3, as_of=AS_OF, max_withheld=0.2, check=lambda c, staging: Failed()
    )
    assert report.passed and not report.published  # k was met; the extra check was not
    tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "released_patients" not in tables and "withheld_patients" not in tables


def test_released_patients_scan_reads_categories_as_terminology(con) -> None:
    from deid.leakscan import CanarySet
    from deid.release import build_released_patients

    surname = CanarySet()
    surname.add_patient({"name": [{"family": "White", "given": ["Anna"]}]}, "f1980")
    report = build_released_patients(con, 3, AS_OF, max_withheld=0.2, canaries=surname)
    assert report.published and report.check.passed  # a surname that is a race is no leak
    planted = CanarySet()
    planted.add("identifier", "White")  # an identifier is a leak anywhere
    report = build_released_patients(con, 3, AS_OF, max_withheld=0.2, canaries=planted)
    assert not report.published and report.check.by_kind()["identifier"] > 0


def _add_batch(con: duckdb.DuckDBPyConnection, batch: list[tuple]) -> None:
    """A batch as the staging step writes it: each Patient's de-identified resource (new, or
    replacing the released form of a patient sent again), its quasi-identifiers recorded anew."""
    for pid, *rest in batch:
        resource = patient(pid, *rest)
        con.execute("DELETE FROM deid_resources WHERE resource_type = 'Patient' AND id = ?", [pid])
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Patient', ?, ?, 'b2', ?)",
            [pid, pid, orjson.dumps(resource).decode()],
        )
        record_quasi_identifiers(con, [(pid, "b2", resource)])


def _patients(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    return con.execute(
        "SELECT id, batch_id, resource::VARCHAR FROM deid_resources "
        "WHERE resource_type = 'Patient' ORDER BY id"
    ).fetchall()


# (second batch, as_of, Patients rewritten by the second release)
LATER_RELEASES = {
    # one more 1950s man and the 1980s woman of 1983 sent again with a new ZIP: the levels stay
    "same level": (
        [
            ("m1953", "male", "1953-01-09", "02144", WHITE),
            ("f1983", "female", "1983-05-17", "02139", WHITE),
        ],
        AS_OF,
        {"m1953", "f1983"},
    ),
    # the same, a year later: every birth year is counted from another year
    "next year": (
        [("m1953", "male", "1953-01-09", "02144", WHITE)],
        date(AS_OF.year + 1, 1, 1),
        {pid for pid, *_ in COHORT} | {"m1953"},
    ),
    # two men of the 1950s from another ZIP3: ZIP3 becomes the region, every released row changes
    # (the patient withheld before stays withheld, with the same inputs)
    "other level": (
        [
            ("y1953", "male", "1953-03-01", "03101", WHITE),
            ("y1954", "male", "1954-03-01", "03101", WHITE),
        ],
        AS_OF,
        {pid for pid, *_ in COHORT} - {"old"} | {"y1953", "y1954"},
    ),
}


@pytest.mark.parametrize("case", LATER_RELEASES)
def test_a_later_release_rewrites_only_the_patients_whose_inputs_changed(
    con, case, monkeypatch
) -> None:
    """The second release rewrites just the new, re-sent or differently released Patients,
    and leaves every Patient row as a release that rewrites them all (inputs forgotten)."""
    import deid.kanon as kanon

    batch, as_of, expected = LATER_RELEASES[case]
    everyone = duckdb.connect()
    everyone.execute(DEID_DDL)
    for target in (con, everyone):
        for pid, *rest in COHORT:
            _add_batch(target, [(pid, *rest)])
        build_k_anonymous_release(target, 3, as_of=AS_OF, max_withheld=0.2)
        _add_batch(target, batch)
    everyone.execute("DROP TABLE released_patient_inputs")  # as before the digests: all rewritten
    rewritten: list[str] = []
    original = kanon.generalised_patient

    def counted(resource, released, year):
        rewritten.append(resource["id"])
        return original(resource, released, year)

    monkeypatch.setattr(kanon, "generalised_patient", counted)
    first = build_k_anonymous_release(con, 3, as_of=as_of, max_withheld=0.2)
    assert set(rewritten) == expected
    if case == "other level":
        assert first.steps_applied[-1] == "ZIP3 to ZIP1 region"
    monkeypatch.setattr(kanon, "generalised_patient", original)
    second = build_k_anonymous_release(everyone, 3, as_of=as_of, max_withheld=0.2)
    assert first.published and first.to_dict() == second.to_dict()
    assert _patients(con) == _patients(everyone)
    assert len(_patients(con)) == len(COHORT) + len({b[0] for b in batch} - {c[0] for c in COHORT})
    # and a third release with nothing new rewrites nobody
    rewritten.clear()
    monkeypatch.setattr(kanon, "generalised_patient", counted)
    build_k_anonymous_release(con, 3, as_of=as_of, max_withheld=0.2)
    assert rewritten == [] and _patients(con) == _patients(everyone)


def test_rewritten_patients_are_appended_and_every_other_row_stays_in_place(con) -> None:
    """The rewrite deletes the changed Patient rows and appends their new text: no row is
    updated in place (DuckDB would write the JSON column of each row group holding one again at
    the next checkpoint), no other row moves or changes, and nothing is lost or doubled."""
    before = dict(
        con.execute(
            "SELECT rowid, resource_type || '/' || id || '/' || resource::VARCHAR "
            "FROM deid_resources"
        ).fetchall()
    )
    (last,) = con.execute("SELECT max(rowid) FROM deid_resources").fetchone()
    build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.2)
    after = con.execute(
        "SELECT rowid, resource_type, id, resource::VARCHAR FROM deid_resources"
    ).fetchall()
    moved = {(kind, id_) for rowid, kind, id_, _ in after if rowid > last}
    stayed = {rowid: f"{kind}/{id_}/{text}" for rowid, kind, id_, text in after if rowid <= last}
    # independently: which rows the release changed, by their text
    changed_patients = {
        ("Patient", id_)
        for _, kind, id_, text in after
        if kind == "Patient" and f"{kind}/{id_}/{text}" not in set(before.values())
    }
    assert changed_patients and moved == changed_patients
    assert all(before[rowid] == row for rowid, row in stayed.items())
    assert len(after) == len(before)
    assert sorted(k for k, _ in moved) == ["Patient"] * len(moved)


# 20:00 on New Year's Eve in New York is already 01:00 on 1 January in UTC; 09:00 on New Year's
# Day at UTC+14 is still 19:00 on 31 December in UTC
NEW_YEAR_IN_UTC_ONLY = datetime(2026, 12, 31, 20, 0, tzinfo=ZoneInfo("America/New_York"))
OLD_YEAR_IN_UTC = datetime(2027, 1, 1, 9, 0, tzinfo=ZoneInfo("Pacific/Kiritimati"))


@pytest.mark.parametrize(
    ("now", "band_of_1937"),
    [(NEW_YEAR_IN_UTC_ONLY, "90+"), (OLD_YEAR_IN_UTC, "85-89")],
)
def test_ages_are_counted_in_the_utc_year(now: datetime, band_of_1937: str) -> None:
    """The release's year is UTC's, as the yearly rebuild's schedule is: a server whose local
    date is still the old year must not rebuild it with last year's bands."""
    con = duckdb.connect()
    con.execute(DEID_DDL)
    resource = orjson.dumps(patient("nye", "female", "1937-06-01", "02139", WHITE)).decode()
    con.execute(
        "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
        "VALUES ('Patient', 'nye', 'nye', 'b', ?)",
        [resource],
    )
    build_k_anonymous_release(con, 1, max_withheld=0.0, clock=lambda: now)
    # computed here: the UTC year of ``now`` less the birth year, in HIPAA's 90+ or 5-year bands
    age = now.astimezone(UTC).year - 1937
    assert band(age, 5) == band_of_1937
    ((released,),) = con.execute(
        "SELECT age_band FROM released_patients WHERE patient_id = 'nye'"
    ).fetchall()
    assert released == band_of_1937


def test_one_state_written_three_ways_is_one_group() -> None:
    """A state is released as its USPS code, so a k-anonymity group counts everyone of a state
    however their source wrote it. Released as written, ``MA``, ``ma`` and ``Massachusetts``
    were three groups of one here, each below k = 3 and withheld (or the state removed for
    everyone); the expected release is worked out by hand: one group of three, state MA."""
    from deid.engine import Deidentifier, DeidSecrets
    from deid.policy import Policy

    policy = Policy.shipped("research")
    engine = Deidentifier(policy, DeidSecrets.derive(b"\x02" * 32, policy), today=AS_OF)
    con = duckdb.connect()
    con.execute(DEID_DDL)
    for pid, state in (("p1", "MA"), ("p2", "ma"), ("p3", "Massachusetts")):
        raw = patient(pid, "female", "1980-05-17", "02139", WHITE)
        raw["address"][0]["state"] = state
        out = engine.apply(raw, patient_scope=pid)
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Patient', ?, ?, 'b', ?)",
            [pid, pid, orjson.dumps(out.resource).decode()],
        )
    report = build_k_anonymous_release(con, 3, as_of=AS_OF, max_withheld=0.0)
    assert report.passed and report.withheld == 0 and report.steps_applied == []
    rows = con.execute("SELECT patient_id, state FROM released_patients ORDER BY 1").fetchall()
    assert rows == [("p1", "MA"), ("p2", "MA"), ("p3", "MA")]
