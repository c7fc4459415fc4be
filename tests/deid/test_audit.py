from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deid.audit import AuditLog


def fixed() -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC)


def log(tmp_path: Path, key: bytes = b"a" * 32) -> AuditLog:
    return AuditLog(tmp_path / "audit.log", key, clock=fixed)


def filled(tmp_path: Path) -> AuditLog:
    audit = log(tmp_path)
    for i in range(4):
        audit.append("reidentify", f"p{i}", f"ticket {i}", {"found": True}, actor="officer")
    return audit


def lines(audit: AuditLog) -> list[str]:
    return audit.path.read_text().splitlines()


def test_chain_verifies_and_is_deterministic(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    assert audit.verify().ok and audit.verify().entries == 4
    other = filled(tmp_path / "again")
    assert lines(audit) == lines(other)
    assert json.loads(lines(audit)[1])["prev"] == json.loads(lines(audit)[0])["mac"]


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda ls: [ls[0], ls[1].replace("ticket 1", "ticket 9"), *ls[2:]], "mac mismatch"),
        (lambda ls: [ls[0], *ls[2:]], "out of order"),
        (lambda ls: [ls[1], ls[0], *ls[2:]], "chain broken"),
        (lambda ls: ls[:-1], "truncated"),
    ],
)
def test_edits_removals_reorders_and_truncation_are_detected(
    tmp_path: Path, tamper, problem: str
) -> None:
    audit = filled(tmp_path)
    audit.path.write_text("\n".join(tamper(lines(audit))) + "\n")
    result = audit.verify()
    assert not result.ok
    assert any(problem in p for p in result.problems), result.problems


def test_wrong_key_fails_every_mac(tmp_path: Path) -> None:
    filled(tmp_path)
    result = log(tmp_path, b"b" * 32).verify()
    assert sum("mac mismatch" in p for p in result.problems) == 4


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        AuditLog(tmp_path / "a.log", b"short")
    with pytest.raises(ValueError, match="action"):
        log(tmp_path).append("", "x")
