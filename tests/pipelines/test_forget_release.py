"""``ehr forget`` runs the release after the erasure: the people left in the erased patient's
k-anonymity group, when fewer than k remain, are withheld from everything the release
publishes at once (the views, the feature tables and the online store), not at some later
run. The group and who must be withheld are worked out here from ``released_patients`` as it
stood before the erasure."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from fhirlake.synthetic import generate
from pipelines.cli import main
from pipelines.run import run_pipeline

pytestmark = pytest.mark.e2e

K = 2
GROUP = ("age_band", "sex", "zip3", "state", "race", "ethnicity")


def _groups(workdir: Path) -> dict[tuple[str, ...], set[str]]:
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        rows = con.execute(f"SELECT patient_id, {', '.join(GROUP)} FROM released_patients")
        groups: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for patient, *key in rows.fetchall():
            groups[tuple(key)].add(patient)
        return groups
    finally:
        con.close()


def _published(workdir: Path, patient: str) -> dict[str, int]:
    """Where ``patient`` still has rows: views.patient, each feature table, the online store."""
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        found = {
            "views.patient": con.execute(
                "SELECT count(*) FROM views.patient WHERE id = ?", [patient]
            ).fetchall()[0][0]
        }
        tables = con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'features'"
        ).fetchall()
        for (table,) in tables:
            found[f"features.{table}"] = con.execute(
                f"SELECT count(*) FROM features.{table} WHERE patient_id = ?", [patient]
            ).fetchall()[0][0]
    finally:
        con.close()
    online = sqlite3.connect(workdir / "feast" / "online_store.db")
    try:
        tables = online.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        found["online"] = sum(
            online.execute(
                f'SELECT count(*) FROM "{name}" WHERE instr(entity_key, ?) > 0',
                [patient.encode()],
            ).fetchone()[0]
            for (name,) in tables
        )
    finally:
        online.close()
    return found


def test_forget_withholds_the_rest_of_a_group_left_below_k(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # k = 2 and no generalisation (any share may be withheld): groups stay small and exact
    monkeypatch.setenv("EHR_DEID_K", str(K))
    monkeypatch.setenv("EHR_MAX_WITHHELD_SHARE", "1.0")
    generate(tmp_path / "landing" / "b", 40, seed=3)
    workdir = tmp_path / "work"
    assert run_pipeline(tmp_path / "landing", workdir, key_file=str(key_file), workers=1)["success"]
    before = _groups(workdir)
    pairs = [members for members in before.values() if len(members) == K]
    assert pairs, "the cohort has no group of exactly k people to shrink"
    erased, left = sorted(pairs[0])
    assert all(n > 0 for n in _published(workdir, left).values())

    result = CliRunner().invoke(
        main,
        ["forget", erased, "--pseudonym", "--reason", "REQ-1", "--workdir", str(workdir)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[: result.output.rindex("}") + 1])
    assert report["found"]
    assert "release refreshed after the erasure" in result.output
    # the one left of the pair is now alone: withheld, and gone from every published table
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    withheld = {p for (p,) in con.execute("SELECT patient_id FROM withheld_patients").fetchall()}
    con.close()
    assert left in withheld
    assert _published(workdir, left) == dict.fromkeys(_published(workdir, left), 0)
    # every other group is as it was
    after = _groups(workdir)
    kept = {key: members for key, members in before.items() if erased not in members}
    assert after == kept
