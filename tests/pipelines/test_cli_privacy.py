from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from deid.keys import FileKeyProvider
from deid.pseudonym import Pseudonymizer
from fhirlake.ingest import ingest_batch
from pipelines.cli import main


def test_privacy_commands(tmp_path: Path, key_file: Path) -> None:
    land = tmp_path / "land"
    land.mkdir()
    (land / "p.json").write_text(
        json.dumps({"resourceType": "Patient", "id": "p7", "name": [{"family": "Zed"}]})
    )
    work = tmp_path / "work"
    provider = FileKeyProvider.load(key_file)
    ingest_batch(work / "warehouse.duckdb", "b", land, provider, workers=1)
    pseudonym = Pseudonymizer(provider.pseudonym_key()).resource_key("Patient", "p7")
    runner = CliRunner()
    common = ["--workdir", str(work)]

    found = runner.invoke(main, ["reidentify", pseudonym, "--reason", "ticket 1", *common])
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["name"][0]["family"] == "Zed"
    rotated = runner.invoke(main, ["keys", "rotate", "--key-file", str(key_file), *common])
    assert rotated.exit_code == 0 and "re-wrapped" in rotated.output
    forgot = runner.invoke(main, ["forget", "p7", "--reason", "request", *common])
    assert forgot.exit_code == 0 and json.loads(forgot.output)["data_keys_destroyed"] == 1
    again = runner.invoke(main, ["reidentify", pseudonym, "--reason", "ticket 2", *common])
    assert again.exit_code != 0 and "erased" in again.output
    ok = runner.invoke(main, ["audit", "verify", *common])
    assert ok.exit_code == 0 and "4 entries" in ok.output

    log = work / "audit" / "audit.log"
    log.write_text(log.read_text().replace("ticket 1", "ticket 0"))
    bad = runner.invoke(main, ["audit", "verify", *common])
    assert bad.exit_code == 1 and "mac mismatch" in bad.output
