"""PHI canaries taken from input files: the strings no file written by the platform may hold."""

from __future__ import annotations

import gzip
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson

from vault.errors import VaultError
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer
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
    """The vault's stored ciphertexts (sealed records, wrapped data keys) whose bytes happen to
    spell a canary, each proven a ciphertext by opening it with the keyring.

    AES-GCM output is random bytes, and some 12 MB of it spells a five-letter name now and then.
    A plaintext kept where a ciphertext belongs does not open, so it is never among these."""
    pattern = _pattern(canaries, whole_words=False)
    if pattern is None:
        return set()
    proven: set[bytes] = set()
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        keys = DataKeyStore(con, FileKeyProvider.load(key_file))
        for query, prove in _STORED_CIPHERTEXTS:
            for blob, needed in con.execute(query).fetchall():
                if not pattern.search(_as_text(blob)):
                    continue
                try:
                    prove(keys, bytes(blob), bytes(needed))
                except VaultError:  # not a ciphertext of this vault: its hits stand
                    continue
                proven.add(bytes(blob))
    finally:
        con.close()
    return proven


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
        data = path.read_bytes()
        for blob in ciphertexts:
            data = data.replace(blob, bytes(len(blob)))
        text = _as_text(data)
        released = path.suffix in (".duckdb", ".wal", ".parquet")
        pattern = everywhere if released else with_dates
        if pattern is None:
            continue
        found = sorted({m.group(0) for m in pattern.finditer(text)})
        if found:
            hits[str(path.relative_to(root))] = found[:5]
    return hits
