from __future__ import annotations

import json

import duckdb
import pyarrow as pa

from pipelines.features.valuesets import (
    ICD10CM,
    RXNORM,
    SNOMED,
    VALUESETS_DIR,
    load_valuesets,
    of_kind,
    register_code_table,
    register_lookup_table,
)

CONDITIONS = {
    "diabetes", "hypertension", "heart_failure", "copd", "ckd", "asthma", "depression",
    "cancer", "mi", "stroke",
}  # fmt: skip
DRUG_CLASSES = {
    "insulin", "metformin", "other_antidiabetic", "antihypertensive", "statin",
    "anticoagulant", "antidepressant",
}  # fmt: skip
# Quan et al. 2011 updated Charlson weights
QUAN_2011 = {
    "mi": 0, "chf": 2, "pvd": 0, "cevd": 0, "dementia": 2, "cpd": 1, "rheumd": 1, "pud": 0,
    "mld": 2, "diab": 0, "diabwc": 1, "hp": 2, "rend": 1, "canc": 2, "msld": 4, "metacanc": 6,
    "aids": 4,
}  # fmt: skip


def test_every_file_is_a_fhir_valueset_with_a_source() -> None:
    files = sorted(VALUESETS_DIR.glob("*.json"))
    assert files
    for path in files:
        resource = json.loads(path.read_text())
        assert resource["resourceType"] == "ValueSet" and resource["id"] == path.stem
        assert resource["description"] and resource["compose"]["include"]


def test_groups_classes_and_charlson_weights() -> None:
    sets = load_valuesets()
    conditions = {v.column.removeprefix("has_") for v in of_kind(sets, "condition")}
    assert CONDITIONS <= conditions
    drugs = {v.column.removeprefix("on_") for v in of_kind(sets, "medication")}
    assert DRUG_CLASSES <= drugs
    weights = {
        v.column.removeprefix("charlson_"): v.charlson_weight for v in of_kind(sets, "charlson")
    }
    assert weights == QUAN_2011
    for v in sets:
        assert v.snomed or v.icd10_prefixes or v.rxnorm
        assert all("." not in p for p in v.icd10_prefixes)
    columns = [v.column for v in sets]
    assert len(columns) == len(set(columns))


def test_the_code_table_holds_every_code_of_every_value_set_once() -> None:
    sets = load_valuesets()
    con = duckdb.connect()
    assert register_code_table(con, sets) == "valueset_codes"
    register_code_table(con, sets)  # replaced, not appended to
    want = sorted(
        [(v.column, SNOMED, c, False) for v in sets for c in v.snomed]
        + [(v.column, ICD10CM, p, True) for v in sets for p in v.icd10_prefixes]
        + [(v.column, RXNORM, c, False) for v in sets for c in v.rxnorm]
    )
    assert sorted(con.execute("SELECT * FROM valueset_codes").fetchall()) == want
    assert len(want) > 100


def test_a_lookup_table_is_typed_by_its_schema_and_may_be_empty() -> None:
    con = duckdb.connect()
    schema = pa.schema([("name", pa.string()), ("n", pa.int64()), ("flag", pa.bool_())])
    register_lookup_table(con, "lookup", schema, [("a", 1, True), ("b", None, False)])
    types = [str(t) for _, t, *_ in con.execute("DESCRIBE lookup").fetchall()]
    assert types == ["VARCHAR", "BIGINT", "BOOLEAN"]
    assert con.execute("SELECT * FROM lookup ORDER BY name").fetchall() == [
        ("a", 1, True),
        ("b", None, False),
    ]
    register_lookup_table(con, "lookup", schema, [])
    assert con.execute("SELECT count(*) FROM lookup").fetchall() == [(0,)]
    # the Arrow rows registered to fill it are gone once it is made
    assert "_lookup_rows" not in {name for (name,) in con.execute("SHOW TABLES").fetchall()}
