"""PHI leak scan of the Feast online store: every stored feature value, read back from SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deid.leakscan import CanarySet, LeakScanResult, scan_rows
from vault.pseudonym import PSEUDONYM_HEX_CHARS


def feature_view_tables(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """(name, quoted name) of the online store's feature view tables (entity_key, feature_name,
    value, ...), one per feature view."""
    out = []
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
        quoted = '"' + table.replace('"', '""') + '"'
        columns = {r[1] for r in db.execute(f"PRAGMA table_info({quoted})")}
        if {"entity_key", "feature_name", "value"} <= columns:
            out.append((table, quoted))
    return out


def _online_rows(db_path: Path) -> Iterator[tuple[str, Any, str | None]]:
    db = sqlite3.connect(db_path)
    try:
        for table, quoted in feature_view_tables(db):
            for key, name, value in db.execute(
                f"SELECT entity_key, feature_name, value FROM {quoted}"
            ):
                # the serialised entity key ends with the patient pseudonym (a string value)
                tail = bytes(key)[-PSEUDONYM_HEX_CHARS:] if key else b""
                patient = tail.decode("ascii", "replace") if tail else None
                text = bytes(value).decode("utf-8", "replace") if value is not None else ""
                yield f"{table}:{name}", [str(name), text], patient
    finally:
        db.close()


def scan_online_store(db_path: Path, canaries: CanarySet) -> LeakScanResult:
    """Every value of every feature view table, as text (protobuf-encoded strings keep their
    UTF-8 bytes), searched for the release canaries."""
    if not Path(db_path).exists():
        return LeakScanResult(canaries=len(canaries))
    return scan_rows(canaries, _online_rows(Path(db_path)))
