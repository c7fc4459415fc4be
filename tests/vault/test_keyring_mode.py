"""A keyring file its group or others may read or write is refused, naming its path, its mode
and the chmod that fixes it, and nothing is changed; the owner's own modes are accepted."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from vault.errors import KeyFilePermissionError
from vault.keys import FileKeyProvider, init_keyring, migrate_audit_key, write_keyring

OPEN_MODES = [0o644, 0o640, 0o660, 0o604, 0o620]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _refused(path: Path, mode: int, action: Callable[[], object]) -> None:
    """``action`` on the keyring at ``path`` (made ``mode``) is refused, naming the path, the
    mode and the chmod, and neither the keyring nor its mode changes."""
    path.chmod(mode)
    before = path.read_bytes()
    with pytest.raises(KeyFilePermissionError) as info:
        action()
    message = str(info.value)
    assert str(path) in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert path.read_bytes() == before and _mode(path) == mode


@pytest.mark.parametrize("mode", OPEN_MODES, ids=lambda m: f"{m:04o}")
def test_a_keyring_open_to_group_or_others_is_refused_until_made_private(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "keys" / "keyring.json"
    init_keyring(path)
    _refused(path, mode, lambda: FileKeyProvider.load(path))
    _refused(path, mode, lambda: init_keyring(path))  # an existing keyring is checked too
    path.chmod(0o600)
    assert FileKeyProvider.load(path).active_kek_id().startswith("kek-")


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=lambda m: f"{m:04o}")
def test_owner_only_modes_are_accepted_and_a_group_bit_is_not(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keyring.json"
    init_keyring(path)
    path.chmod(mode)
    provider = FileKeyProvider.load(path)
    assert provider.active_kek_id() in provider.kek_ids()
    assert _mode(path) == mode
    _refused(path, mode | 0o040, lambda: FileKeyProvider.load(path))


def test_writers_of_the_keyring_refuse_it_and_write_nothing(tmp_path: Path) -> None:
    """Registering a warehouse and adding an audit key read the keyring again before they
    write it: a keyring opened up meanwhile is refused there too, and left as it was."""
    path = tmp_path / "keyring.json"
    init_keyring(path)
    provider = FileKeyProvider.load(path)
    _refused(path, 0o644, lambda: provider.register_warehouse("wh-1", tmp_path / "w.duckdb"))
    path.chmod(0o600)
    document = json.loads(path.read_text())
    del document["audit_key"]  # a keyring from before the audit key
    write_keyring(path, document)
    _refused(path, 0o640, lambda: migrate_audit_key(path))
    assert "audit_key" not in json.loads(path.read_text())
