"""The ViewDefinition runner directly: load-time errors, row shapes, DuckDB and Parquet types."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest

from fhirlake.viewdef import (
    ViewColumn,
    ViewDefinitionError,
    duckdb_type,
    instant_sql,
    iter_fhir_resources,
    load_view,
    write_view_table,
)
from pipelines.views.tables import load_views

QUANTITY = {"name": "value", "path": "value.ofType(Quantity).value", "type": "decimal"}
OBSERVATION_VIEW = {
    "resourceType": "ViewDefinition",
    "name": "obs",
    "resource": "Observation",
    "select": [
        {
            "column": [
                {"name": "id", "path": "getResourceKey()", "type": "id"},
                {"name": "patient_id", "path": "subject.getReferenceKey(Patient)", "type": "id"},
                {"name": "effective", "path": "effective.ofType(dateTime)", "type": "dateTime"},
                {"name": "issued_day", "path": "issued", "type": "date"},
            ]
        },
        {
            "unionAll": [
                {
                    "column": [
                        {"name": "component", "path": "{}", "type": "code"},
                        QUANTITY,
                    ]
                },
                {
                    "forEach": "component",
                    "column": [
                        {"name": "component", "path": "code.coding.code.first()", "type": "code"},
                        QUANTITY,
                    ],
                },
            ]
        },
    ],
}


def _bp(oid: str, effective: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": effective,
        "issued": "2020-03",
        "component": [
            {"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": {"value": 120}},
            {"code": {"coding": [{"code": "8462-4"}]}, "valueQuantity": {"value": 80.5}},
        ],
    }


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "non-empty"),
        ({"select": [{"column": [{"name": "id", "path": "id"}]}]}, "resource"),
        ({"resource": "Patient", "select": []}, "select"),
        ({"resource": "Patient", "select": [{"forEach": "@@"}]}, "invalid FHIRPath"),
        ({"resource": "Patient", "select": [{"forEach": 1}]}, "FHIRPath expression"),
        ({"resource": "Patient", "select": [{"column": [{"name": "1x", "path": "id"}]}]}, "1x"),
        (
            {"resource": "Patient", "select": [{"column": [{"name": "a", "path": "%nope"}]}]},
            "constant %nope",
        ),
        (
            {
                "resource": "Patient",
                "select": [
                    {"column": [{"name": "a", "path": "id"}]},
                    {"column": [{"name": "a", "path": "gender"}]},
                ],
            },
            "unique",
        ),
        (
            {
                "resource": "Patient",
                "select": [
                    {
                        "unionAll": [
                            {"column": [{"name": "a", "path": "id"}]},
                            {"column": [{"name": "b", "path": "id"}]},
                        ]
                    }
                ],
            },
            "unionAll[1]",
        ),
        (
            {"resource": "Patient", "constant": [{"name": "c"}], "select": [{"column": []}]},
            "constant 'c'",
        ),
    ],
)
def test_invalid_views_fail_at_load_with_the_reason(document: dict, message: str) -> None:
    with pytest.raises(ViewDefinitionError, match=re.escape(message)):
        load_view(document)


def test_where_must_be_boolean_and_collections_must_be_declared() -> None:
    view = load_view(
        {
            "resource": "Patient",
            "select": [{"column": [{"name": "family", "path": "name.family"}]}],
        }
    )
    patient = {"resourceType": "Patient", "name": [{"family": "A"}, {"family": "B"}]}
    with pytest.raises(ViewDefinitionError, match="collection"):
        list(view.run([patient]))
    filtered = load_view(
        {
            "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "id"}]}],
            "where": [{"path": "name.family"}],
        }
    )
    with pytest.raises(ViewDefinitionError, match="boolean"):
        list(filtered.run([patient]))


def test_rows_union_components_and_reference_keys() -> None:
    view = load_view(OBSERVATION_VIEW)
    rows = list(view.run([_bp("o1", "2020-03-04T10:00:00+02:00"), {"resourceType": "Patient"}]))
    assert [(r["component"], r["value"]) for r in rows] == [
        (None, None),
        ("8480-6", 120),
        ("8462-4", 80.5),
    ]
    assert {r["patient_id"] for r in rows} == {"p1"}
    assert [c.name for c in view.columns] == [
        "id",
        "patient_id",
        "effective",
        "issued_day",
        "component",
        "value",
    ]


def test_a_leap_second_is_an_instant_after_the_second_before_it() -> None:
    """R4 instants take ``:60``, a leap second no TIMESTAMPTZ holds: it reads as the last
    microsecond of its minute, on its own day, after the second before it, not as no instant."""
    texts = ["2016-12-31T23:59:59.5Z", "2016-12-31T23:59:60Z", "2017-01-01T00:00:00Z"]
    texts += ["2016-12-31T23:59:60.25+01:00", "2016-12-31T10:60:00Z"]
    con = duckdb.connect()
    read = [con.execute(f"SELECT {instant_sql('$1')}", [t]).fetchone()[0] for t in texts]  # type: ignore[index]
    assert read[0] < read[1] < read[2]
    assert read[1].isoformat() == "2016-12-31T23:59:59.999999+00:00"
    assert read[3].isoformat() == "2016-12-31T22:59:59.999999+00:00"
    assert read[4] is None  # a minute of 60 is no instant


def test_declared_types_in_duckdb_and_parquet(tmp_path: Path) -> None:
    view = load_view(OBSERVATION_VIEW)
    assert duckdb_type(view.columns[2]) == "TIMESTAMPTZ"
    assert duckdb_type(view.columns[3]) == "DATE"

    def stream() -> Iterator[dict[str, Any]]:  # a generator: the writer must not need a list
        for i in range(7):
            yield _bp(f"o{i}", "2020-03-04T10:00:00+02:00" if i % 2 else "2021")

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    rows = write_view_table(con, view, stream(), "views.obs", tmp_path / "obs.parquet", 4)
    assert rows == 21
    described = con.execute("SELECT column_name, column_type FROM (DESCRIBE views.obs)")
    types = dict(described.fetchall())
    assert types["effective"] == "TIMESTAMP WITH TIME ZONE"
    assert types["issued_day"] == "DATE"
    assert types["value"] == "DOUBLE"
    first = con.execute(
        "SELECT effective, issued_day FROM views.obs WHERE id = 'o1' LIMIT 1"
    ).fetchone()
    assert first is not None
    assert first[0].astimezone().replace(tzinfo=None) == datetime(2020, 3, 4, 8, 0) or first[
        0
    ].isoformat().startswith("2020-03-04T08:00:00")
    assert first[1] == date(2020, 3, 1)  # partial date: start of its period
    partial = con.execute("SELECT effective FROM views.obs WHERE id = 'o0' LIMIT 1").fetchone()
    assert partial is not None and partial[0].isoformat().startswith("2021-01-01T00:00:00")
    table = pq.read_table(tmp_path / "obs.parquet")
    assert table.num_rows == 21
    assert str(table.schema.field("value").type) == "double"


def test_the_platform_views_load_and_have_ids() -> None:
    views = load_views()
    assert {v.name for v in views} >= {
        "patient",
        "encounter",
        "condition",
        "observation",
        "medication_request",
        "procedure",
        "immunization",
        "allergy_intolerance",
        "consent",
    }
    for view in views:
        names = [c.name for c in view.columns]
        assert names[0] == "id"
        assert view.name == "patient" or "patient_id" in names


def test_collection_columns_are_lists_in_duckdb(tmp_path: Path) -> None:
    assert duckdb_type(ViewColumn("given", "name.given", "string", True)) == "VARCHAR[]"
    assert duckdb_type(ViewColumn("d", "birthDate", "date", False)) == "DATE"
    assert duckdb_type(ViewColumn("n", "x", "positiveInt", False)) == "BIGINT"
    assert duckdb_type(ViewColumn("c", "code", None, False)) == "VARCHAR"
    view = load_view(
        {
            "resource": "Patient",
            "select": [
                {
                    "column": [
                        {"name": "id", "path": "getResourceKey()"},
                        {"name": "given", "path": "name.given", "collection": True},
                    ]
                }
            ],
        }
    )
    con = duckdb.connect()
    patients = (
        {"resourceType": "Patient", "id": f"p{i}", "name": [{"given": ["A", "B"]}]}
        for i in range(3)
    )
    assert write_view_table(con, view, patients, "pt", tmp_path / "pt.parquet") == 3
    assert con.execute("SELECT given FROM pt WHERE id = 'p1'").fetchone() == (["A", "B"],)
    assert pq.read_table(tmp_path / "pt.parquet").num_rows == 3


def test_fhir_files_are_read_from_bundles_ndjson_and_folders(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"resourceType": "Patient", "id": "a"}}],
    }
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.json").write_bytes(orjson.dumps(bundle))
    (tmp_path / "sub" / "o.ndjson").write_bytes(
        b'{"resourceType": "Observation", "id": "o1"}\n'
        b'{"resourceType": "Observation", "id": "o2"}\n'
    )
    assert [r["id"] for r in iter_fhir_resources(tmp_path / "b.json")] == ["a"]
    assert sorted(r["id"] for r in iter_fhir_resources(tmp_path)) == ["a", "o1", "o2"]
