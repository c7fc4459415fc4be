"""Value sets kept as FHIR ValueSet JSON in ``fhir/valuesets/``: condition groups (SNOMED CT and
ICD-10-CM), Charlson categories (with their weights) and drug classes (RxNorm).

ICD-10-CM entries are ``is-a`` filters on a category or code, matched as a prefix of the code
without its dot; SNOMED CT and RxNorm entries are exact concepts (no hierarchy is expanded).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import duckdb
import pyarrow as pa

from deid.terminology import ICD10, ICD10CM, Terminology
from pipelines.content import valuesets_dir

VALUESETS_DIR = valuesets_dir()
SNOMED = "http://snomed.info/sct"
# Read against the ICD-10-CM entries of the value sets (``ICD10``, WHO's ICD-10): their ICD codes
# are Quan's ICD-10 categories, which ICD-10-CM keeps with their meaning
ICD10_SYSTEMS = (ICD10CM, ICD10)
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
_EXT = "https://ehr-platform.example.org/fhir/StructureDefinition/"


@dataclass(frozen=True)
class ValueSet:
    """One code group: the feature column it fills and the codes that set it."""

    id: str
    kind: str  # condition | charlson | medication
    column: str
    snomed: frozenset[str]
    icd10_prefixes: frozenset[str]
    rxnorm: frozenset[str]
    charlson_weight: int | None = None

    @staticmethod
    def from_json(resource: dict[str, object]) -> ValueSet:
        extensions = {
            str(e["url"]).removeprefix(_EXT): e
            for e in resource.get("extension", [])  # type: ignore[attr-defined]
        }
        contexts = resource.get("useContext") or [{}]
        kind = contexts[0].get("valueCodeableConcept", {}).get("text", "")  # type: ignore[index]
        snomed: set[str] = set()
        icd: set[str] = set()
        rxnorm: set[str] = set()
        for include in resource["compose"]["include"]:  # type: ignore[index]
            system = include["system"]
            codes = {c["code"] for c in include.get("concept", [])}
            prefixes = {
                f["value"].replace(".", "").upper()
                for f in include.get("filter", [])
                if f.get("op") == "is-a"
            }
            if system == SNOMED:
                snomed |= codes
            elif system == ICD10CM:
                icd |= prefixes | {c.replace(".", "").upper() for c in codes}
            elif system == RXNORM:
                rxnorm |= codes
        weight = extensions.get("charlson-weight-quan-2011", {}).get("valueInteger")
        return ValueSet(
            id=str(resource["id"]),
            kind=str(kind),
            column=str(extensions["feature-column"]["valueString"]),
            snomed=frozenset(snomed),
            icd10_prefixes=frozenset(icd),
            rxnorm=frozenset(rxnorm),
            charlson_weight=int(weight) if weight is not None else None,
        )


def load_valuesets(directory: Path = VALUESETS_DIR) -> list[ValueSet]:
    """Every value set in ``directory``, ordered by id (so feature columns have a stable order)."""
    sets = [ValueSet.from_json(json.loads(p.read_text())) for p in sorted(directory.glob("*.json"))]
    return sorted(sets, key=lambda v: v.id)


@cache
def release_terminology(directory: Path = VALUESETS_DIR) -> Terminology:
    """The displays the release may carry: the OMB race and ethnicity categories and every
    concept the platform's value sets list with a display (terminology's text, never the
    source's)."""
    return Terminology.from_valuesets(
        json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))
    )


def of_kind(valuesets: list[ValueSet], kind: str) -> list[ValueSet]:
    return [v for v in valuesets if v.kind == kind]


_CODE_SCHEMA = pa.schema(
    [
        ("column_name", pa.string()),
        ("system", pa.string()),
        ("code", pa.string()),
        ("is_prefix", pa.bool_()),
    ]
)


def register_lookup_table(
    con: duckdb.DuckDBPyConnection,
    table: str,
    schema: pa.Schema,
    rows: Sequence[tuple[object, ...]],
) -> str:
    """A temporary table ``table`` (a trusted name) of ``rows``, typed by ``schema``: the small
    lookup tables the feature SQL joins on. One Arrow table inserted at once: row by row, an
    ``executemany`` costs a statement per row (~0.2 s per build for the value sets), on every
    cursor of a refresh's five feature pieces."""
    columns = [[row[i] for row in rows] for i in range(len(schema))]
    name = f"_{table}_rows"
    con.register(name, pa.table(columns, schema=schema))
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM {name}")
    finally:
        con.unregister(name)
    return table


def register_code_table(
    con: duckdb.DuckDBPyConnection, valuesets: list[ValueSet], table: str = "valueset_codes"
) -> str:
    """A temporary table ``(column_name, system, code, is_prefix)`` the feature SQL joins on."""
    rows: list[tuple[object, ...]] = []
    for v in valuesets:
        rows += [(v.column, SNOMED, c, False) for c in sorted(v.snomed)]
        rows += [(v.column, ICD10CM, p, True) for p in sorted(v.icd10_prefixes)]
        rows += [(v.column, RXNORM, c, False) for c in sorted(v.rxnorm)]
    return register_lookup_table(con, table, _CODE_SCHEMA, rows)
