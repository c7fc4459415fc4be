"""Another process with the warehouse open, as a pipeline run has it: DuckDB's file lock is per
process, so a second connection in the test's own process would share the first's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_HOLD = (
    "import sys, time, duckdb; con = duckdb.connect(sys.argv[1]); print('open', flush=True); "
    "time.sleep(float(sys.argv[2])); con.close()"
)


def hold_open(path: Path, seconds: float) -> subprocess.Popen[str]:
    """A process with the warehouse at ``path`` open for writing for ``seconds``; returned once
    it has it open."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
    return holder
