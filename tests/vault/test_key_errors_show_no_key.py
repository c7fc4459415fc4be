"""Key material sitting where the keyring expects a name or a path (a key pasted into
'active_kek', EHR_KEY_FILE mixed up with EHR_KEK) never reaches an error's text: the message
names the field, the variable or the path looked at, and ordinary ids and paths are still
shown."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import sqlite3
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.resources import KeyProviderResource
from vault.errors import KeyMaterialError
from vault.keys import (
    EnvKeyProvider,
    FileKeyProvider,
    WrappedKey,
    init_keyring,
    refuse_key_shaped_path,
    wrap_retired_kek,
    write_keyring,
)

ORDINARY_ID = "kek-0123456789abcdef"  # the form every KEK id has (kek- and 16 hex digits)

Encoding = Callable[[bytes], str]
ENCODINGS: dict[str, Encoding] = {
    "base64": lambda key: base64.b64encode(key).decode(),
    "hex": lambda key: key.hex(),
}


def _forms(key: bytes) -> list[str]:
    """Every way the key could be written out, whole or the first 16 characters of it."""
    whole = [
        base64.b64encode(key).decode(),
        base64.b64encode(key).decode().rstrip("="),
        base64.urlsafe_b64encode(key).decode(),
        key.hex(),
        key.hex().upper(),
    ]
    return whole + [form[:16] for form in whole]


def assert_no_key(text: str, key: bytes) -> None:
    for form in _forms(key):
        assert form not in text, f"key material ({form!r}) in: {text}"


@pytest.fixture(params=sorted(ENCODINGS))
def planted(request: pytest.FixtureRequest) -> tuple[bytes, str]:
    """A freshly generated 32-byte key and its text (base64 or hex), as pasted by mistake;
    not one whose base64 starts with '/' (as a path, it would name a file at the root)."""
    while True:
        key = secrets.token_bytes(32)
        text = ENCODINGS[request.param](key)
        if not text.startswith("/"):
            return key, text


def _keyring(tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    path = tmp_path / "keys" / "keyring.json"
    init_keyring(path)
    document = json.loads(path.read_text())
    edit(document)
    write_keyring(path, document)
    return path


def _load_error(path: Path) -> str:
    with pytest.raises(KeyMaterialError) as info:
        FileKeyProvider.load(path)
    return str(info.value)


def test_a_key_in_active_kek_is_not_echoed(tmp_path: Path, planted: tuple[bytes, str]) -> None:
    key, text = planted

    def paste(document: dict) -> None:
        document["active_kek"] = text  # the KEK's value where its id goes

    message = _load_error(_keyring(tmp_path / "a", paste))
    assert_no_key(message, key)
    assert "'active_kek'" in message and "not shown" in message

    def unknown_id(document: dict) -> None:
        document["active_kek"] = ORDINARY_ID

    assert f"active KEK '{ORDINARY_ID}' is not in the keyring" in _load_error(
        _keyring(tmp_path / "b", unknown_id)
    )


def test_a_key_used_as_the_active_kek_and_its_name_is_refused(
    tmp_path: Path, planted: tuple[bytes, str]
) -> None:
    """The KEK's value pasted both as 'active_kek' and as its entry's name: it would load, and
    every data key and audit entry would then carry it as the KEK's id, in the clear."""
    key, text = planted

    def rename(document: dict) -> None:
        active = document["active_kek"]
        document["keks"] = {text: document["keks"][active]}
        document["active_kek"] = text

    message = _load_error(_keyring(tmp_path, rename))
    assert_no_key(message, key)
    assert "looks like key material, not a key id" in message


@pytest.mark.parametrize("entry", [{"created": None}, {"key": "not base64!"}, {"key": "AAAA"}])
def test_a_key_as_a_kek_name_is_not_echoed(
    tmp_path: Path, planted: tuple[bytes, str], entry: dict
) -> None:
    """A KEK entry named by a key, its entry broken (no 'key', not base64, too short)."""
    key, text = planted

    def name(kek_id: str) -> Callable[[dict], None]:
        def edit(document: dict) -> None:
            document["keks"][kek_id] = entry

        return edit

    message = _load_error(_keyring(tmp_path / "a", name(text)))
    assert_no_key(message, key)
    assert "'keks'" in message and "not shown" in message
    assert f"'{ORDINARY_ID}'" in _load_error(_keyring(tmp_path / "b", name(ORDINARY_ID)))


def test_a_key_as_a_retired_kek_name_is_not_echoed(
    tmp_path: Path, planted: tuple[bytes, str]
) -> None:
    key, text = planted

    def orphan(kek_id: str) -> Callable[[dict], None]:  # wrapped under a KEK not held
        def edit(document: dict) -> None:
            entry = wrap_retired_kek(kek_id, b"\x33" * 32, "kek-gone", b"\x44" * 32)
            document["retired_keks"] = {kek_id: entry}

        return edit

    def tampered(kek_id: str) -> Callable[[dict], None]:  # under the active KEK, broken
        def edit(document: dict) -> None:
            active = document["active_kek"]
            entry = wrap_retired_kek(kek_id, b"\x33" * 32, active, b"\x44" * 32)
            document["retired_keks"] = {kek_id: entry}

        return edit

    for i, case in enumerate((orphan, tampered)):
        message = _load_error(_keyring(tmp_path / f"key{i}", case(text)))
        assert_no_key(message, key)
        assert "'retired_keks'" in message and "not shown" in message
        assert f"'{ORDINARY_ID}'" in _load_error(_keyring(tmp_path / f"id{i}", case(ORDINARY_ID)))


def test_a_key_as_a_kek_id_of_a_provider_is_not_echoed(planted: tuple[bytes, str]) -> None:
    """The provider's own checks and its unwrap name the KEK id, never a key standing in it; a
    provider whose KEK is named by a key is not made at all."""
    key, text = planted
    pkey = secrets.token_bytes(32)
    texts: list[str] = []
    with pytest.raises(KeyMaterialError) as short:
        EnvKeyProvider({text: b"short"}, text, pkey)
    texts.append(str(short.value))
    # a provider whose KEK is named by a key is refused when made (nothing is wrapped under it)
    with pytest.raises(KeyMaterialError) as named:
        EnvKeyProvider({text: secrets.token_bytes(32)}, text, pkey)
    texts.append(str(named.value))
    other = EnvKeyProvider({ORDINARY_ID: secrets.token_bytes(32)}, ORDINARY_ID, pkey)
    with pytest.raises(KeyMaterialError) as absent:
        other.unwrap(WrappedKey(text, b"\x00" * 60), b"ctx")
    texts.append(str(absent.value))
    for message in texts:
        assert_no_key(message, key)
        assert "not shown" in message
    with pytest.raises(KeyMaterialError, match=f"KEK '{ORDINARY_ID}' must be 32 bytes"):
        EnvKeyProvider({ORDINARY_ID: b"short"}, ORDINARY_ID, pkey)
    with pytest.raises(KeyMaterialError, match="KEK 'kek-fedcba9876543210' is not available"):
        other.unwrap(WrappedKey("kek-fedcba9876543210", b"\x00" * 60), b"ctx")


def test_a_key_in_ehr_key_file_is_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: tuple[bytes, str]
) -> None:
    """EHR_KEY_FILE holding a key: missing, a file of garbage, a JSON file that is no keyring
    (files named by the key, in the working directory, as a relative path resolves)."""
    key, text = planted
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EHR_KEK", raising=False)
    monkeypatch.setenv("EHR_KEY_FILE", text)
    messages = [_load_error(Path(text))]
    named = tmp_path / text
    named.parent.mkdir(parents=True, exist_ok=True)  # base64 may hold a '/'
    for content in ("{not json", json.dumps({"format": "something else"})):
        named.write_text(content)
        named.chmod(0o600)
        messages.append(_load_error(Path(text)))
    for message in messages:
        assert_no_key(message, key)
        assert "EHR_KEY_FILE" in message and "not shown" in message


@pytest.mark.parametrize(
    "ordinary",
    ["keys.json", "~/.ehr/keyring.json", "/etc/ehr/keyring", "/Users/alice/ehr/keyring"],
)
def test_an_ordinary_key_file_path_is_still_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ordinary: str
) -> None:
    """The same error, with a path there, names it; a key beside it is still hidden."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EHR_KEY_FILE", ordinary)
    message = _load_error(Path(ordinary))
    assert f"no key file at {ordinary};" in message
    key = secrets.token_bytes(32)
    monkeypatch.setenv("EHR_KEY_FILE", base64.b64encode(key).decode())
    hidden = _load_error(Path(base64.b64encode(key).decode()))
    assert_no_key(hidden, key)


@pytest.fixture
def key_in_key_file_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: tuple[bytes, str]
) -> bytes:
    """A key written where the key file's path belongs (EHR_KEY_FILE), no EHR_KEK beside it."""
    key, text = planted
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EHR_KEK", raising=False)
    monkeypatch.setenv("EHR_KEY_FILE", text)
    return key


def test_dagster_resource_names_the_variable_not_the_key(
    tmp_path: Path, key_in_key_file_variable: bytes
) -> None:
    """The resource adds where it looked to a key error (Dagster's event and compute logs)."""
    key = key_in_key_file_variable
    with pytest.raises(KeyMaterialError) as info:
        KeyProviderResource().provider()
    assert_no_key(str(info.value), key)
    assert "looked in: key file [the value of EHR_KEY_FILE" in str(info.value)
    ordinary = tmp_path / "keys" / "keyring.json"
    with pytest.raises(KeyMaterialError, match=f"looked in: key file {ordinary}"):
        KeyProviderResource(key_file=str(ordinary)).provider()


def test_ehr_command_stderr_holds_no_key(tmp_path: Path, key_in_key_file_variable: bytes) -> None:
    key = key_in_key_file_variable
    result = CliRunner().invoke(main, ["audit", "show", "--workdir", str(tmp_path / "work")])
    assert result.exit_code != 0
    assert_no_key(result.output + result.stderr, key)
    assert "EHR_KEY_FILE is not a file path and looks like key material" in result.stderr


def test_keys_init_makes_no_keyring_named_after_a_key(
    tmp_path: Path, key_in_key_file_variable: bytes
) -> None:
    """`ehr keys init` with a key pasted into EHR_KEY_FILE: it made a file named after the key
    and printed "created keyring at <the key>". Now it is refused, naming the variable, and no
    file is made; an ordinary path is still made and shown."""
    key = key_in_key_file_variable
    result = CliRunner().invoke(main, ["keys", "init"])
    assert result.exit_code != 0
    assert_no_key(result.output + result.stderr, key)
    assert "EHR_KEY_FILE" in result.output + result.stderr
    assert [p.name for p in tmp_path.rglob("*")] == []
    ordinary = tmp_path / "keys" / "keyring.json"
    made = CliRunner().invoke(main, ["keys", "init", "--key-file", str(ordinary)])
    assert made.exit_code == 0 and f"created keyring at {ordinary}" in made.output


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda doc: doc["keks"].clear(), "keyring has no 'keks'"),
        (
            lambda doc: doc["keks"][doc["active_kek"]].update(key="not base64!"),
            "is not valid base64",
        ),
        (lambda doc: doc.update(pseudonym_key="c2hvcnQ="), "pseudonym key must be 32 bytes"),
    ],
    ids=["kek-removed", "kek-not-base64", "pseudonym-key-short"],
)
def test_a_hand_edited_keyring_is_named_by_its_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    edit: Callable[[dict[str, object]], object],
    problem: str,
) -> None:
    """An error about a keyring's content names the key file, on stderr as in Dagster's logs,
    and holds none of its keys."""
    key_file = tmp_path / "keys" / "keyring.json"
    init_keyring(key_file)
    document = json.loads(key_file.read_text())
    keys = [entry["key"] for entry in document["keks"].values()]
    keys += [document["pseudonym_key"], document["audit_key"]]
    edit(document)
    write_keyring(key_file, document)
    monkeypatch.delenv("EHR_KEK", raising=False)
    monkeypatch.setenv("EHR_KEY_FILE", str(key_file))
    result = CliRunner().invoke(main, ["audit", "verify", "--workdir", str(tmp_path / "work")])
    assert result.exit_code != 0
    assert f"key file {key_file}: " in result.output
    assert problem in result.output
    for key in keys:
        assert key not in result.output
        assert key[:16] not in result.output


def _stored_text(root: Path) -> bytes:
    """Every file under ``root``, and every cell of its SQLite files (Dagster's run storage),
    zlib-compressed ones (job snapshots) decompressed."""
    texts: list[bytes] = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        texts.append(path.read_bytes())
        if path.suffix != ".db":
            continue
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            listed = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = [table for (table,) in listed.fetchall()]
            for table in tables:
                for row in con.execute(f'SELECT * FROM "{table}"'):
                    for cell in row:
                        if isinstance(cell, str):
                            texts.append(cell.encode())
                        elif isinstance(cell, bytes):
                            texts.append(cell)
                            with contextlib.suppress(zlib.error):
                                texts.append(zlib.decompress(cell))
        finally:
            con.close()
    return b"\n".join(texts)


def test_a_key_given_as_the_key_file_of_a_run_is_stored_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: tuple[bytes, str]
) -> None:
    """`ehr run --key-file <a key>`: the key file becomes the key resource's config, which
    Dagster stores with the run (the job's snapshot). It is refused before any run is made,
    naming the option; an ordinary path is still taken."""
    key, text = planted
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EHR_KEK", raising=False)
    landing = tmp_path / "landing" / "b1"
    landing.mkdir(parents=True)
    (landing / "p.ndjson").write_text('{"resourceType": "Patient", "id": "p1"}\n')
    work = tmp_path / "work"
    result = CliRunner().invoke(
        main, ["run", "--input", str(landing.parent), "--workdir", str(work), "--key-file", text]
    )
    assert result.exit_code != 0
    stored = _stored_text(tmp_path)
    assert key not in stored
    assert_no_key(stored.decode("utf-8", "replace"), key)
    output = result.output + result.stderr
    assert_no_key(output, key)
    assert "--key-file" in output and "looks like key material" in output


def test_a_key_shaped_path_that_names_a_file_is_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path of base64 characters alone that mixes upper-case letters, lower-case letters and
    digits is shaped like a key too: where a file is there, it is taken as the path it is."""
    monkeypatch.chdir(tmp_path)
    keyring = Path("KeysFolder/ehr2026/keyring")
    with pytest.raises(KeyMaterialError, match="looks like key material"):
        refuse_key_shaped_path(keyring, "the key file given (--key-file)")
    keyring.parent.mkdir(parents=True)
    keyring.write_text("{}")
    refuse_key_shaped_path(keyring, "the key file given (--key-file)")


WRAPPINGS = {
    "variable line": "EHR_KEK={}",
    "quoted": '"{}"',
    "keyring line": '"key": "{}",',
    "export": "export EHR_KEK='{}'",
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
def test_a_key_pasted_with_what_surrounded_it_is_refused_and_shown_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: tuple[bytes, str], wrapping: str
) -> None:
    """A key copied with its variable's name, its quotes or its keyring line and given as the
    key file: `ehr keys init` made a keyring named after it and printed it, the other commands
    printed it, and `ehr run` stored it with its run. Now each is refused, naming the option,
    with nothing made; a KEK so named is refused when the keyring is loaded."""
    key, text = planted
    pasted = WRAPPINGS[wrapping].format(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EHR_KEK", raising=False)
    made = CliRunner().invoke(main, ["keys", "init", "--key-file", pasted])
    assert made.exit_code != 0
    assert_no_key(made.output + made.stderr, key)
    assert list(tmp_path.iterdir()) == []
    landing = tmp_path / "landing" / "b1"
    landing.mkdir(parents=True)
    (landing / "p.ndjson").write_text('{"resourceType": "Patient", "id": "p1"}\n')
    run = CliRunner().invoke(
        main, ["run", "--input", str(landing.parent), "--workdir", "work", "--key-file", pasted]
    )
    assert run.exit_code != 0 and "looks like key material" in run.output + run.stderr
    assert_no_key(run.output + run.stderr, key)
    assert key not in _stored_text(tmp_path)
    assert_no_key(_stored_text(tmp_path).decode("utf-8", "replace"), key)
    assert_no_key(_load_error(Path(pasted)), key)

    def named_after_the_key(document: dict) -> None:
        name = "kek-" + text
        document["keks"] = {name: document["keks"][document["active_kek"]]}
        document["active_kek"] = name

    assert "looks like key material" in _load_error(_keyring(tmp_path, named_after_the_key))
