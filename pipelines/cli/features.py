"""``ehr features``: what the Feast registry offers a model builder, and who can be asked about.

Registered on the main ``ehr`` group with ``main.add_command(features)``.

- ``ehr features list``: every feature (``view:name``), its type and unit;
- ``ehr features describe NAME``: type, unit, description, the view's rule (which view columns
  it comes from), TTL and source, for a feature or a whole feature view;
- ``ehr features entities``: the released patients who did not opt out of research (the
  pseudonyms a training set or an online request can name).
"""

from __future__ import annotations

import json
from typing import Any

import click

from pipelines.cli.options import existing_warehouse, workdir_option
from pipelines.workdir import Workdir

WORKDIR_OPTION = workdir_option


def _store(workdir: Workdir) -> Any:
    from pipelines.features.feast_store import FeastRegistryNotFoundError, feature_store

    try:
        return feature_store(None, workdir.feast, workdir.features)
    except FeastRegistryNotFoundError as exc:
        raise click.ClickException(str(exc)) from None


def feature_rows(store: Any) -> list[dict[str, Any]]:
    """One dict per feature of the registry: view, name, type, unit, description, rule."""
    rows = []
    for view in sorted(store.list_feature_views(), key=lambda v: v.name):
        for f in view.features:
            rows.append(
                {
                    "feature": f"{view.name}:{f.name}",
                    "type": str(f.dtype),
                    "unit": (f.tags or {}).get("unit", ""),
                    "description": f.description,
                    "rule": view.tags.get("rule", ""),
                    "table": view.tags.get("table", ""),
                    "ttl_days": view.ttl.days if view.ttl else None,
                }
            )
    return rows


@click.group()
def features() -> None:
    """The feature registry for model builders: list, describe, entities."""


@features.command("list")
@WORKDIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="one JSON object per feature")
def features_list(workdir: Workdir, as_json: bool) -> None:
    """Every feature of the registry with its type and unit."""
    rows = feature_rows(_store(workdir))
    for row in rows:
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(f"{row['feature']:48s} {row['type']:14s} {row['unit']}")
    if not as_json:
        click.echo(f"{len(rows)} features")


@features.command("describe")
@WORKDIR_OPTION
@click.argument("name")
def features_describe(workdir: Workdir, name: str) -> None:
    """NAME: a feature (``view:feature`` or a unique ``feature``) or a feature view."""
    store = _store(workdir)
    rows = feature_rows(store)
    views = {v.name: v for v in store.list_feature_views()}
    if name in views:
        view = views[name]
        click.echo(f"{view.name}: {view.description}")
        click.echo(f"  rule: {view.tags.get('rule', '')}")
        click.echo(f"  table: {view.tags.get('table', '')}; TTL {view.ttl.days} days")
        rows = [r for r in rows if r["feature"].startswith(f"{name}:")]
    else:
        rows = [r for r in rows if name in (r["feature"], r["feature"].split(":", 1)[1])]
        if not rows:
            raise click.ClickException(f"no feature or feature view named {name!r}")
    for row in rows:
        click.echo(f"{row['feature']} ({row['type']}, unit {row['unit'] or '-'})")
        click.echo(f"  {row['description']}")
        click.echo(f"  source: {row['table']} <- {row['rule']}; TTL {row['ttl_days']} days")


@features.command("entities")
@WORKDIR_OPTION
@click.option("--count", is_flag=True, help="print only how many")
def features_entities(workdir: Workdir, count: bool) -> None:
    """Patient pseudonyms of the release who did not opt out of research, one a line."""
    from pipelines.features.cohort import released_cohort

    with existing_warehouse(workdir, read_only=True) as con:
        patients = released_cohort(con)
    if count:
        click.echo(str(len(patients)))
        return
    for patient in patients:
        click.echo(patient)
