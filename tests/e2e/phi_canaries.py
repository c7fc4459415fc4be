"""PHI canaries taken from input files: the strings no file written by the platform may hold."""

from __future__ import annotations

import gzip
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson

from vault.catalog import has_table
from vault.errors import VaultError
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer
from vault.sealed_cache import SEALED_CACHE_TABLE, read_entry
from vault.sealing import DataKeyStore

MIN_LEN = 5  # shorter strings (e.g. "Ann", a ZIP) appear by chance in binary files


def _resources(path: Path) -> Iterator[dict[str, Any]]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    data = data.removeprefix(b"\xef\xbb\xbf")
    if path.name.endswith((".ndjson", ".ndjson.gz")):
        for line in data.splitlines():
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj
        return
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(obj, dict) and obj.get("resourceType") == "Bundle":
        for entry in obj.get("entry") or []:
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                yield entry["resource"]
    elif isinstance(obj, dict):
        yield obj


def patient_canaries(folder: Path) -> set[str]:
    """Names, identifier values, address lines, phone numbers, emails and resource ids of
    every Patient in the input."""
    found: set[str] = set()
    for path in folder.rglob("*"):
        if not path.is_file() or not path.name.endswith((".json", ".ndjson", ".gz")):
            continue
        for resource in _resources(path):
            if resource.get("resourceType") != "Patient":
                continue
            found.add(str(resource.get("id", "")))
            for name in resource.get("name") or []:
                found.update(str(n) for n in name.get("given") or [])
                found.add(str(name.get("family", "")))
            for ident in resource.get("identifier") or []:
                found.add(str(ident.get("value", "")))
            for addr in resource.get("address") or []:
                found.update(str(line) for line in addr.get("line") or [])
            for telecom in resource.get("telecom") or []:
                found.add(str(telecom.get("value", "")))
    return {c for c in found if len(c) >= MIN_LEN}


def patient_birth_dates(folder: Path) -> dict[str, str]:
    """Full birth date of every Patient in the input, by resource id."""
    found: dict[str, str] = {}
    for path in folder.rglob("*"):
        if not path.is_file() or not path.name.endswith((".json", ".ndjson", ".gz")):
            continue
        for resource in _resources(path):
            birth = resource.get("birthDate")
            if resource.get("resourceType") == "Patient" and isinstance(birth, str):
                if len(birth) == 10:
                    found[str(resource.get("id", ""))] = birth
    return found


def released_birth_date_leaks(workdir: Path, key_file: Path, births: dict[str, str]) -> list[str]:
    """Pseudonyms of patients whose released Patient still carries the original birth date.

    Shifted dates are still dates: one patient's shifted visit can land on another patient's
    birthday, so a byte scan of the warehouse cannot tell a leak from chance. The check that
    can is per patient: the released birthDate of that very patient must differ."""
    pseudo = Pseudonymizer(FileKeyProvider.load(key_file).pseudonym_key())
    by_pseudonym = {pseudo.resource_key("Patient", pid): birth for pid, birth in births.items()}
    con = duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT patient_id, resource->>'birthDate' FROM deid_resources "
            "WHERE resource_type = 'Patient'"
        ).fetchall()
    finally:
        con.close()
    return [pid for pid, birth in rows if birth is not None and by_pseudonym.get(pid) == birth]


def _pattern(
    canaries: set[str] | frozenset[str], whole_words: bool = True
) -> re.Pattern[str] | None:
    if not canaries:
        return None
    words = "|".join(sorted((re.escape(c.casefold()) for c in canaries), key=len, reverse=True))
    if not whole_words:
        return re.compile(words)
    # whole words: a given name such as "Erica" inside "American" is not that name
    return re.compile(r"(?<![0-9a-z])(?:" + words + r")(?![0-9a-z])")


def _as_text(data: bytes) -> str:
    return data.decode("utf-8", "replace").casefold()


def _opens(keys: DataKeyStore, sealed: bytes, aad: bytes) -> None:
    keys.open(sealed, aad)


def _unwraps(keys: DataKeyStore, _wrapped: bytes, key_id: bytes) -> None:
    keys.by_id(key_id)


# the vault's ciphertexts, each row (ciphertext, what proving it needs), and how it is proven
_STORED_CIPHERTEXTS = (
    ("SELECT sealed, aad FROM phi_vault UNION ALL SELECT sealed, aad FROM quarantine", _opens),
    ("SELECT wrapped, key_id FROM data_keys WHERE wrapped IS NOT NULL", _unwraps),
)


def ciphertexts_spelling_canaries(
    warehouse: Path, key_file: Path, canaries: set[str]
) -> set[bytes]:
    """The vault's stored ciphertexts (sealed records, wrapped data keys, the parts of sealed
    cache entries) whose bytes happen to spell a canary, each proven a ciphertext by opening it
    with the keyring (a sealed cache entry as a whole).

    AES-GCM output is random bytes, and some 12 MB of it spells a five-letter name now and then.
    A plaintext kept where a ciphertext belongs does not open, so it is never among these."""
    pattern = _pattern(canaries, whole_words=False)
    if pattern is None:
        return set()
    proven: set[bytes] = set()
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        provider = FileKeyProvider.load(key_file)
        keys = DataKeyStore(con, provider)
        for query, prove in _STORED_CIPHERTEXTS:
            for blob, needed in con.execute(query).fetchall():
                if not pattern.search(_as_text(blob)):
                    continue
                try:
                    prove(keys, bytes(blob), bytes(needed))
                except VaultError:  # not a ciphertext of this vault: its hits stand
                    continue
                proven.add(bytes(blob))
        proven |= _sealed_entries_spelling(con, provider, pattern)
    finally:
        con.close()
    return proven


def _sealed_entries_spelling(
    con: duckdb.DuckDBPyConnection, provider: FileKeyProvider, pattern: re.Pattern[str]
) -> set[bytes]:
    """The parts of each sealed cache entry one of whose parts spells a canary, when the entry
    opens whole (:func:`vault.sealed_cache.read_entry`)."""
    if not has_table(con, SEALED_CACHE_TABLE):
        return set()
    proven: set[bytes] = set()
    entries = con.execute(f"SELECT DISTINCT name, state FROM {SEALED_CACHE_TABLE}").fetchall()
    for name, state in entries:
        parts = [
            bytes(blob)
            for (blob,) in con.execute(
                f"SELECT sealed FROM {SEALED_CACHE_TABLE} WHERE name = ? AND state = ? "
                "ORDER BY part",
                [name, state],
            ).fetchall()
        ]
        if not any(pattern.search(_as_text(part)) for part in parts):
            continue
        try:
            opened = read_entry(con, provider, str(name), str(state))
        except VaultError:
            continue
        if opened is not None:
            proven.update(parts)
    return proven


# where DuckDB's blocks start in its file: a file header and two database headers before them
_DUCKDB_HEADERS = 3 * 4096
# ciphertexts are blanked in pieces: DuckDB splits a large value across blocks
_BLANKED_PIECE = 1024


def _blanked(data: bytes, ciphertexts: Collection[bytes]) -> bytes:
    for blob in ciphertexts:
        for start in range(0, len(blob), _BLANKED_PIECE):
            piece = blob[start : start + _BLANKED_PIECE]
            data = data.replace(piece, bytes(len(piece)))
    return data


def _encoded_by_chance(warehouse: Path, data: bytes, found: list[str]) -> set[str]:
    """Of ``found`` (canaries in the warehouse file's bytes), those that no live value holds,
    not even inside a longer word, and every occurrence of which lies in a block of live table
    storage: there they are letters that encoded data (compressed strings' codes, packed
    numbers) spells by chance. A block no live segment uses (freed pages) is never excused, and
    a live value that holds a canary is found by the query itself."""
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        ((block_size,),) = con.execute("SELECT block_size FROM pragma_database_size()").fetchall()
        tables = con.execute("SELECT schema_name, table_name FROM duckdb_tables()").fetchall()
        live: set[int] = set()
        for schema, table in tables:
            live |= {
                int(block)
                for (block,) in con.execute(
                    "SELECT DISTINCT block_id FROM pragma_storage_info(?) WHERE block_id >= 0",
                    [f"{schema}.{table}"],
                ).fetchall()
            }
        excused: set[str] = set()
        for word in found:
            held = any(
                con.execute(
                    f'SELECT count(*) FROM "{schema}"."{table}" x '
                    "WHERE lower(CAST(x AS VARCHAR)) LIKE ?",
                    [f"%{word}%"],
                ).fetchall()[0][0]
                for schema, table in tables
            )
            where = [
                (m.start() - _DUCKDB_HEADERS) // block_size
                for m in re.finditer(re.escape(word.encode()), data, re.IGNORECASE)
            ]
            if not held and where and set(where) <= live:
                excused.add(word)
        return excused
    finally:
        con.close()


def scan_for_canaries(
    root: Path,
    canaries: set[str],
    outside_warehouse: frozenset[str] | set[str] = frozenset(),
    ciphertexts: Collection[bytes] = (),
) -> dict[str, list[str]]:
    """Files under ``root`` holding any canary as a whole word (case-folded), with the first
    hits. The ``outside_warehouse`` canaries (dates) are searched in every file but the
    warehouse and the released tables, which hold shifted dates by design. Where one of the
    proven ``ciphertexts`` lies in a file, its bytes are blanked first: a word that lies
    wholly inside a ciphertext is chance, and a plaintext beside one is still found."""
    everywhere = _pattern(canaries)
    with_dates = _pattern(set(canaries) | set(outside_warehouse))
    hits: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = _blanked(path.read_bytes(), ciphertexts)
        text = _as_text(data)
        released = path.suffix in (".duckdb", ".wal", ".parquet")
        pattern = everywhere if released else with_dates
        if pattern is None:
            continue
        found = sorted({m.group(0) for m in pattern.finditer(text)})
        if found and path.suffix == ".duckdb":
            chance = _encoded_by_chance(path, data, found)
            found = [word for word in found if word not in chance]
        if found:
            hits[str(path.relative_to(root))] = found[:5]
    return hits
