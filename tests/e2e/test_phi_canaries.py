"""The byte scan the end-to-end tests rely on: a name spelled by a ciphertext's random bytes is
discounted only when the ciphertext opens with the keyring; every plaintext still counts."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
from phi_canaries import ciphertexts_spelling_canaries, scan_for_canaries

from vault import warehouse
from vault.keys import NONCE_BYTES, FileKeyProvider
from vault.sealing import KEY_ID_BYTES, SEALED_FORMAT, DataKeyStore, seal, sealed_key_id

AAD = b"Patient/p1"
INSERT_SEALED = (
    "INSERT INTO phi_vault VALUES ($key, 'Patient', 'p1', NULL, NULL, 'mac', 'b', 0, $n, $n, "
    "$sealed, $aad)"
)


def _words(data: bytes) -> list[str]:
    """The whole words of five letters or more in ``data``, read as the scan reads bytes."""
    text = data.decode("utf-8", "replace").casefold()
    return re.findall(r"(?<![0-9a-z])[a-z]{5,}(?![0-9a-z])", text)


def _sealed_spelling_a_word(keys: DataKeyStore) -> tuple[bytes, str]:
    """A real ciphertext whose encrypted bytes, read as the scan reads them, hold a whole word
    of five letters or more (nonces are tried in turn: about one in five blobs of 1 kB has one).
    The word lies past the blob's header: the header's random key id is also stored in the
    clear (``data_keys.key_id``, and the unopenable blob the tests copy it into), where a word
    it spells is not inside a ciphertext and rightly still counts."""
    key = keys.for_owner("p1")
    header = len(SEALED_FORMAT) + KEY_ID_BYTES + NONCE_BYTES
    for counter in range(10_000):
        nonce = counter.to_bytes(NONCE_BYTES, "big")
        blob = seal(key, b"{" + b"x" * 1000 + b"}", AAD, random_bytes=lambda _n, v=nonce: v)
        in_header, in_body = set(_words(blob[: header + 8])), set(_words(blob[header:]))
        found = [w for w in _words(blob) if w in in_body and w not in in_header]
        if found:
            return blob, found[0]
    raise AssertionError("no nonce gave a ciphertext holding a word")


def _new_warehouse(root: Path, key_file: Path) -> tuple[duckdb.DuckDBPyConnection, bytes, str]:
    """A new warehouse in ``root``, open; a ciphertext that spells a word, under a data key
    the warehouse stores, and the word."""
    con = warehouse.connect(root / "warehouse.duckdb")
    keys = DataKeyStore(con, FileKeyProvider.load(key_file))
    sealed, word = _sealed_spelling_a_word(keys)
    keys.flush()
    return con, sealed, word


def test_only_words_inside_proven_ciphertexts_are_discounted(
    tmp_path: Path, key_file: Path
) -> None:
    root = tmp_path / "work"
    path = root / "warehouse.duckdb"
    con, sealed, by_chance = _new_warehouse(root, key_file)
    # a plaintext kept where a ciphertext belongs: it has the form of one, but does not open
    unsealed = SEALED_FORMAT + sealed_key_id(sealed) + bytes(12) + b" quennell " + bytes(16)
    con.execute(INSERT_SEALED, {"key": "k1", "n": 1, "sealed": sealed, "aad": AAD})
    con.execute(INSERT_SEALED, {"key": "k2", "n": 2, "sealed": unsealed, "aad": AAD})
    con.execute("CREATE TABLE notes AS SELECT 'seen by Ashdown today' AS note")
    con.close()
    canaries = {by_chance, "Quennell", "Ashdown"}

    # all three are in the file's bytes
    assert scan_for_canaries(root, canaries) == {
        "warehouse.duckdb": sorted({by_chance, "quennell", "ashdown"})
    }
    proven = ciphertexts_spelling_canaries(path, key_file, canaries)
    assert proven == {sealed}
    # the word the ciphertext spells is discounted; both plaintexts still count
    assert scan_for_canaries(root, canaries, ciphertexts=proven) == {
        "warehouse.duckdb": ["ashdown", "quennell"]
    }


def test_a_ciphertext_that_does_not_open_is_not_discounted(tmp_path: Path, key_file: Path) -> None:
    root = tmp_path / "work"
    path = root / "warehouse.duckdb"
    con, sealed, by_chance = _new_warehouse(root, key_file)
    # the same bytes filed under another record: its associated data no longer matches
    con.execute(INSERT_SEALED, {"key": "k1", "n": 1, "sealed": sealed, "aad": b"Patient/p2"})
    con.close()

    assert ciphertexts_spelling_canaries(path, key_file, {by_chance}) == set()
    assert scan_for_canaries(root, {by_chance}) == {"warehouse.duckdb": [by_chance]}
