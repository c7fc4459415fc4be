"""``ehr views``: run one SQL-on-FHIR ViewDefinition over FHIR files, or a conformance suite.

Registered on the main ``ehr`` group with ``main.add_command(views)``.

``ehr views test`` exits non-zero only when a case *not* tagged ``experimental`` fails: the
experimental cases exercise draft parts of the specification that implementers are not yet
required to support (the official reference runner reports them without failing the build),
and every failure is still listed and recorded in the report.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click


@click.group()
def views() -> None:
    """SQL-on-FHIR v2 ViewDefinitions: run one over FHIR files, or run a conformance suite."""


@views.command("run")
@click.argument("view_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.argument("input_path", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--out",
    "out_file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="output file: .csv or .parquet (chosen by the extension)",
)
def views_run(view_file: Path, input_path: Path, out_file: Path) -> None:
    """Run VIEW_FILE over INPUT_PATH (a FHIR JSON/NDJSON file, Bundle or folder of them)."""
    import duckdb

    from fhirlake.viewdef import (
        ViewDefinitionError,
        iter_fhir_resources,
        load_view,
        write_view_table,
    )

    suffix = out_file.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise click.UsageError("--out must end in .csv or .parquet")
    try:
        view = load_view(view_file)
    except ViewDefinitionError as exc:
        raise click.ClickException(f"invalid ViewDefinition: {exc}") from exc
    skipped: Counter[str] = Counter()
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        try:
            resources = iter_fhir_resources(input_path, skipped)
            rows = write_view_table(con, view, resources, "view_rows")
        except ViewDefinitionError as exc:
            raise click.ClickException(str(exc)) from exc
        out_file.parent.mkdir(parents=True, exist_ok=True)
        fmt = "FORMAT PARQUET" if suffix == ".parquet" else "FORMAT CSV, HEADER"
        target = str(out_file).replace("'", "''")
        con.execute(f"COPY view_rows TO '{target}' ({fmt})")
    finally:
        con.close()
    click.echo(f"{view.name}: {rows} rows -> {out_file}")
    if skipped["not_json_object"]:
        click.echo(f"{skipped['not_json_object']} records skipped: not JSON objects", err=True)


@views.command("test")
@click.argument("suite_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--report",
    "report_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="write the official SQL-on-FHIR test report JSON here",
)
def views_test(suite_dir: Path, report_file: Path | None) -> None:
    """Run an SQL-on-FHIR conformance folder (SUITE_DIR/*.json, or SUITE_DIR/tests/*.json
    when SUITE_DIR is a copy of the suite's repository); print passed/total. Exits non-zero
    when a case not tagged experimental fails, or when no case was found."""
    from fhirlake.viewdef_conformance import run_conformance_cases

    report, results = run_conformance_cases(suite_dir)
    if not results and (suite_dir / "tests").is_dir():
        # the suite's repository keeps its cases in tests/, beside its schema
        suite_dir = suite_dir / "tests"
        report, results = run_conformance_cases(suite_dir)
    if not results:
        raise click.ClickException(
            f"no test case found in {suite_dir} (each file of the suite is a JSON object with "
            "a 'tests' list)"
        )
    if report_file:
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(json.dumps(report, indent=2), encoding="utf-8")
    shareable = [r for r in results if not r.experimental]
    experimental = [r for r in results if r.experimental]
    for r in results:
        if not r.passed:
            kind = "experimental" if r.experimental else "FAIL"
            click.echo(f"{kind} {r.file}: {r.title}: {r.error}", err=True)
    click.echo(
        f"passed {sum(r.passed for r in results)}/{len(results)} "
        f"(shareable {sum(r.passed for r in shareable)}/{len(shareable)}, "
        f"experimental {sum(r.passed for r in experimental)}/{len(experimental)})"
    )
    if not all(r.passed for r in shareable):
        raise SystemExit(1)
