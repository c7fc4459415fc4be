"""``ehr forget`` after a whole run: nothing of the patient is left in the released tables, the
released Parquet files or the Feast online store."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fhirlake.synthetic import generate
from pipelines.cli import main
from pipelines.erasure import (
    purge_online_store,
    purge_released_parquet,
    purge_released_references,
)
from pipelines.run import run_pipeline
from pipelines.workdir import Workdir
from vault.lifecycle import PSEUDONYM_HEX_CHARS

pytestmark = pytest.mark.e2e


def _holding(workdir: Path, pseudonym: str) -> list[str]:
    needle = pseudonym.encode()
    return sorted(
        str(p.relative_to(workdir))
        for p in workdir.rglob("*")
        if p.is_file() and needle in p.read_bytes()
    )


def test_forget_reaches_parquet_and_the_online_store(tmp_path: Path, key_file: Path) -> None:
    generate(tmp_path / "landing" / "b", 12, seed=4)
    workdir = tmp_path / "work"
    summary = run_pipeline(tmp_path / "landing", workdir, key_file=str(key_file), workers=1)
    assert summary["success"]
    # the folder the warehouse's write-ahead log is written in (with the umask) is private
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    candidates = [
        row[0]
        for row in con.execute(
            "SELECT DISTINCT patient_id FROM features.patient_labs_vitals ORDER BY patient_id"
        ).fetchall()
    ]
    con.close()
    # A pseudonym is found byte for byte only where the file stores it whole: in a column's
    # min/max statistics, or in a page the codec left literal (snappy may turn part of one random
    # hex string into a back-reference to another). Take the first patient that the byte search
    # sees in all three places, so the search after the erasure proves something.
    wanted = {
        "feast/online_store.db",
        "views/observation.parquet",
        "features/patient_labs_vitals.parquet",
    }
    pseudonym = next((p for p in candidates if wanted <= set(_holding(workdir, p))), None)
    assert pseudonym is not None, "no patient's pseudonym is stored whole in every place"

    result = CliRunner().invoke(
        main,
        [
            "forget",
            pseudonym,
            "--pseudonym",
            "--reason",
            "erasure request",
            "--workdir",
            str(workdir),
            "--key-file",
            str(key_file),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[: result.output.rindex("}") + 1])
    assert report["rows_deleted"]["views.patient"] == 1
    assert report["places_failed"] == []
    assert set(report["places"]) == {
        "released_references",
        "released_parquet",
        "feast_online_store",
        "model_training_record",
    }
    assert report["places"]["released_parquet"] > 0 and report["places"]["feast_online_store"] > 0
    # left: the audit entry of the erasure and the tombstone of the destroyed data key
    assert _holding(workdir, pseudonym) == ["audit/audit.log", "warehouse.duckdb"]
    # and decoded, where a codec would hide the bytes from the search above
    decoded = [pq.read_table(parquet) for parquet in sorted(workdir.glob("*/*.parquet"))]
    with_patients = [table for table in decoded if "patient_id" in table.column_names]
    assert len(with_patients) >= 10
    for table in with_patients:
        assert pseudonym not in table.column("patient_id").to_pylist()
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        assert (
            con.execute(
                "SELECT count(*) FROM data_keys WHERE owner = ? AND wrapped IS NOT NULL",
                [pseudonym],
            ).fetchall()[0][0]
            == 0
        )
        for schema, table in con.execute(
            "SELECT schema_name, table_name FROM duckdb_columns() WHERE column_name = 'patient_id'"
        ).fetchall():
            assert (
                con.execute(
                    f'SELECT count(*) FROM "{schema}"."{table}" WHERE patient_id = ?', [pseudonym]
                ).fetchall()[0][0]
                == 0
            ), f"{schema}.{table}"
    finally:
        con.close()
    # idempotent: a re-run finds nothing more to remove
    paths = Workdir(workdir)
    assert purge_released_parquet(paths.released_folders, pseudonym) == 0
    assert purge_online_store(paths.online_store, pseudonym) == 0


def test_purges_refuse_what_is_not_a_pseudonym(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pseudonym"):
        purge_released_parquet((tmp_path,), "x' OR 1=1 --")


def test_references_to_the_erased_patient_leave_other_patients_released_resources(
    tmp_path: Path,
) -> None:
    erased, other = "a" * 32, "b" * 32
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE deid_resources (resource_type VARCHAR, id VARCHAR, "
                "patient_id VARCHAR, batch_id VARCHAR, resource JSON)")  # fmt: skip
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": f"Patient/{other}"},
        "performer": [{"reference": f"Patient/{erased}"}, {"reference": "Practitioner/x"}],
        "focus": [{"reference": f"Patient/{erased}", "display": "kept? no"}],
    }
    con.execute(
        "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
        "VALUES ('Observation', 'o1', ?, 'b', ?::JSON)",
        [other, json.dumps(observation)],
    )
    con.close()
    assert purge_released_references(path, erased) == 2
    assert purge_released_references(path, erased) == 0  # idempotent
    con = duckdb.connect(str(path), read_only=True)
    (text,) = con.execute("SELECT resource::VARCHAR FROM deid_resources").fetchall()[0]
    con.close()
    assert json.loads(text) == {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": f"Patient/{other}"},
        "performer": [{"reference": "Practitioner/x"}],
    }


def test_parquet_purge_is_durable_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewritten file is flushed before it replaces the old one, and the folder (the
    rename) after: a crash once the erasure is recorded cannot bring the patient's rows back."""
    forgotten, kept = "a" * PSEUDONYM_HEX_CHARS, "b" * PSEUDONYM_HEX_CHARS
    path = tmp_path / "patient.parquet"
    pq.write_table(pa.table({"patient_id": [forgotten, kept, forgotten], "x": [1, 2, 3]}), path)
    steps: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, Path.replace

    def fsync(fd: int) -> None:
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(self: Path, target: Path) -> Path:
        steps.append(("rename", str(target)))
        return real_replace(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", replace)
    assert purge_released_parquet((tmp_path,), forgotten) == 2
    assert pq.read_table(path).to_pydict() == {"patient_id": [kept], "x": [2]}
    assert steps == [
        ("fsync", str(path.with_name(path.name + ".erasing"))),
        ("rename", str(path)),
        ("fsync", str(tmp_path)),
    ]


# A feature table's publish as a run makes it, killed (os._exit: no handler runs, as under
# SIGKILL) after its temporary Parquet file is written and before the rename.
_PUBLISH_KILLED_BEFORE_ITS_RENAME = """
import os, sys
from pathlib import Path
from pipelines import publish
from vault import warehouse
real_copy = publish._copy_parquet
def copy_then_die(con, table, path, compression):
    real_copy(con, table, path, compression)
    os._exit(9)
publish._copy_parquet = copy_then_die
con = warehouse.connect(sys.argv[1])
publish.publish_table(con, "features.t", Path(sys.argv[2]), "SELECT * FROM features.t")
"""


def test_forget_removes_what_a_killed_publish_left(tmp_path: Path) -> None:
    """A run killed while publishing a feature table leaves its temporary Parquet file beside
    the published one, with every row of the table, until that table is published again; the
    erasure's purge of the released files removes it, so no file of the workdir keeps the
    patient's rows."""
    import subprocess
    import sys

    from pipelines.publish import publish_table
    from vault import warehouse

    workdir = Workdir(tmp_path / "work")
    workdir.root.mkdir(mode=0o700)
    forgotten, kept = "a" * PSEUDONYM_HEX_CHARS, "b" * PSEUDONYM_HEX_CHARS
    target = workdir.features / "t.parquet"
    con = warehouse.connect(workdir.warehouse)
    publish_table(
        con, "features.t", target, f"SELECT unnest(['{forgotten}', '{kept}']) AS patient_id"
    )
    con.close()
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            _PUBLISH_KILLED_BEFORE_ITS_RENAME,
            str(workdir.warehouse),
            str(target),
        ],
        check=False,
    )
    assert killed.returncode == 9
    (left,) = workdir.features.glob(".t.parquet.*.tmp")
    assert forgotten in pq.read_table(left).column("patient_id").to_pylist()

    (place,) = [p for p in workdir.erasure_plan().places if p.name == "released_parquet"]
    assert place.purge(forgotten) == 1
    assert sorted(p.name for p in workdir.features.iterdir()) == ["t.parquet"]
    assert pq.read_table(target).column("patient_id").to_pylist() == [kept]
    assert _holding(workdir.root, forgotten) == ["warehouse.duckdb"]  # the table's own rows
    con = warehouse.connect(workdir.warehouse, read_only=True)
    try:
        ((rows,),) = con.execute(
            "SELECT count(*) FROM features.t WHERE patient_id = ?", [forgotten]
        ).fetchall()
    finally:
        con.close()
    assert rows == 1  # the warehouse tables are the erasure transaction's, not this place's


# A model fit as the readmission model's step runs it: the warehouse open (read only) from
# before its rows are read until its files, the record of its rows among them, are published.
_FIT_HOLDING_THE_WAREHOUSE = """
import sys, time
from pathlib import Path
import pandas as pd
from pipelines.models.training import write_trained_on
from pipelines.publish import publish_folder
from vault import warehouse
con = warehouse.connect(sys.argv[1], read_only=True)
print("reading", flush=True)
time.sleep(1.5)  # fitting
frame = pd.DataFrame({"patient_id": [sys.argv[3]], "x": [1.0]})
publish_folder(Path(sys.argv[2]), lambda folder: write_trained_on(frame, ["x"], folder))
con.close()
"""


def test_the_training_record_purge_waits_for_a_fit_that_read_the_patient(
    tmp_path: Path,
) -> None:
    """A model refresh read the patient's rows before the erasure and publishes its files
    during it: the erasure's purge of the training record waits for the fit, which holds the
    warehouse open until it has published, and then deletes the record it published, so no
    record naming the patient outlives the erasure."""
    import subprocess
    import sys

    workdir = Workdir(tmp_path / "work")
    workdir.root.mkdir(mode=0o700)
    from vault import warehouse

    warehouse.connect(workdir.warehouse).close()
    pseudonym = "a" * PSEUDONYM_HEX_CHARS
    (place,) = [p for p in workdir.erasure_plan().places if p.name == "model_training_record"]
    fit = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _FIT_HOLDING_THE_WAREHOUSE,
            str(workdir.warehouse),
            str(workdir.models / "readmission"),
            pseudonym,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fit.stdout is not None and fit.stdout.readline().strip() == "reading"
        place.purge(pseudonym)
        assert fit.wait(timeout=60) == 0
    finally:
        fit.kill()
        fit.wait()
    records = list(workdir.models.glob("*/trained_on.parquet"))
    assert [
        r for r in records if pseudonym in pq.read_table(r).column("patient_id").to_pylist()
    ] == []


# A model fit killed (os._exit: as under SIGKILL) while it writes the record of its rows, the
# last file of its set: the folder of the unfinished publish keeps the record's temporary file.
_FIT_KILLED_WRITING_ITS_RECORD = """
import os, sys
from pathlib import Path
import pandas as pd
from pipelines.models.training import write_trained_on
from pipelines.publish import publish_folder
real = pd.DataFrame.to_parquet
def then_die(self, path, *args, **kwargs):
    real(self, path, *args, **kwargs)
    if sys.argv[3] == "kill":
        os._exit(9)
pd.DataFrame.to_parquet = then_die
frame = pd.DataFrame({"patient_id": sys.argv[2].split(","), "x": 1.0})
publish_folder(Path(sys.argv[1]), lambda folder: write_trained_on(frame, ["x"], folder))
"""


def test_the_training_record_purge_reaches_a_fit_killed_while_writing_it(
    tmp_path: Path,
) -> None:
    """The published model was trained without her; a later fit with her rows was killed while
    writing its record, before its set was published. Until another fit is published (none
    need be: the model on disk was not trained with her), its folder keeps that temporary file,
    her pseudonym among its rows. The erasure deletes it."""
    import subprocess
    import sys

    workdir = Workdir(tmp_path / "work")
    workdir.root.mkdir(mode=0o700)
    from vault import warehouse

    warehouse.connect(workdir.warehouse).close()
    forgotten, other = "a" * PSEUDONYM_HEX_CHARS, "b" * PSEUDONYM_HEX_CHARS
    model = workdir.models / "readmission"
    for patients, how in ((other, "publish"), (f"{other},{forgotten}", "kill")):
        fit = subprocess.run(
            [sys.executable, "-c", _FIT_KILLED_WRITING_ITS_RECORD, str(model), patients, how],
            check=False,
        )
        assert fit.returncode == (9 if how == "kill" else 0)
    assert _holding(workdir.root, forgotten) != []

    (place,) = [p for p in workdir.erasure_plan().places if p.name == "model_training_record"]
    assert place.purge(forgotten) == 1
    assert _holding(workdir.root, forgotten) == []
    # the published model's record names only the other patient: it stays
    assert pq.read_table(model / "trained_on.parquet").column("patient_id").to_pylist() == [other]


def test_the_training_record_purge_leaves_the_reason_the_model_is_trained_again(
    tmp_path: Path,
) -> None:
    """The record names her: it goes, and the marker it leaves makes the retrain say why."""
    import pandas as pd

    from pipelines.models.training import TRAINED_ON_ERASED_FILE, write_trained_on
    from pipelines.publish import publish_folder
    from vault import warehouse

    workdir = Workdir(tmp_path / "work")
    workdir.root.mkdir(mode=0o700)
    warehouse.connect(workdir.warehouse).close()
    forgotten, other = "a" * PSEUDONYM_HEX_CHARS, "b" * PSEUDONYM_HEX_CHARS
    model = workdir.models / "readmission"
    frame = pd.DataFrame({"patient_id": [other, forgotten], "x": 1.0})
    publish_folder(model, lambda folder: write_trained_on(frame, ["x"], folder))
    (place,) = [p for p in workdir.erasure_plan().places if p.name == "model_training_record"]
    assert place.purge(forgotten) == 1
    assert not (model / "trained_on.parquet").exists()
    assert (model / TRAINED_ON_ERASED_FILE).is_file()
    assert (model / TRAINED_ON_ERASED_FILE).read_bytes() == b""  # names no one


# One erasure's purge of the released Parquet files as ``ehr forget`` runs it, paused once it
# has written a file's rewrite and before it puts it in the file's place, until the test says go
# (a file) or a few seconds have passed.
_PARQUET_PURGE_PAUSED_BEFORE_ITS_RENAME = """
import sys, time
from pathlib import Path
from pipelines import erasure
from pipelines.workdir import Workdir
real = erasure._replace_durably
def paused(new, path):
    Path(sys.argv[3]).touch()
    deadline = time.monotonic() + 5
    while not Path(sys.argv[4]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    real(new, path)
erasure._replace_durably = paused
(place,) = [p for p in Workdir(Path(sys.argv[1])).erasure_plan().places
            if p.name == "released_parquet"]
print(place.purge(sys.argv[2]), flush=True)
"""


def test_two_erasures_purging_the_released_files_together_both_stick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``ehr forget`` processes purge the same released Parquet file at once: the second
    one read the file before the first had put its rewrite in place. Neither patient's rows
    are in the file afterwards, and both purges succeed. Before, both wrote the same temporary
    file: the first renamed the second's rewrite, which still held the first patient's rows,
    into place and reported success, and the second failed."""
    import subprocess
    import sys

    from pipelines import erasure
    from vault import warehouse

    workdir = Workdir(tmp_path / "work")
    workdir.root.mkdir(mode=0o700)
    warehouse.connect(workdir.warehouse).close()
    first, second, kept = (c * PSEUDONYM_HEX_CHARS for c in "abc")
    workdir.views.mkdir()
    path = workdir.views / "observation.parquet"
    pq.write_table(pa.table({"patient_id": [first, second, kept], "x": [1, 2, 3]}), path)
    paused, go = tmp_path / "paused", tmp_path / "go"
    purge = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _PARQUET_PURGE_PAUSED_BEFORE_ITS_RENAME,
            str(workdir.root),
            first,
            str(paused),
            str(go),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not paused.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        real = erasure._replace_durably

        def after_the_first(new: Path, target: Path) -> None:
            go.touch()
            purge.wait(timeout=60)
            real(new, target)

        monkeypatch.setattr(erasure, "_replace_durably", after_the_first)
        (place,) = [p for p in workdir.erasure_plan().places if p.name == "released_parquet"]
        second_removed = None
        # before: the second's rewrite was gone, renamed into place by the first
        with contextlib.suppress(FileNotFoundError):
            second_removed = place.purge(second)
        out, _ = purge.communicate(timeout=60)
    finally:
        purge.kill()
        purge.wait()
    assert pq.read_table(path).column("patient_id").to_pylist() == [kept]
    assert (purge.returncode, out.strip(), second_removed) == (0, "1", 1)
