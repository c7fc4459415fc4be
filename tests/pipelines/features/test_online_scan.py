"""The online store's leak scan reads the values Feast serves."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value

from deid.leakscan import CanarySet
from pipelines.features.online_scan import scan_online_store

PSEUDONYM = "0123456789abcdef0123456789abcdef"


def _store(path: Path, value: Value) -> Path:
    key = serialize_entity_key(
        EntityKey(join_keys=["patient_id"], entity_values=[Value(string_val=PSEUDONYM)]),
        entity_key_serialization_version=3,
    )
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE ehr_platform_patient_demographics "
        "(entity_key BLOB, feature_name TEXT, value BLOB, event_ts TIMESTAMP, created_ts TIMESTAMP)"
    )
    db.execute(
        "INSERT INTO ehr_platform_patient_demographics VALUES (?, 'sex', ?, NULL, NULL)",
        [key, value.SerializeToString()],
    )
    db.commit()
    db.close()
    return path


def test_clean_values_pass_and_a_planted_name_fails(tmp_path: Path) -> None:
    canaries = CanarySet()
    canaries.add_patient(
        {"name": [{"family": "Quillfeather", "given": ["Ottoline"]}], "birthDate": "1950-02-03"},
        PSEUDONYM,
    )
    clean = _store(tmp_path / "clean.db", Value(string_val="female"))
    assert scan_online_store(clean, canaries).passed
    leaked = _store(tmp_path / "leaked.db", Value(string_val="Ottoline Quillfeather"))
    result = scan_online_store(leaked, canaries)
    assert not result.passed and "full_name" in result.by_kind()
    birth = _store(tmp_path / "birth.db", Value(string_val="1950-02-03"))
    assert scan_online_store(birth, canaries).by_kind() == {"birth_date": 1}
    assert scan_online_store(tmp_path / "absent.db", canaries).passed


def test_entity_keys_are_feasts_serialisation() -> None:
    """The online store's key of a patient is exactly what Feast's serialisation makes, for
    pseudonyms of several lengths and for text beyond ASCII."""
    from pipelines.features.online_scan import online_entity_key

    for pseudonym in (PSEUDONYM, PSEUDONYM * 2, "f" * 64, "a", "", "zoë-ß", "0" * 64):
        expected = serialize_entity_key(
            EntityKey(join_keys=["patient_id"], entity_values=[Value(string_val=pseudonym)]),
            entity_key_serialization_version=3,
        )
        assert online_entity_key(pseudonym) == expected, pseudonym


def _many_rows_store(path: Path) -> tuple[Path, str]:
    """A feature view table of 37 patients with 3 features each, some values NULL, rows
    inserted out of key order and with gaps in the rowids (deleted rows)."""
    table = "ehr_platform_patient_labs_vitals"
    db = sqlite3.connect(path)
    db.execute(
        f"CREATE TABLE {table} (entity_key BLOB, feature_name TEXT, value BLOB, "
        "value_text TEXT, vector_value BLOB, event_ts TIMESTAMP, created_ts TIMESTAMP, "
        "PRIMARY KEY(entity_key, feature_name))"
    )
    rows = [
        (
            serialize_entity_key(
                EntityKey(join_keys=["patient_id"], entity_values=[Value(string_val=f"{p:032x}")]),
                entity_key_serialization_version=3,
            ),
            name,
            None
            if (p + len(name)) % 5 == 0
            else Value(string_val=f"v{p}·{name}").SerializeToString(),
        )
        for p in reversed(range(37))
        for name in ("hba1c_last", "bmi_last", "größe")
    ]
    db.executemany(f"INSERT INTO {table} (entity_key, feature_name, value) VALUES (?, ?, ?)", rows)
    db.execute(f"DELETE FROM {table} WHERE rowid % 7 = 0")
    # SQLite lets a rowid table's primary key hold NULL: such a row is still read
    db.execute(f"INSERT INTO {table} (entity_key, feature_name, value) VALUES (NULL, 'x', x'6869')")
    db.commit()
    db.close()
    return path, table


def test_paged_reads_return_every_row_once(tmp_path: Path) -> None:
    """Keys and rows read a page of keys at a time (one JSON row per page) are exactly what
    stepping through the table row by row gives, for page sizes below, at and above the key
    count, a NULL key included."""
    from pipelines.features import online_scan

    path, table = _many_rows_store(tmp_path / "online.db")
    db = sqlite3.connect(path)
    plain = [
        (b"" if k is None else bytes(k), n, b"" if v is None else bytes(v))
        for k, n, v in db.execute(f"SELECT entity_key, feature_name, value FROM {table}")
    ]
    assert len(plain) > 60 and any(v == b"" for _, _, v in plain)
    some_keys = sorted({k for k, _, _ in plain if k})[::3]
    key_count = len({k for k, _, _ in plain})
    try:
        for per_page in (1, 7, key_count, key_count + 1, online_scan.KEYS_PER_PAGE):
            keys = online_scan.online_keys(path, table, per_page=per_page)
            assert keys == {k for k, _, _ in plain}, per_page
            every = list(online_scan._table_rows(db, f'"{table}"', None, per_page=per_page))
            assert sorted(every) == sorted(plain), per_page
            only = list(online_scan._table_rows(db, f'"{table}"', some_keys, per_page=per_page))
            assert sorted(only) == sorted(r for r in plain if r[0] in set(some_keys)), per_page
    finally:
        db.close()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE other (entity_key BLOB, feature_name TEXT)")
    db.execute('CREATE TABLE "odd ""name""" (value BLOB, feature_name TEXT, entity_key BLOB)')
    tables = online_scan.feature_view_tables(db)
    db.close()
    assert sorted(tables) == sorted([(table, f'"{table}"'), ('odd "name"', '"odd ""name"""')])
    assert online_scan.online_keys(path, "other") == set()
    assert online_scan.online_keys(path, "no_such_table") == set()
    assert online_scan.online_keys(tmp_path / "absent.db", table) == set()
