"""An append-only, hash-chained audit log of privacy-relevant acts (re-identification,
erasure, key rotation).

Each JSON line carries the MAC of the line before it and its own HMAC-SHA256 under an audit key
derived (HKDF) from the pseudonym key, so editing, removing or reordering entries breaks the
chain, and forging a consistent chain needs the keys. The head (last sequence number and MAC)
is also kept in a side file, so cutting entries off the end is detected too.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from deid.errors import AuditLogError

GENESIS = "0" * 64
Clock = Callable[[], datetime]


def audit_key(pseudonym_key: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"ehr-audit-log/1").derive(pseudonym_key)


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class AuditVerification:
    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)


class AuditLog:
    """Append and verify; entries name pseudonyms and key ids, never original identifiers."""

    def __init__(self, path: Path, key: bytes, clock: Clock | None = None) -> None:
        if len(key) < 32:
            raise ValueError("audit key must be at least 32 bytes")
        self.path = path
        self.head_path = path.with_name(path.name + ".head")
        self._key = key
        self._clock = clock or (lambda: datetime.now(UTC))

    def _mac(self, entry: dict[str, Any]) -> str:
        body = {k: v for k, v in entry.items() if k != "mac"}
        return hmac.new(self._key, _canonical(body), hashlib.sha256).hexdigest()

    def append(
        self,
        action: str,
        subject: str,
        reason: str = "",
        details: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        if not action:
            raise ValueError("action must not be empty")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # one writer at a time, across processes
            try:
                handle.seek(0)
                lines = [ln for ln in handle.read().splitlines() if ln.strip()]
                last = json.loads(lines[-1]) if lines else None
                entry: dict[str, Any] = {
                    "seq": (last["seq"] + 1) if last else 0,
                    "at": self._clock().isoformat(),
                    "actor": actor or getpass.getuser(),
                    "action": action,
                    "subject": subject,
                    "reason": reason,
                    "details": details or {},
                    "prev": last["mac"] if last else GENESIS,
                }
                entry["mac"] = self._mac(entry)
                handle.seek(0, os.SEEK_END)
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                tmp = self.head_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"seq": entry["seq"], "mac": entry["mac"]}))
                os.replace(tmp, self.head_path)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        except ValueError as exc:
            raise AuditLogError("audit log has a line that is not JSON") from exc

    def verify(self) -> AuditVerification:
        problems: list[str] = []
        try:
            entries = self.entries()
        except AuditLogError as exc:
            return AuditVerification(False, 0, [str(exc)])
        prev = GENESIS
        for position, entry in enumerate(entries):
            seq = entry.get("seq")
            if seq != position:
                problems.append(f"entry {position}: seq {seq} out of order (removed or reordered)")
            if entry.get("prev") != prev:
                problems.append(f"entry {position}: chain broken (removed or reordered)")
            if not hmac.compare_digest(str(entry.get("mac", "")), self._mac(entry)):
                problems.append(f"entry {position}: mac mismatch (edited or forged)")
            prev = str(entry.get("mac", ""))
        if self.head_path.exists():
            head = json.loads(self.head_path.read_text())
            last_seq = entries[-1]["seq"] if entries else -1
            if head.get("seq") != last_seq or (entries and head.get("mac") != entries[-1]["mac"]):
                problems.append(
                    f"head anchor: log ends at seq {last_seq}, anchor says {head.get('seq')} "
                    "(truncated or replaced)"
                )
        elif entries:
            problems.append("head anchor missing")
        return AuditVerification(not problems, len(entries), problems)
