"""Each view's column schema is definition metadata (names, DuckDB types, descriptions from its
ViewDefinition): it must be what DuckDB describes for the view as published, for every view the
definitions load (a declared type compared by DuckDB's own name for it: TIMESTAMPTZ is
described as TIMESTAMP WITH TIME ZONE), and carry the ViewDefinition's column descriptions."""

from __future__ import annotations

from pathlib import Path

import duckdb

from deid.release import DEID_DDL
from fhirlake.viewdef import load_view
from pipelines.assets.views import build_views_asset
from pipelines.views.tables import VIEWS_SCHEMA, run_view_over_release, view_files


def _described(con: duckdb.DuckDBPyConnection, type_: str) -> str:
    return str(con.execute(f"DESCRIBE SELECT CAST(NULL AS {type_}) AS x").fetchone()[1])


def test_definition_schemas_are_the_published_tables(tmp_path: Path) -> None:
    views = {load_view(path).name: load_view(path) for path in view_files()}
    specs = {spec.key.path[-1]: spec for spec in build_views_asset().specs}
    assert set(specs) == set(views)
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    try:
        con.execute(DEID_DDL)
        for name, view in views.items():
            run_view_over_release(con, view, tmp_path)
            described = con.execute(f"DESCRIBE {VIEWS_SCHEMA}.{name}").fetchall()
            schema = specs[name].metadata["dagster/column_schema"].value
            assert [(c.name, _described(con, c.type)) for c in schema.columns] == [
                (column, type_) for column, type_, *_ in described
            ], name
            declared = {c.name: c.description for c in view.columns}
            assert {c.name: c.description for c in schema.columns} == declared, name
    finally:
        con.close()
    assert any(c.description for v in views.values() for c in v.columns)
