"""``ehr features list / describe / entities`` against a real registry over crafted tables."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.features.feast_store import FEAST_DATA_ENV, FEATURES_DIR_ENV, apply_repo
from pipelines.features.tables import FEAST_TTL_DAYS, build_feature_tables
from tests.pipelines.features.crafted import A, B, D, crafted_rows, write_views


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    saved = {k: os.environ.get(k) for k in (FEAST_DATA_ENV, FEATURES_DIR_ENV)}
    root = tmp_path_factory.mktemp("work")
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    write_views(con, crafted_rows())
    build_feature_tables(con, root / "features")
    con.close()
    apply_repo("feature_repo", root / "feast", root / "features")
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_list_names_types_and_units(workdir: Path) -> None:
    result = CliRunner().invoke(main, ["features", "list", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    age = next(line for line in lines if line.startswith("patient_demographics:age_years"))
    assert "Int64" in age and "years" in age
    hba1c = next(line for line in lines if line.startswith("patient_labs_vitals:hba1c_latest"))
    assert "Float64" in hba1c and "%" in hba1c
    assert lines[-1].endswith("features") and int(lines[-1].split()[0]) > 60


def test_describe_feature_and_view(workdir: Path) -> None:
    runner = CliRunner()
    one = runner.invoke(
        main, ["features", "describe", "prior_inpatient_stays_30d", "--workdir", str(workdir)]
    )
    assert one.exit_code == 0, one.output
    assert "discharged at T" in one.output and "views.encounter" in one.output
    # the README's example says what a feature's description gives: its TTL too (the view's)
    assert f"TTL {FEAST_TTL_DAYS} days" in one.output
    view = runner.invoke(
        main, ["features", "describe", "patient_comorbidities", "--workdir", str(workdir)]
    )
    assert (
        view.exit_code == 0 and "recorded_date" in view.output and "charlson_index" in view.output
    )
    missing = runner.invoke(main, ["features", "describe", "nope", "--workdir", str(workdir)])
    assert missing.exit_code != 0 and "no feature" in missing.output


def test_entities_are_released_and_not_opted_out(workdir: Path) -> None:
    result = CliRunner().invoke(main, ["features", "entities", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert result.output.split() == sorted([A, B, D])  # C opted out
    count = CliRunner().invoke(main, ["features", "entities", "--count", "--workdir", str(workdir)])
    assert count.output.strip() == "3"


def test_missing_registry_says_what_to_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["features", "list", "--workdir", str(tmp_path)])
    assert result.exit_code != 0 and "ehr run" in result.output


def test_entities_name_a_missing_warehouse(tmp_path: Path) -> None:
    """Without a warehouse (a mistyped --workdir) the command ended in DuckDB's traceback."""
    result = CliRunner().invoke(main, ["features", "entities", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert f"no warehouse at {tmp_path / 'warehouse.duckdb'}" in result.output
