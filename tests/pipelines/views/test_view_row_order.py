"""The released rows carry no order of the source.

An export lists its patients in an order of its own: Synthea names each file after its patient,
so a folder read by name is in the order of first names, and a Bulk Data export is often in
the order of MRNs. The views were written in the order the release held the resources, which
is the source's: within a k-anonymity group (the same sex and age band), the n-th row was the
n-th person of that group in a list of the population sorted the same way. The views and
``released_patients`` are now written in the order of their pseudonyms, worked out here from
the source ids (the source order computed from the files, the pseudonyms with the key)."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from deid.policy import Policy
from deid.release import build_released_patients, release_canaries
from deid.staging import publish_batch
from fhirlake.synthetic import generate
from fhirlake.viewdef import load_view
from pipelines.views.refresh import refresh_view
from pipelines.views.tables import VIEWS_DIR
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer

TODAY = date(2026, 11, 28)
VIEWS = tuple(load_view(VIEWS_DIR / f"{name}.json") for name in ("patient", "encounter"))


def _landing(tmp_path: Path) -> tuple[Path, Path]:
    """Batch b1 of six generated patients (and their organizations), b2 of two more."""
    generated = tmp_path / "generated"
    generate(generated, 8, seed=5)
    patients = sorted(generated.glob("[0-9]*.json"))
    folders = (tmp_path / "landing" / "b1", tmp_path / "landing" / "b2")
    for folder, files in zip(folders, (patients[:6], patients[6:]), strict=True):
        folder.mkdir(parents=True)
        for path in files:
            shutil.copy(path, folder / path.name)
    for name in ("organizations.json", "practitioners.json"):
        shutil.copy(generated / name, folders[0] / name)
    return folders


def _source_order(folder: Path, pseudo: Pseudonymizer) -> list[str]:
    """The pseudonyms of a batch's patients in the order the source lists them."""
    order = []
    for path in sorted(folder.glob("[0-9]*.json")):
        for entry in orjson.loads(path.read_bytes())["entry"]:
            if entry["resource"]["resourceType"] == "Patient":
                order.append(pseudo.resource_key("Patient", entry["resource"]["id"]))
    return order


def _release(wh: Path, provider: FileKeyProvider, batch: Path, work: Path) -> None:
    """Ingest and de-identify the batch, k-anonymity (k=1), then refresh the views."""
    ingest_batch(wh, batch.name, batch, provider, workers=1)
    con = warehouse.connect(wh)
    try:
        assert publish_batch(con, provider, batch.name, Policy.shipped("research"), today=TODAY)
        canaries = release_canaries(con, provider)
        assert build_released_patients(con, 1, canaries=canaries).published
        for view in VIEWS:
            assert refresh_view(con, view, work, canaries).result.published
    finally:
        con.close()


def _patients_in_order(rows: list[str]) -> list[str]:
    """Each patient once, where their first row stands."""
    return list(dict.fromkeys(rows))


def test_view_rows_and_released_patients_follow_the_pseudonyms_not_the_source(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    wh, work = tmp_path / "w.duckdb", tmp_path / "work"
    pseudo = Pseudonymizer(key_provider.pseudonym_key())
    first, late = _landing(tmp_path)
    source = _source_order(first, pseudo)
    assert source != sorted(source)  # the source's order is not the pseudonyms' by chance
    _release(wh, key_provider, first, work)
    patients = pq.read_table(work / "views" / "patient.parquet").column("patient_id").to_pylist()
    assert patients == sorted(source)  # was the source's order
    encounters = pq.read_table(work / "views" / "encounter.parquet").select(["patient_id", "id"])
    keys = list(zip(*(encounters.column(c).to_pylist() for c in ("patient_id", "id")), strict=True))
    assert keys == sorted(keys)
    # a later batch's rows come after the kept ones, in the order of their pseudonyms too
    _release(wh, key_provider, late, work)
    added = _source_order(late, pseudo)
    patients = pq.read_table(work / "views" / "patient.parquet").column("patient_id").to_pylist()
    assert patients == sorted(source) + sorted(added)
    by_row = pq.read_table(work / "views" / "encounter.parquet").column("patient_id").to_pylist()
    assert _patients_in_order(by_row) == sorted(source) + sorted(added)
    con = warehouse.connect(wh, read_only=True)
    try:
        rows = con.execute("SELECT patient_id FROM released_patients").fetchall()
    finally:
        con.close()
    assert [p for (p,) in rows] == sorted(source + added)
