"""Envelope encryption for the PHI vault.

Each owner (a patient pseudonym, or ``_shared`` for resources outside any patient compartment)
gets its own random 256-bit data key. Data keys are stored only wrapped by the key provider's
KEK, in the ``data_keys`` table. Records are sealed with AES-256-GCM; the ciphertext starts with
a format byte and the data key's id, so every ciphertext names the key it needs, and the
associated data binds it to the record it belongs to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault.catalog import has_table
from vault.clock import Clock, RandomBytes, utcnow
from vault.errors import InvalidCiphertext, KeyDestroyedError, KeyMaterialError
from vault.keys import KEY_BYTES, NONCE_BYTES, KeyProvider, WrappedKey, shown

SEALED_FORMAT = b"\x01"
KEY_ID_BYTES = 16
_HEADER = len(SEALED_FORMAT) + KEY_ID_BYTES
_TAG_BYTES = 16
SHARED_OWNER = "_shared"
# a data key that still opens its records: not destroyed by an erasure, its wrapped form kept
LIVE_DATA_KEY = "destroyed_at IS NULL AND wrapped IS NOT NULL"

DATA_KEYS_DDL = """
CREATE TABLE IF NOT EXISTS data_keys (
    key_id BLOB PRIMARY KEY,
    owner VARCHAR NOT NULL,
    kek_id VARCHAR NOT NULL,
    wrapped BLOB,
    created_at TIMESTAMPTZ NOT NULL,
    destroyed_at TIMESTAMPTZ
)
"""


@dataclass(frozen=True)
class DataKey:
    """A plaintext data key; lives only in memory."""

    key_id: bytes
    key: bytes

    def __post_init__(self) -> None:
        if len(self.key_id) != KEY_ID_BYTES:
            raise ValueError(f"key id must be {KEY_ID_BYTES} bytes, got {len(self.key_id)}")
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"data key must be {KEY_BYTES} bytes, got {len(self.key)}")

    def __repr__(self) -> str:  # never print key material
        return f"DataKey(key_id={self.key_id.hex()})"

    @property
    def aead(self) -> AESGCM:
        """The cipher for this key, built once: its key schedule costs more than a short seal."""
        cached: AESGCM | None = self.__dict__.get("_aead")
        if cached is None:
            cached = AESGCM(self.key)
            object.__setattr__(self, "_aead", cached)
        return cached


def seal(
    key: DataKey, plaintext: bytes, aad: bytes, random_bytes: RandomBytes = os.urandom
) -> bytes:
    """AES-256-GCM: ``0x01 || key_id || nonce || ciphertext || tag``."""
    nonce = random_bytes(NONCE_BYTES)
    header = SEALED_FORMAT + key.key_id
    return header + nonce + key.aead.encrypt(nonce, plaintext, header + aad)


def sealed_key_id(blob: bytes) -> bytes:
    """The data key id a sealed blob needs."""
    if len(blob) < _HEADER + NONCE_BYTES + _TAG_BYTES or blob[:1] != SEALED_FORMAT:
        raise InvalidCiphertext("not a sealed blob of a known format")
    return blob[1:_HEADER]


def open_sealed(key: DataKey, blob: bytes, aad: bytes) -> bytes:
    """Decrypt and authenticate; any change to the blob or the associated data fails."""
    if sealed_key_id(blob) != key.key_id:
        raise InvalidCiphertext(
            f"blob was sealed under data key {sealed_key_id(blob).hex()}, not {key.key_id.hex()}"
        )
    header, nonce, body = (
        blob[:_HEADER],
        blob[_HEADER : _HEADER + NONCE_BYTES],
        blob[_HEADER + NONCE_BYTES :],
    )
    try:
        return key.aead.decrypt(nonce, body, header + aad)
    except InvalidTag as exc:
        raise InvalidCiphertext("authentication failed (tampered blob or wrong record)") from exc


def _wrap_context(owner: str, key_id: bytes) -> bytes:
    return b"ehr-dek/1|" + owner.encode() + b"|" + key_id


def _same_key_other_source(wrapped_under: str, active: str) -> str:
    """A hint when the two KEK ids differ only in their source (``kek-`` for a keyring's KEK,
    ``env-`` for ``EHR_KEK``): the same key, whose id is bound into every key it wrapped."""
    prefixes = {wrapped_under[:4], active[:4]}
    if prefixes == {"kek-", "env-"} and wrapped_under[4:] == active[4:]:
        return (
            "; the two ids name the same key given another way (a keyring's KEK, or EHR_KEK): "
            "a data key is bound to the id of the KEK that wrapped it, so give the key the way "
            "the warehouse was written with"
        )
    return ""


class DataKeyStore:
    """Per-owner data keys, persisted wrapped in the ``data_keys`` table of a DuckDB warehouse.

    New keys are buffered and written by :meth:`flush` in one insert, so a batch touching many
    patients pays one write, not one per patient; callers flush before committing ciphertexts,
    except those of the owners they hold back (``hold``), whose keys may yet be discarded
    unwritten (:meth:`discard`).
    """

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        provider: KeyProvider,
        *,
        random_bytes: RandomBytes = os.urandom,
        clock: Clock = utcnow,
    ) -> None:
        self._con = con
        self._provider = provider
        self._random_bytes = random_bytes
        self._clock = clock
        # a read-only connection to a warehouse never needs to create it
        if not has_table(con, "data_keys"):
            con.execute(DATA_KEYS_DDL)
        self._by_owner: dict[str, bytes] = {}
        self._cache: dict[bytes, DataKey] = {}
        # whose key each cached one is: the owner is authenticated when the key is unwrapped
        self._owners: dict[bytes, str] = {}
        self._pending: list[tuple[bytes, str, WrappedKey]] = []
        self._registered = False
        self._current_kek_checked = False
        # Owners whose key was destroyed are remembered: an erased patient never gets a fresh
        # key, so nothing of theirs can be sealed (and so kept) again.
        self.destroyed_owners: set[str] = set()
        rows = con.execute("SELECT owner, key_id, destroyed_at FROM data_keys").fetchall()
        for owner, key_id, destroyed_at in rows:
            if destroyed_at is None:
                self._by_owner[owner] = bytes(key_id)
            else:
                self.destroyed_owners.add(owner)
        if rows:  # a warehouse from before the registry registers on its next use
            self._register_warehouse()

    def require_every_kek(self) -> None:
        """For a writer, before it adds data keys: one live data key under each KEK the
        warehouse's keys are wrapped under is unwrapped. A provider that lacks one of those KEKs
        (another ``EHR_KEK``) is refused (KeyMaterialError, naming KEK ids only) before a new
        key under its own KEK leaves part of the vault readable under one KEK and the rest
        under another, and so no release readable under either."""
        rows = self._con.execute(
            f"SELECT kek_id, min(key_id) FROM data_keys WHERE {LIVE_DATA_KEY} "
            "GROUP BY kek_id ORDER BY kek_id"
        ).fetchall()
        for kek_id, key_id in rows:
            try:
                self.by_id(bytes(key_id))
            except (KeyMaterialError, InvalidCiphertext) as exc:
                active_id = self._provider.active_kek_id()
                active = shown(active_id, "the provider's active KEK id")
                raise KeyMaterialError(
                    f"this warehouse's data keys are wrapped under KEK "
                    f"{shown(kek_id, 'a KEK id in data_keys')}, which the key provider cannot "
                    f"unwrap (its active KEK is {active}): a data key added under it would "
                    "leave the vault readable under neither KEK, so nothing was written; use "
                    "the warehouse's KEK, or rotate to a new one with `ehr keys rotate` (when "
                    "a rotation finished after this process read its keys, run it again: it "
                    "reads the rotated keyring)" + _same_key_other_source(str(kek_id), active_id)
                ) from exc

    def for_owner(self, owner: str) -> DataKey:
        """The owner's live data key, created on first use; KeyDestroyedError for an owner
        whose key was destroyed (an erased patient)."""
        key_id = self._by_owner.get(owner)
        if key_id is not None:
            return self.by_id(key_id)
        if owner in self.destroyed_owners:
            raise KeyDestroyedError(f"the data key of {owner} was destroyed; none is made anew")
        key_id = self._random_bytes(KEY_ID_BYTES)
        key = DataKey(key_id, self._random_bytes(KEY_BYTES))
        wrapped = self._provider.wrap(key.key, _wrap_context(owner, key_id))
        self._pending.append((key_id, owner, wrapped))
        self._by_owner[owner] = key_id
        self._cache[key_id] = key
        self._owners[key_id] = owner
        return key

    def by_id(self, key_id: bytes) -> DataKey:
        """Unwrap (and cache) the data key with this id."""
        cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        rows = self._con.execute(
            "SELECT key_id, owner, kek_id, wrapped, destroyed_at FROM data_keys WHERE key_id = ?",
            [key_id],
        ).fetchall()
        if not rows:
            raise KeyDestroyedError(f"data key {key_id.hex()} does not exist")
        if rows[0][4] is not None or rows[0][3] is None:
            raise KeyDestroyedError(f"data key {key_id.hex()} was destroyed")
        return self._unwrap_row(rows[0])

    def holds(self, key_id: bytes) -> bool:
        """Whether ``data_keys`` has a row for this key id, live or destroyed (a blob naming
        one it has not was changed, or sealed under a key never stored)."""
        found = self._con.execute("SELECT 1 FROM data_keys WHERE key_id = ?", [key_id])
        return bool(found.fetchall())

    def prefetch(self, key_ids: Iterable[bytes]) -> None:
        """Unwrap the live keys among ``key_ids`` not cached yet with one query: reading the
        vault a chunk at a time costs one lookup per chunk instead of one per patient. A key
        missing or destroyed is left to :meth:`by_id`, which says which."""
        wanted = list({bytes(k) for k in key_ids if bytes(k) not in self._cache})
        if not wanted:
            return
        rows = self._con.execute(
            "SELECT key_id, owner, kek_id, wrapped, destroyed_at FROM data_keys "
            f"WHERE key_id IN (SELECT unnest(?::BLOB[])) AND {LIVE_DATA_KEY}",
            [wanted],
        ).fetchall()
        for row in rows:
            # a wrapped key that fails is left to by_id too: its reader names the row needing it
            with contextlib.suppress(InvalidCiphertext):
                self._unwrap_row(row)

    def _unwrap_row(self, row: tuple[Any, ...]) -> DataKey:
        """Unwrap a ``data_keys`` row; InvalidCiphertext naming the data key's id when its
        wrapped form, owner, key id or KEK id was changed (or the KEK was)."""
        key_id, owner, kek_id, wrapped = bytes(row[0]), row[1], row[2], bytes(row[3])
        try:
            plain = self._provider.unwrap(WrappedKey(kek_id, wrapped), _wrap_context(owner, key_id))
        except InvalidCiphertext as exc:
            raise InvalidCiphertext(
                f"data key {key_id.hex()} does not unwrap ({exc}): its row in data_keys was "
                "changed (wrapped key, owner, key id or KEK id)"
            ) from exc
        key = DataKey(key_id, plain)
        self._cache[key_id] = key
        self._owners[key_id] = owner
        return key

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a sealed blob with whichever data key it names."""
        return open_sealed(self.by_id(sealed_key_id(blob)), blob, aad)

    def open_owned(self, blob: bytes, aad: bytes, owner: str) -> bytes:
        """Decrypt a blob that must be sealed under ``owner``'s data key. The owner is bound to
        each data key when it is wrapped, so a ciphertext moved to a row of another owner (or
        a row moved to another owner) is refused, as a changed ciphertext is."""
        key = self.by_id(sealed_key_id(blob))
        if self._owners.get(key.key_id) != owner:
            raise InvalidCiphertext("the ciphertext is sealed under another owner's data key")
        return open_sealed(key, blob, aad)

    def flush(self, hold: Callable[[str], bool] | None = None) -> int:
        """Persist keys created since the last flush, but those of the owners ``hold`` names,
        which stay pending; returns how many were written."""
        writing: list[tuple[bytes, str, WrappedKey]] = []
        held: list[tuple[bytes, str, WrappedKey]] = []
        for pending in self._pending:  # ``hold`` asked once a key
            (held if hold is not None and hold(pending[1]) else writing).append(pending)
        if not writing:
            return 0
        self._register_warehouse()
        self._require_current_kek()
        now = self._clock()
        table = pa.table(
            {
                "key_id": pa.array([k for k, _, _ in writing], pa.binary()),
                "owner": pa.array([o for _, o, _ in writing], pa.string()),
                "kek_id": pa.array([w.kek_id for _, _, w in writing], pa.string()),
                "wrapped": pa.array([w.blob for _, _, w in writing], pa.binary()),
                "created_at": pa.array([now] * len(writing), pa.timestamp("us", tz="UTC")),
            }
        )
        self._con.register("_new_data_keys", table)
        try:
            self._con.execute(
                "INSERT INTO data_keys (key_id, owner, kek_id, wrapped, created_at) "
                "SELECT key_id, owner, kek_id, wrapped, created_at FROM _new_data_keys"
            )
        finally:
            self._con.unregister("_new_data_keys")
        self._pending = held
        return len(writing)

    def discard(self, owners: Iterable[str]) -> int:
        """Drop the pending keys of ``owners`` unwritten: what was sealed under them can never
        be opened again, and no key ever reaches the warehouse file (or its write-ahead log)
        to be left in a freed page. The owners get no key anew (:attr:`destroyed_owners`).
        Returns how many keys were dropped."""
        gone = set(owners)
        dropped = [key_id for key_id, owner, _ in self._pending if owner in gone]
        self._pending = [p for p in self._pending if p[1] not in gone]
        for key_id in dropped:
            self._cache.pop(key_id, None)
            self._owners.pop(key_id, None)
        for owner in gone:
            if self._by_owner.get(owner) in dropped:
                del self._by_owner[owner]
        self.destroyed_owners |= gone
        return len(dropped)

    def _require_current_kek(self) -> None:
        """Before the first data key is stored, the keyring must still have the KEK it is
        wrapped under as its active one (:meth:`FileKeyProvider.require_current`): this
        process read the keyring before a rotation (and a purge of the KEK it retired) that
        did not know this warehouse, or could not reach it while it was closed. Registered
        (and held open for writing) from here on, the warehouse is in every later rotation."""
        require = getattr(self._provider, "require_current", None)
        if self._current_kek_checked or require is None:
            return
        require()
        self._current_kek_checked = True

    def _claim_id_alone(self) -> bool:
        """For a provider without a registry (environment keys): the warehouse still gets its
        id, by which its audit log is anchored outside the work directory (``EHR_AUDIT_ANCHOR``,
        :func:`vault.audit.anchor_folder`). Without one, its log and side file deleted read as
        a log with no entry. A read-only connection leaves it to the next writer; no registry
        tells a copied work directory from its original here, so a copy shares the anchor."""
        from vault import warehouse

        if warehouse.warehouse_id(self._con) is not None:
            return True
        read_only = self._con.execute(
            "SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()"
        ).fetchall()
        if not read_only or read_only[0][0]:
            return False
        warehouse.ensure_warehouse_id(self._con, self._random_bytes)
        return True

    def _register_warehouse(self) -> None:
        """Before the first data key lands here, the keyring learns that this warehouse
        depends on it, so a rotation cannot leave it behind (providers without a registry,
        such as environment keys rotated by their owner, give the warehouse its id alone:
        :meth:`_claim_id_alone`)."""
        register = getattr(self._provider, "register_warehouse", None)
        if self._registered:
            return
        from vault import warehouse  # warehouse imports this module for its DDL

        path = warehouse.database_path(self._con)
        if path is None:
            return
        if register is None:
            self._registered = self._claim_id_alone()
            return
        registered: dict[str, str] = getattr(self._provider, "warehouses", dict)()
        try:
            wid: str | None = warehouse.claim_id(self._con, registered, self._random_bytes)
        except duckdb.Error:  # a read-only connection cannot give the warehouse its id
            wid = warehouse.warehouse_id(self._con)
            if warehouse.is_copy(registered, wid, path):
                return  # registered by its next writer, under an id of its own
        if wid is not None:
            register(wid, path)
            self._registered = True
