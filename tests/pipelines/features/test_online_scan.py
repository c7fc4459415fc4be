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
