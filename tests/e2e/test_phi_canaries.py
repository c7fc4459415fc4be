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


def test_letters_encoded_data_spells_in_live_storage_are_chance_a_freed_page_is_not(
    tmp_path: Path,
) -> None:
    """A name spelt by the bytes of an encoded value (here an integer stored uncompressed,
    elsewhere a compressed string's codes) in a block of live table storage, while no live
    value holds it, is chance. A name a live value holds is found, and so is one left in a
    page a dropped table freed: no live value holds it, and no live segment uses its block."""
    root = tmp_path / "work"
    root.mkdir()
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    con.execute("PRAGMA force_compression='uncompressed'")
    spelt = int.from_bytes(b"\x00zquix\x00\x00", "little")
    con.execute(
        "CREATE TABLE packed AS SELECT CASE WHEN i = 500 THEN ?::BIGINT ELSE i END AS n "
        "FROM range(1000) r(i)",
        [spelt],
    )
    con.execute("CREATE TABLE notes AS SELECT 'seen by Ashdown today' AS note")
    con.execute("CREATE TABLE dropped AS SELECT 'Quennell ' || repeat('x', 300000) AS t")
    con.execute("CHECKPOINT")
    con.execute("DROP TABLE dropped")
    con.execute("CHECKPOINT")
    con.close()
    data = (root / "warehouse.duckdb").read_bytes().lower()
    assert b"zquix" in data and b"quennell" in data  # all three are in the file's bytes
    assert scan_for_canaries(root, {"Zquix", "Ashdown", "Quennell"}) == {
        "warehouse.duckdb": ["ashdown", "quennell"]
    }


def test_a_sealed_cache_entry_spelling_a_name_is_discounted_when_it_opens_whole(
    tmp_path: Path, key_file: Path
) -> None:
    """The sealed cache's parts are ciphertexts too (the release canaries, sealed between
    runs): a name their bytes spell is discounted once the entry opens with the keyring, and
    still counts when it does not (its state relabelled)."""
    from vault.sealed_cache import write_entry

    root = tmp_path / "work"
    con = warehouse.connect(root / "warehouse.duckdb")
    provider = FileKeyProvider.load(key_file)
    for counter in range(10_000):
        nonce = counter.to_bytes(NONCE_BYTES, "big")
        write_entry(
            con,
            provider,
            "things",
            "s1",
            b"x" * 1000,
            random_bytes=lambda n, v=nonce: v if n == NONCE_BYTES else bytes(n),
        )
        ((part,),) = con.execute("SELECT sealed FROM sealed_cache").fetchall()
        header = len(SEALED_FORMAT) + KEY_ID_BYTES + NONCE_BYTES
        words = [
            w for w in _words(bytes(part)[header:]) if w not in _words(bytes(part)[: header + 8])
        ]
        if words:
            break
    else:
        raise AssertionError("no nonce gave a sealed entry holding a word")
    con.close()
    word = words[0]
    assert scan_for_canaries(root, {word}) == {"warehouse.duckdb": [word]}
    proven = ciphertexts_spelling_canaries(root / "warehouse.duckdb", key_file, {word})
    assert proven == {bytes(part)}
    assert scan_for_canaries(root, {word}, ciphertexts=proven) == {}
    con = warehouse.connect(root / "warehouse.duckdb")
    con.execute("UPDATE sealed_cache SET state = 's2'")  # relabelled: it no longer opens
    con.close()
    assert ciphertexts_spelling_canaries(root / "warehouse.duckdb", key_file, {word}) == set()
