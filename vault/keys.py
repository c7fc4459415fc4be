"""Key providers: where the key-encryption key (KEK) and the pseudonym key come from.

A provider never hands out the KEK itself: it wraps and unwraps data keys, the two operations a
cloud KMS offers, so a KMS-backed provider can implement the same :class:`KeyProvider` protocol.
Two local providers ship: a key file (``ehr keys init`` writes it outside the repository, mode
0600) and environment variables (``EHR_KEK`` and ``EHR_PSEUDONYM_KEY``, base64 of 32 bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault.clock import Clock, RandomBytes, utcnow
from vault.errors import InvalidCiphertext, KeyMaterialError

KEY_BYTES = 32
NONCE_BYTES = 12
KEYRING_FORMAT = "ehr-keyring/1"
ENV_KEK = "EHR_KEK"
ENV_PSEUDONYM_KEY = "EHR_PSEUDONYM_KEY"
ENV_KEY_FILE = "EHR_KEY_FILE"


def default_key_file() -> Path:
    """The key file used when neither ``EHR_KEY_FILE`` nor an explicit path is given."""
    return Path(os.environ.get(ENV_KEY_FILE) or Path.home() / ".ehr" / "keyring.json")


def _b64decode_key(value: str, what: str) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyMaterialError(f"{what} is not valid base64") from exc
    if len(key) != KEY_BYTES:
        raise KeyMaterialError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def key_fingerprint(key: bytes) -> str:
    """A short, non-secret id for a key (truncated SHA-256 of a domain-separated input)."""
    return hashlib.sha256(b"ehr-key-id|" + key).hexdigest()[:16]


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted under a KEK, with the KEK's id."""

    kek_id: str
    blob: bytes  # nonce || AES-256-GCM(ciphertext || tag)


class KeyProvider(Protocol):
    """What the platform needs from a key-management system."""

    def active_kek_id(self) -> str: ...

    def wrap(self, data_key: bytes, context: bytes) -> WrappedKey: ...

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes: ...

    def pseudonym_key(self) -> bytes: ...


class _LocalKekProvider:
    """Shared wrap/unwrap for providers that hold KEKs in process memory."""

    def __init__(
        self,
        keks: dict[str, bytes],
        active: str,
        pseudonym_key: bytes,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        if active not in keks:
            raise KeyMaterialError(f"active KEK {active!r} is not in the keyring")
        for kek_id, kek in keks.items():
            if len(kek) != KEY_BYTES:
                raise KeyMaterialError(f"KEK {kek_id!r} must be {KEY_BYTES} bytes")
        if len(pseudonym_key) != KEY_BYTES:
            raise KeyMaterialError(f"pseudonym key must be {KEY_BYTES} bytes")
        self._keks = dict(keks)
        self._active = active
        self._pseudonym_key = pseudonym_key
        self._random_bytes = random_bytes

    def active_kek_id(self) -> str:
        return self._active

    def kek_ids(self) -> list[str]:
        return sorted(self._keks)

    def wrap(self, data_key: bytes, context: bytes) -> WrappedKey:
        if len(data_key) != KEY_BYTES:
            raise ValueError(f"data key must be {KEY_BYTES} bytes, got {len(data_key)}")
        nonce = self._random_bytes(NONCE_BYTES)
        aad = b"ehr-wrap/1|" + self._active.encode() + b"|" + context
        blob = nonce + AESGCM(self._keks[self._active]).encrypt(nonce, data_key, aad)
        return WrappedKey(self._active, blob)

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        kek = self._keks.get(wrapped.kek_id)
        if kek is None:
            raise KeyMaterialError(f"KEK {wrapped.kek_id!r} is not available to this provider")
        if len(wrapped.blob) < NONCE_BYTES + 16:
            raise InvalidCiphertext("wrapped key is too short")
        nonce, body = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        aad = b"ehr-wrap/1|" + wrapped.kek_id.encode() + b"|" + context
        try:
            return AESGCM(kek).decrypt(nonce, body, aad)
        except InvalidTag as exc:
            raise InvalidCiphertext(f"wrapped key under KEK {wrapped.kek_id!r} failed") from exc

    def pseudonym_key(self) -> bytes:
        return self._pseudonym_key


class EnvKeyProvider(_LocalKekProvider):
    """KEK and pseudonym key from ``EHR_KEK`` / ``EHR_PSEUDONYM_KEY`` (base64, 32 bytes each)."""

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> EnvKeyProvider:
        env = dict(os.environ) if environ is None else environ
        if ENV_KEK not in env or ENV_PSEUDONYM_KEY not in env:
            raise KeyMaterialError(f"{ENV_KEK} and {ENV_PSEUDONYM_KEY} must both be set")
        kek = _b64decode_key(env[ENV_KEK], ENV_KEK)
        pkey = _b64decode_key(env[ENV_PSEUDONYM_KEY], ENV_PSEUDONYM_KEY)
        kek_id = "env-" + key_fingerprint(kek)
        return cls({kek_id: kek}, kek_id, pkey)


class FileKeyProvider(_LocalKekProvider):
    """A JSON keyring file: several KEKs (one active, older ones kept for unwrapping until
    rotation has re-wrapped every data key), the pseudonym key, and the date-shift key."""

    def __init__(self, path: Path, document: dict[str, object]) -> None:
        self.path = path
        self._document = document
        keks_doc = document.get("keks")
        if not isinstance(keks_doc, dict) or not keks_doc:
            raise KeyMaterialError("keyring has no 'keks'")
        keks = {}
        for kek_id, entry in keks_doc.items():
            if not isinstance(entry, dict) or "key" not in entry:
                raise KeyMaterialError(f"keyring entry {kek_id!r} has no 'key'")
            keks[str(kek_id)] = _b64decode_key(str(entry["key"]), f"KEK {kek_id!r}")
        active = document.get("active_kek")
        pkey = document.get("pseudonym_key")
        if not isinstance(active, str) or not isinstance(pkey, str):
            raise KeyMaterialError("keyring needs 'active_kek' and 'pseudonym_key'")
        super().__init__(keks, active, _b64decode_key(pkey, "pseudonym key"))

    @classmethod
    def load(cls, path: Path) -> FileKeyProvider:
        if not path.exists():
            raise KeyMaterialError(
                "no key file found; create one with `ehr keys init` "
                f"(or set {ENV_KEY_FILE}, or {ENV_KEK} and {ENV_PSEUDONYM_KEY})"
            )
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KeyMaterialError("key file is unreadable or not JSON") from exc
        if not isinstance(document, dict) or document.get("format") != KEYRING_FORMAT:
            raise KeyMaterialError(f"key file is not an {KEYRING_FORMAT} keyring")
        return cls(path, document)


def _new_kek_entry(random_bytes: RandomBytes, clock: Clock) -> tuple[str, dict[str, object]]:
    kek = random_bytes(KEY_BYTES)
    kek_id = "kek-" + key_fingerprint(kek)
    entry: dict[str, object] = {
        "key": base64.b64encode(kek).decode(),
        "created": clock().isoformat(),
        "retired": None,
    }
    return kek_id, entry


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_private_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably, readable by its owner only.

    The temporary file gets a fresh random name and is created exclusively with mode 0600, so
    it is never readable by others, not even for the instant before a chmod, and a stale or
    planted file (or symlink) under a predictable name can neither lend it a wider mode nor
    redirect the write. A power cut leaves either the old file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), stat.S_IRUSR | stat.S_IWUSR)  # a umask may narrow it
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_keyring(path: Path, document: Mapping[str, Any]) -> None:
    """The only writer of keyring files: atomic, durable and mode 0600. Durability matters to
    rotation, which must never commit data keys wrapped under a KEK that a power cut could take
    out of the keyring again."""
    replace_private_file(path, json.dumps(document, indent=2) + "\n")


def init_keyring(
    path: Path,
    *,
    random_bytes: RandomBytes = os.urandom,
    clock: Clock = utcnow,
) -> bool:
    """Create a keyring at ``path`` unless one exists. Returns True when it was created."""
    if path.exists():
        FileKeyProvider.load(path)  # an existing file must at least be a valid keyring
        return False
    kek_id, entry = _new_kek_entry(random_bytes, clock)
    document: dict[str, object] = {
        "format": KEYRING_FORMAT,
        "created": clock().isoformat(),
        "active_kek": kek_id,
        "keks": {kek_id: entry},
        "pseudonym_key": base64.b64encode(random_bytes(KEY_BYTES)).decode(),
        "date_shift_key": base64.b64encode(random_bytes(KEY_BYTES)).decode(),
    }
    write_keyring(path, document)
    return True


def load_key_provider(key_file: str | Path | None = None) -> KeyProvider:
    """Environment keys win when set; otherwise the key file (explicit, ``EHR_KEY_FILE``, or
    ``~/.ehr/keyring.json``)."""
    if os.environ.get(ENV_KEK):
        return EnvKeyProvider.from_environ()
    return FileKeyProvider.load(Path(key_file) if key_file else default_key_file())
