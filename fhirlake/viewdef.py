"""SQL-on-FHIR v2 ViewDefinitions: load (validated), run over FHIR JSON, write typed tables.

A ViewDefinition is checked completely when it is loaded (structure, column names, every
FHIRPath expression parsed, constants defined, ``unionAll`` branches with the same columns),
so a bad view fails before any data is read. Paths are compiled once per view by the shared
FHIRPath implementation in :mod:`fhirlake.fhirpath`. Rows are FHIR-native Python values
(strings for dates); :func:`write_view_table` casts them to the declared DuckDB types while
streaming Arrow batches, so memory stays bounded whatever the input size.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from fhirlake.fhirpath import CompiledPath, FhirPathError, Node, compile_path, root_node


class ViewDefinitionError(ValueError):
    """A ViewDefinition that is not valid, or a view that cannot produce a row as declared."""


_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_CONSTANT_REF = re.compile(r"%`?([A-Za-z_][A-Za-z0-9_]*)`?")
_RESERVED_VARIABLES = {"rowIndex", "resource", "rootResource", "context", "ucum", "sct", "loinc"}
_SELECT_KEYS = {"column", "select", "forEach", "forEachOrNull", "repeat", "unionAll"}

_DUCKDB_TYPES = {
    "boolean": "BOOLEAN",
    "integer": "BIGINT",
    "positiveInt": "BIGINT",
    "unsignedInt": "BIGINT",
    "integer64": "BIGINT",
    "decimal": "DOUBLE",
    "date": "DATE",
    "dateTime": "TIMESTAMPTZ",
    "instant": "TIMESTAMPTZ",
}


@dataclass(frozen=True)
class ViewColumn:
    name: str
    path: str
    type: str | None
    collection: bool
    description: str | None = None


@dataclass
class _Select:
    columns: list[tuple[ViewColumn, CompiledPath]] = field(default_factory=list)
    selects: list[_Select] = field(default_factory=list)
    union: list[_Select] = field(default_factory=list)
    for_each: CompiledPath | None = None
    or_null: bool = False
    repeat: list[CompiledPath] = field(default_factory=list)

    def names(self) -> list[str]:
        out = [c.name for c, _ in self.columns]
        for sub in self.selects:
            out.extend(sub.names())
        if self.union:
            out.extend(self.union[0].names())
        return out

    def all_columns(self) -> list[ViewColumn]:
        out = [c for c, _ in self.columns]
        for sub in self.selects:
            out.extend(sub.all_columns())
        if self.union:
            out.extend(self.union[0].all_columns())
        return out


def duckdb_type(column: ViewColumn) -> str:
    """DuckDB type of a column: FHIR dateTime/instant → TIMESTAMPTZ (UTC), date → DATE,
    decimal → DOUBLE, integers → BIGINT, boolean → BOOLEAN, everything else VARCHAR;
    collection columns are lists of that type."""
    base = _DUCKDB_TYPES.get(column.type or "", "VARCHAR")
    return f"{base}[]" if column.collection else base


class ViewDefinition:
    """A loaded, validated ViewDefinition."""

    def __init__(self, document: dict[str, Any]) -> None:
        if not isinstance(document, dict) or not document:
            raise ViewDefinitionError("a ViewDefinition must be a non-empty JSON object")
        resource = document.get("resource")
        if not isinstance(resource, str) or not resource:
            raise ViewDefinitionError("ViewDefinition.resource (a FHIR resource type) is required")
        select = document.get("select")
        if not isinstance(select, list) or not select:
            raise ViewDefinitionError("ViewDefinition.select must be a non-empty array")
        self.document = document
        self.resource = resource
        self.name = str(document.get("name") or resource.lower())
        if not _COLUMN_NAME.match(self.name):
            raise ViewDefinitionError(f"view name {self.name!r} is not a valid table name")
        self.constants = self._constants(document.get("constant"))
        self._root = _Select(
            selects=[self._select(s, f"select[{i}]") for i, s in enumerate(select)]
        )
        self._where = []
        for i, item in enumerate(document.get("where") or []):
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise ViewDefinitionError(f"where[{i}] needs a string path")
            self._where.append(self._compile(item["path"], f"where[{i}]"))
        names = self._root.names()
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ViewDefinitionError(f"column names must be unique: {', '.join(duplicated)}")
        self.columns: list[ViewColumn] = self._root.all_columns()

    # -- loading ---------------------------------------------------------------------------
    def _constants(self, raw: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, item in enumerate(raw or []):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or not _COLUMN_NAME.match(name):
                raise ViewDefinitionError(f"constant[{i}] needs a valid name")
            values = [k for k in item if k.startswith("value")]
            if len(values) != 1:
                raise ViewDefinitionError(f"constant {name!r} needs exactly one value[x]")
            value = item[values[0]]
            if values[0] == "valueDecimal":
                value = Decimal(str(value))
            out[name] = value
        return out

    def _compile(self, path: Any, where: str) -> CompiledPath:
        if not isinstance(path, str) or not path.strip():
            raise ViewDefinitionError(f"{where}: a FHIRPath expression (string) is required")
        for ref in _CONSTANT_REF.findall(path):
            if ref not in self.constants and ref not in _RESERVED_VARIABLES:
                raise ViewDefinitionError(f"{where}: constant %{ref} is not defined")
        try:
            return compile_path(path)
        except FhirPathError as exc:
            raise ViewDefinitionError(f"{where}: invalid FHIRPath {path!r}: {exc}") from exc

    def _select(self, raw: Any, where: str) -> _Select:
        if not isinstance(raw, dict):
            raise ViewDefinitionError(f"{where} must be an object")
        unknown = set(raw) - _SELECT_KEYS - {"description"}
        if unknown:
            raise ViewDefinitionError(f"{where}: unknown keys {sorted(unknown)}")
        if "forEach" in raw and "forEachOrNull" in raw:
            raise ViewDefinitionError(f"{where}: forEach and forEachOrNull exclude each other")
        node = _Select()
        if "forEach" in raw or "forEachOrNull" in raw:
            node.or_null = "forEachOrNull" in raw
            key = "forEachOrNull" if node.or_null else "forEach"
            node.for_each = self._compile(raw[key], f"{where}.{key}")
        if "repeat" in raw:
            paths = raw["repeat"]
            if not isinstance(paths, list) or not paths:
                raise ViewDefinitionError(f"{where}.repeat must be a non-empty array of paths")
            node.repeat = [self._compile(p, f"{where}.repeat[{i}]") for i, p in enumerate(paths)]
        for i, col in enumerate(raw.get("column") or []):
            node.columns.append(self._column(col, f"{where}.column[{i}]"))
        for i, sub in enumerate(raw.get("select") or []):
            node.selects.append(self._select(sub, f"{where}.select[{i}]"))
        branches = raw.get("unionAll")
        if branches is not None:
            if not isinstance(branches, list) or not branches:
                raise ViewDefinitionError(f"{where}.unionAll must be a non-empty array")
            node.union = [self._select(b, f"{where}.unionAll[{i}]") for i, b in enumerate(branches)]
            first = node.union[0].names()
            for i, branch in enumerate(node.union[1:], start=1):
                if branch.names() != first:
                    raise ViewDefinitionError(
                        f"{where}.unionAll[{i}] has columns {branch.names()}, "
                        f"but unionAll[0] has {first} (same names in the same order)"
                    )
        if not node.columns and not node.selects and not node.union:
            raise ViewDefinitionError(f"{where}: needs a column, select or unionAll")
        return node

    def _column(self, raw: Any, where: str) -> tuple[ViewColumn, CompiledPath]:
        if not isinstance(raw, dict):
            raise ViewDefinitionError(f"{where} must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not _COLUMN_NAME.match(name):
            raise ViewDefinitionError(
                f"{where}: column name {name!r} must start with a letter and use only "
                "letters, digits and underscores"
            )
        collection = raw.get("collection", False)
        if not isinstance(collection, bool):
            raise ViewDefinitionError(f"{where}: collection must be true or false")
        type_ = raw.get("type")
        if type_ is not None and not isinstance(type_, str):
            raise ViewDefinitionError(f"{where}: type must be a FHIR type name")
        column = ViewColumn(name, raw.get("path", ""), type_, collection, raw.get("description"))
        return column, self._compile(raw.get("path"), f"{where} ({name})")

    # -- running ---------------------------------------------------------------------------
    def _variables(self, row_index: int) -> dict[str, Any]:
        return {**self.constants, "rowIndex": row_index}

    def _value(
        self,
        column: ViewColumn,
        path: CompiledPath,
        focus: Node | None,
        index: int,
        root: Node,
        variables: dict[str, Any],
    ) -> Any:
        if path.expr == "%rowIndex":
            return [index] if column.collection else index
        if focus is None:
            return [] if column.collection else None
        nodes = path.evaluate_at(focus, root, variables)
        values = [_plain(n) for n in nodes]
        if column.collection:
            return values
        if len(values) > 1:
            raise ViewDefinitionError(
                f"column {column.name!r} returned {len(values)} values; declare "
                "collection: true or narrow the path (e.g. first())"
            )
        return values[0] if values else None

    def _foci(self, node: _Select, focus: Node, index: int, root: Node) -> list[tuple[Node, int]]:
        if node.for_each is not None:
            items = node.for_each.evaluate_at(focus, root, self._variables(index))
            return list(zip(items, range(len(items)), strict=True))
        if node.repeat:
            found: list[Node] = []

            def walk(current: Node) -> None:
                for path in node.repeat:
                    for child in path.evaluate_at(current, root, self._variables(index)):
                        found.append(child)
                        walk(child)

            walk(focus)
            return list(zip(found, range(len(found)), strict=True))
        return [(focus, index)]

    def _null_row(self, node: _Select) -> dict[str, Any]:
        """The one row a forEachOrNull without items contributes: every column of the select
        (nested ones included) null, %rowIndex 0."""
        return {
            c.name: (0 if c.path == "%rowIndex" else ([] if c.collection else None))
            for c in node.all_columns()
        }

    def _rows(self, node: _Select, focus: Node, index: int, root: Node) -> list[dict[str, Any]]:
        foci = self._foci(node, focus, index, root)
        if not foci and node.or_null:
            return [self._null_row(node)]
        out: list[dict[str, Any]] = []
        for item, i in foci:
            variables = self._variables(i)
            partial = [
                {c.name: self._value(c, p, item, i, root, variables) for c, p in node.columns}
            ]
            for sub in node.selects:
                sub_rows = self._rows(sub, item, i, root)
                partial = [{**a, **b} for a in partial for b in sub_rows]
                if not partial:
                    break
            if node.union and partial:
                union_rows = [r for b in node.union for r in self._rows(b, item, i, root)]
                partial = [{**a, **b} for a in partial for b in union_rows]
            out.extend(partial)
        return out

    def _included(self, resource: dict[str, Any]) -> bool:
        for path in self._where:
            result = path.evaluate(resource, self._variables(0))
            if not result:
                return False
            if len(result) > 1 or not isinstance(result[0].value, bool):
                raise ViewDefinitionError(f"where path {path.expr!r} must evaluate to a boolean")
            if result[0].value is not True:
                return False
        return True

    def rows(self, resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The rows of one resource (no resourceType or where filtering)."""
        names = [c.name for c in self.columns]
        root = root_node(resource)
        for row in self._rows(self._root, root, 0, root):
            yield {name: row.get(name) for name in names}

    def run(self, resources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Rows of every resource of the view's type that passes its ``where``."""
        for resource in resources:
            if not isinstance(resource, dict) or resource.get("resourceType") != self.resource:
                continue
            if self._where and not self._included(resource):
                continue
            yield from self.rows(resource)


def _plain(node: Node) -> Any:
    value = node.value
    if isinstance(value, Decimal):
        return (
            int(value)
            if value == value.to_integral_value() and "." not in str(value)
            else (float(value))
        )
    return value


def load_view(source: dict[str, Any] | str | Path) -> ViewDefinition:
    """A ViewDefinition from a dict, a JSON file path, or JSON text; validated completely."""
    if isinstance(source, dict):
        return ViewDefinition(source)
    text: str | bytes
    if isinstance(source, str) and source.lstrip().startswith("{"):
        text = source
    else:
        path = Path(source)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ViewDefinitionError(f"cannot read ViewDefinition {path.name}: {exc}") from exc
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ViewDefinitionError(f"ViewDefinition is not valid JSON: {exc}") from exc
    if isinstance(document, dict) and document.get("resourceType") not in (
        None,
        "ViewDefinition",
    ):
        raise ViewDefinitionError("resourceType must be ViewDefinition")
    return ViewDefinition(document)


# -- writing ----------------------------------------------------------------------------------
def _arrow_type(column: ViewColumn) -> pa.DataType:
    # dates travel as text and are cast in DuckDB, which knows partial dates and offsets
    base = {"BOOLEAN": pa.bool_(), "BIGINT": pa.int64(), "DOUBLE": pa.float64()}.get(
        _DUCKDB_TYPES.get(column.type or "", "VARCHAR"), pa.string()
    )
    return pa.list_(base) if column.collection else base


def _text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return orjson.dumps(value).decode()


def _cell(column: ViewColumn, value: Any) -> Any:
    target = _DUCKDB_TYPES.get(column.type or "", "VARCHAR")
    if column.collection:
        return [_scalar(target, v) for v in (value or [])]
    return _scalar(target, value)


def _scalar(target: str, value: Any) -> Any:
    if value is None:
        return None
    if target == "BOOLEAN":
        return value if isinstance(value, bool) else None
    if target == "BIGINT":
        return int(value) if isinstance(value, int | float | Decimal) else None
    if target == "DOUBLE":
        return float(value) if isinstance(value, int | float | Decimal) else None
    return _text(value)


def _date_sql(name: str, fhir_type: str) -> str:
    """Partial dates go to the start of their period: '2012' → 2012-01-01, '2012-03' →
    2012-03-01; a dateTime without offset is read as UTC."""
    quoted = f'"{name}"'
    padded = (
        f"CASE WHEN length({quoted}) = 4 THEN {quoted} || '-01-01' "
        f"WHEN length({quoted}) = 7 THEN {quoted} || '-01' ELSE {quoted} END"
    )
    if fhir_type == "date":
        return f"TRY_CAST(left({padded}, 10) AS DATE)"
    return (
        f"CASE WHEN length({quoted}) <= 10 THEN TRY_CAST(({padded}) || ' 00:00:00+00' AS "
        f"TIMESTAMPTZ) ELSE {instant_sql(quoted)} END"
    )


# A leap second (R4's time and instant take ``:60``), which a TIMESTAMPTZ cannot hold: read as
# the last microsecond of its minute, after every instant of the second before and on its own day
_LEAP_SECOND = r"T(\d\d:\d\d):60(\.\d+)?"
_IN_LEAP_SECOND = r"T\1:59.999999"


def instant_sql(text: str) -> str:
    """SQL for the instant a FHIR dateTime or instant with a time (the SQL expression ``text``)
    stands for, as TIMESTAMPTZ; NULL when it is not one. Its offset is applied, so values
    written in other zones compare as the moments they are (as text, ``10:00:00+05:00`` sorts
    after ``06:00:00Z``, an hour later); one without an offset is read as UTC, never in the
    server's time zone. A leap second (``23:59:60``) is the last microsecond before the next
    minute (``23:59:59.999999``), not NULL: a version updated in it would rank as undated."""
    read = (
        f"CASE WHEN contains({text}, ':60') THEN regexp_replace({text}, '{_LEAP_SECOND}', "
        f"'{_IN_LEAP_SECOND}') ELSE {text} END"
    )
    return (
        f"TRY_CAST(({read}) || CASE WHEN regexp_matches({text}, '(Z|[+-]\\d\\d:\\d\\d)$') "
        "THEN '' ELSE '+00:00' END AS TIMESTAMPTZ)"
    )


def _select_sql(columns: list[ViewColumn]) -> str:
    parts = []
    for c in columns:
        target = _DUCKDB_TYPES.get(c.type or "", "VARCHAR")
        if target in ("DATE", "TIMESTAMPTZ") and not c.collection:
            parts.append(f'{_date_sql(c.name, c.type or "")} AS "{c.name}"')
        elif target in ("DATE", "TIMESTAMPTZ"):
            parts.append(f'TRY_CAST("{c.name}" AS {target}[]) AS "{c.name}"')
        else:
            parts.append(f'"{c.name}"')
    return ", ".join(parts)


def iter_view_batches(
    view: ViewDefinition, resources: Iterable[dict[str, Any]], batch_rows: int = 50_000
) -> Iterator[pa.RecordBatch]:
    """The view's rows as Arrow record batches (dates still text)."""
    schema = pa.schema([(c.name, _arrow_type(c)) for c in view.columns])
    buffers: dict[str, list[Any]] = {c.name: [] for c in view.columns}
    count = 0
    for row in view.run(resources):
        for c in view.columns:
            buffers[c.name].append(_cell(c, row[c.name]))
        count += 1
        if count >= batch_rows:
            yield pa.RecordBatch.from_pydict(buffers, schema=schema)
            buffers = {c.name: [] for c in view.columns}
            count = 0
    if count:
        yield pa.RecordBatch.from_pydict(buffers, schema=schema)


def write_view_table(
    con: duckdb.DuckDBPyConnection,
    view: ViewDefinition,
    resources: Iterable[dict[str, Any]],
    table: str,
    parquet: Path | None = None,
    batch_rows: int = 50_000,
) -> int:
    """Replace ``table`` (optionally schema-qualified) with the view's rows in the declared
    types, streaming Arrow batches; optionally also write it as a Parquet file. Returns the
    number of rows."""
    if "." in table:
        schema_name = table.split(".", 1)[0]
        con.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema_name}"')
    columns_sql = ", ".join(f'"{c.name}" {duckdb_type(c)}' for c in view.columns)
    staging = f"{table}__building"
    con.execute(f"DROP TABLE IF EXISTS {staging}")
    con.execute(f"CREATE TABLE {staging} ({columns_sql})")
    select = _select_sql(view.columns)
    rows = 0
    try:
        for batch in iter_view_batches(view, resources, batch_rows):
            con.register("view_batch", batch)
            try:
                con.execute(f"INSERT INTO {staging} SELECT {select} FROM view_batch")
            finally:
                con.unregister("view_batch")
            rows += batch.num_rows
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"ALTER TABLE {staging} RENAME TO {table.split('.')[-1]}")
    except BaseException:
        con.execute(f"DROP TABLE IF EXISTS {staging}")
        raise
    if parquet is not None:
        parquet.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=parquet.parent, suffix=".parquet.tmp", delete=False
        ) as tmp:
            tmp_path = Path(tmp.name)
        con.execute(f"COPY {table} TO '{tmp_path}' (FORMAT PARQUET)")
        tmp_path.replace(parquet)
    return rows


def iter_fhir_resources(
    path: Path, skipped: Counter[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Resources of a FHIR file (Bundle entries or a single resource; JSON, NDJSON, .gz) or of
    every such file in a folder and its subfolders, streamed. Records that are not JSON
    objects are skipped here (this reads files for one-off view runs, not for ingest), and
    counted in ``skipped`` when given (``skipped["not_json_object"]``)."""
    from fhirlake.readers import iter_records, list_batch_files

    folders = [path]
    if path.is_dir():
        folders += sorted(p for p in path.rglob("*") if p.is_dir())
    for folder in folders:
        files, _ = list_batch_files(folder)
        for source in files:
            for record in iter_records(source):
                try:
                    obj = orjson.loads(record.raw or b"")
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    yield obj
                elif skipped is not None:
                    skipped["not_json_object"] += 1
