from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vault import keys
from vault.errors import InvalidCiphertext, KeyMaterialError
from vault.keys import (
    EnvKeyProvider,
    FileKeyProvider,
    WrappedKey,
    init_keyring,
    load_key_provider,
    write_keyring,
)


def counter_bytes(start: int = 0):
    state = {"n": start}

    def random_bytes(n: int) -> bytes:
        out = bytes((state["n"] + i) % 256 for i in range(n))
        state["n"] += n
        return out

    return random_bytes


def fixed_clock() -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC)


def test_init_keyring_is_private_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "k" / "keyring.json"
    assert init_keyring(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    assert init_keyring(path) is False
    assert path.read_bytes() == before


def test_keyring_is_deterministic_with_injected_randomness(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    init_keyring(a, random_bytes=counter_bytes(), clock=fixed_clock)
    init_keyring(b, random_bytes=counter_bytes(), clock=fixed_clock)
    assert a.read_bytes() == b.read_bytes()
    doc = json.loads(a.read_text())
    kek = base64.b64decode(doc["keks"][doc["active_kek"]]["key"])
    assert kek == bytes(range(32))


def test_wrap_unwrap_round_trip_and_context_binding(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    init_keyring(path)
    provider = FileKeyProvider.load(path)
    data_key = bytes(range(32))
    wrapped = provider.wrap(data_key, b"owner-a")
    assert wrapped.kek_id == provider.active_kek_id()
    assert provider.unwrap(wrapped, b"owner-a") == data_key
    with pytest.raises(InvalidCiphertext):
        provider.unwrap(wrapped, b"owner-b")
    tampered = WrappedKey(wrapped.kek_id, wrapped.blob[:-1] + bytes([wrapped.blob[-1] ^ 1]))
    with pytest.raises(InvalidCiphertext):
        provider.unwrap(tampered, b"owner-a")


def test_wrong_kek_cannot_unwrap(tmp_path: Path) -> None:
    init_keyring(tmp_path / "one.json")
    init_keyring(tmp_path / "two.json")
    one = FileKeyProvider.load(tmp_path / "one.json")
    two = FileKeyProvider.load(tmp_path / "two.json")
    wrapped = one.wrap(b"\x01" * 32, b"ctx")
    with pytest.raises(KeyMaterialError, match="not available"):
        two.unwrap(wrapped, b"ctx")
    # same id, different key material: authentication must fail
    forged = WrappedKey(two.active_kek_id(), wrapped.blob)
    with pytest.raises(InvalidCiphertext):
        two.unwrap(forged, b"ctx")


def test_env_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EHR_KEK", base64.b64encode(b"k" * 32).decode())
    monkeypatch.setenv("EHR_PSEUDONYM_KEY", base64.b64encode(b"p" * 32).decode())
    provider = load_key_provider()
    assert isinstance(provider, EnvKeyProvider)
    assert provider.active_kek_id().startswith("env-")
    assert provider.pseudonym_key() == b"p" * 32


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EHR_KEK": "not base64!"}, "must both be set"),
        ({"EHR_KEK": "not base64!", "EHR_PSEUDONYM_KEY": "AAAA"}, "not valid base64"),
        ({"EHR_KEK": base64.b64encode(b"short").decode(), "EHR_PSEUDONYM_KEY": "AAAA"}, "32 bytes"),
    ],
)
def test_env_provider_rejects_bad_material(env: dict[str, str], message: str) -> None:
    with pytest.raises(KeyMaterialError, match=message):
        EnvKeyProvider.from_environ(env)


def test_a_pseudonym_key_alone_in_the_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``EHR_PSEUDONYM_KEY`` set without ``EHR_KEK`` (half of the pair): the keys were taken
    from the key file, and the variable silently ignored. ``EHR_KEK`` alone is refused; so is
    this, naming both variables and no key."""
    key_file = tmp_path / "keyring.json"
    init_keyring(key_file)
    pseudonym_key = base64.b64encode(b"p" * 32).decode()
    monkeypatch.delenv("EHR_KEK", raising=False)
    monkeypatch.setenv("EHR_PSEUDONYM_KEY", pseudonym_key)
    with pytest.raises(KeyMaterialError, match="must both be set") as info:
        load_key_provider(key_file)
    assert pseudonym_key not in str(info.value)
    monkeypatch.delenv("EHR_PSEUDONYM_KEY")
    assert isinstance(load_key_provider(key_file), FileKeyProvider)


def test_missing_key_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="ehr keys init"):
        FileKeyProvider.load(tmp_path / "absent.json")


def test_errors_never_contain_key_material(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    init_keyring(path)
    doc = json.loads(path.read_text())
    doc["pseudonym_key"] = doc["pseudonym_key"][:-4]
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyMaterialError) as info:
        FileKeyProvider.load(path)
    assert doc["pseudonym_key"] not in str(info.value)


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_keyring_stays_private_beside_a_stale_world_readable_temp_file(
    tmp_path: Path, no_umask: None
) -> None:
    path = tmp_path / "k" / "keyring.json"
    path.parent.mkdir()
    stale = path.with_name("keyring.json.tmp")  # the fixed name both writers once used
    stale.write_text("left over")
    stale.chmod(0o666)
    assert init_keyring(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    document["created"] = "rewritten"
    write_keyring(path, document)  # the rotation's writes go through the same function
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["created"] == "rewritten"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "keyring.json",
        "keyring.json.lock",
        "keyring.json.tmp",
    ]
    assert stale.read_text() == "left over"  # never opened, so never written through


def test_keyring_temp_file_is_new_and_private_before_its_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_umask: None
) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(keys.os, "open", spy)
    path = tmp_path / "keyring.json"
    init_keyring(path)
    write_keyring(path, json.loads(path.read_text()))
    temps = [(name, flags, mode) for name, flags, mode in opened if name.endswith(".tmp")]
    assert len(temps) == 2 and temps[0][0] != temps[1][0]  # a fresh name every time
    for _, flags, mode in temps:
        assert flags & os.O_CREAT and flags & os.O_EXCL and not flags & os.O_TRUNC
        assert mode == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == ["keyring.json"]


def test_a_failed_keyring_write_keeps_the_old_keyring_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keyring.json"
    init_keyring(path)
    before = path.read_bytes()

    def power_cut(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(keys.os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        write_keyring(path, {"format": "anything"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == ["keyring.json"]


def test_key_file_errors_name_the_path_looked_at(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "keyring.json"
    with pytest.raises(KeyMaterialError, match=str(missing)):
        FileKeyProvider.load(missing)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    garbage.chmod(0o600)  # a keyring open to others is refused before it is read
    with pytest.raises(KeyMaterialError, match=str(garbage)) as info:
        FileKeyProvider.load(garbage)
    assert "unreadable or not JSON" in str(info.value)
    assert "not json" not in str(info.value)  # the path, never the content
