"""Key providers: where the key-encryption key (KEK) and the pseudonym key come from.

A provider never hands out the KEK itself: it wraps and unwraps data keys, the two operations a
cloud KMS offers, so a KMS-backed provider can implement the same :class:`KeyProvider` protocol.
Two local providers ship: a key file (``ehr keys init`` writes it outside the repository, mode
0600) and environment variables (``EHR_KEK``, ``EHR_PSEUDONYM_KEY`` and, for the audit log,
``EHR_AUDIT_KEY``; base64 of 32 bytes each).

A keyring file also records which warehouses hold data keys wrapped under it (their ids, and
the last path each was seen at: paths of warehouse files, not secrets), so that rotation can
re-wrap every one of them, and it keeps retired KEKs wrapped under the active KEK until
``ehr keys purge-retired`` confirms that no registered warehouse still needs them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault.clock import Clock, RandomBytes, utcnow
from vault.errors import InvalidCiphertext, KeyFilePermissionError, KeyMaterialError

KEY_BYTES = 32
NONCE_BYTES = 12
KEYRING_FORMAT = "ehr-keyring/1"
ENV_KEK = "EHR_KEK"
ENV_PSEUDONYM_KEY = "EHR_PSEUDONYM_KEY"
ENV_AUDIT_KEY = "EHR_AUDIT_KEY"
ENV_KEY_FILE = "EHR_KEY_FILE"
# the variables that hold key material: a child process that needs no key gets none of them
KEY_ENV_VARS = (ENV_KEK, ENV_PSEUDONYM_KEY, ENV_AUDIT_KEY)
LEGACY_AUDIT_KEY_INFO = b"ehr-audit-log/1"
_RETIRED_KEK_AAD = b"ehr-retired-kek/1|"


def without_key_material(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less the variables holding key material (:data:`KEY_ENV_VARS`): the
    environment of a child process that needs no key."""
    return {name: value for name, value in environ.items() if name not in KEY_ENV_VARS}


def default_key_file() -> Path:
    """The key file used when neither ``EHR_KEY_FILE`` nor an explicit path is given."""
    return Path(os.environ.get(ENV_KEY_FILE) or Path.home() / ".ehr" / "keyring.json")


# the form of every key id made here: "kek-" (a keyring's KEKs) or "env-" (EHR_KEK) and the 16
# hex digits of key_fingerprint, 8 bytes of a hash: never key material
_KEY_ID = re.compile(r"(?:kek|env)-[0-9a-f]{16}")
_HEX_MATERIAL = re.compile(r"[0-9A-Fa-f]{32,}")  # 16 bytes or more, as hex
_BASE64_MATERIAL = re.compile(r"(?:[A-Za-z0-9+/]{22,}|[A-Za-z0-9_-]{22,})={0,2}")  # 16+ bytes
# a run of key characters with no character of a key or of a path on either side: the whole
# value, or a part of it set off by quotes, spaces, '=', ':', ',' and the like, as a key is when
# pasted with what surrounded it (`EHR_KEK=...`, a keyring's `"key": "...",` line). A run
# that goes on with '.', '~' or another key character is part of a path (`.../keyring.json`)
_BOUNDED_RUN = re.compile(r"(?<![A-Za-z0-9+/_.~-])[A-Za-z0-9+/_-]{22,}={0,2}(?![A-Za-z0-9+/_.~=-])")
# within such a run, the stretches of each alphabet: a key after a prefix (`kek-`, `env-`) too
_ONE_ALPHABET = (
    _HEX_MATERIAL,
    re.compile(r"[A-Za-z0-9+/]{22,}={0,2}"),
    re.compile(r"[A-Za-z0-9_-]{22,}={0,2}"),
)


def _key_shaped(run: str) -> bool:
    """Whether a run of one alphabet is shaped like a key of 16 bytes or more.

    Hex of 32 digits or more counts as a key. Base64 of 22 characters or more counts when it
    ends with padding ('=') or mixes upper-case letters, lower-case letters and digits, as a
    random key's base64 does: a 32-byte key lacks one of the three about once in 1,500 keys,
    and then still has its '=' unless the padding was cut off."""
    if _HEX_MATERIAL.fullmatch(run):
        return True
    if not _BASE64_MATERIAL.fullmatch(run):
        return False
    return run.endswith("=") or all(
        any(test(c) for c in run) for test in (str.isupper, str.islower, str.isdigit)
    )


def _looks_like_key_material(text: str) -> bool:
    """Whether a value holds something shaped like a key of 16 bytes or more, in hex or in
    base64 (standard or URL-safe alphabet, padded or not): the whole value, or a part set off
    by quotes, spaces, '=', ':' or ',' (a key pasted with its variable's name, its quotes or
    its keyring line), after a prefix such as ``kek-`` too (:data:`_BOUNDED_RUN`).

    An ordinary path cannot be taken for a key: a '.', '~', space, or '/' beside '-' or '_' is
    in neither alphabet (``keys.json``, ``~/.ehr/keyring.json``, ``/run/secrets/ehr_keyring``),
    and a path made of base64 characters alone is short or does not mix the three
    (``/etc/ehr/keyring``, ``/Users/alice/ehr/keyring``). Only a path with no extension that
    holds 22 characters or more of one alphabet mixing all three, say
    ``/srv/Keys/ehr2026/keyring``, is hidden, and its message still names where it came from.
    """
    return any(
        _key_shaped(part.group())
        for run in _BOUNDED_RUN.finditer(text)
        for alphabet in _ONE_ALPHABET
        for part in alphabet.finditer(run.group())
    )


def shown(value: object, what: str, *, path: bool = False) -> str:
    """How a value read from a keyring's id fields (or, with ``path``, from a path setting such
    as ``EHR_KEY_FILE``) may appear in a message. A hand-edited keyring or a mixed-up variable
    can hold a key where a name or a path belongs, and messages reach stderr and Dagster's logs.

    A key id is shown (quoted) only when it has the form of the ids made here (``kek-`` or
    ``env-`` and 16 hex digits); a path is shown unless it looks like key material
    (:func:`_looks_like_key_material`). Otherwise the message says what the value is, by
    ``what`` (the field or variable it was read from), without it.
    """
    text = str(value)
    if path:
        if not _looks_like_key_material(text):
            return text
        return f"[{what} is not a file path and looks like key material; not shown]"
    if isinstance(value, str) and _KEY_ID.fullmatch(value):
        return repr(value)
    return f"[{what} is not a key id (kek-<16 hex digits>) and may be key material; not shown]"


def refuse_key_shaped_path(path: str | Path, what: str) -> None:
    """Refuse a key file path that looks like key material (:func:`_looks_like_key_material`)
    and names no file, naming it by ``what`` (the option or setting it was given as), without
    it: a value that is kept as configuration (a Dagster resource's config, stored with every
    run) must not be a key pasted where the keyring's path belongs. A file there makes it a
    path (``/srv/Keys/ehr2026/keyring`` is shaped like base64 too)."""
    if _looks_like_key_material(str(path)) and not Path(path).exists():
        raise KeyMaterialError(
            f"{what} is not a file path and looks like key material (not shown): give the "
            "keyring file's path, or the keys as variables"
        )


def shown_key_file(path: str | Path) -> str:
    """The key file's path as a message may show it (:func:`shown`), said to be the value of
    ``EHR_KEY_FILE`` when it was taken from there."""
    env = os.environ.get(ENV_KEY_FILE)
    if env and Path(env) == Path(path):
        return shown(env, f"the value of {ENV_KEY_FILE}", path=True)
    return shown(path, "the key file path", path=True)


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

    def audit_key(self) -> bytes: ...


def legacy_audit_key(pseudonym_key: bytes) -> bytes:
    """The audit MAC key of keyrings made before they had one: HKDF-SHA256 of the pseudonym
    key. Only read to verify old entries; ``ehr keys migrate-audit-key`` replaces it."""
    if len(pseudonym_key) < KEY_BYTES:
        raise ValueError(f"pseudonym key must be at least {KEY_BYTES} bytes")
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=LEGACY_AUDIT_KEY_INFO).derive(
        pseudonym_key
    )


class _LocalKekProvider:
    """Shared wrap/unwrap for providers that hold KEKs in process memory."""

    def __init__(
        self,
        keks: dict[str, bytes],
        active: str,
        pseudonym_key: bytes,
        random_bytes: RandomBytes = os.urandom,
        audit_key: bytes | None = None,
    ) -> None:
        # an id is written beside every data key it wraps and into the audit log: a key pasted
        # where a name belongs (the same text as 'active_kek' and as its entry's name) would be
        # written there in the clear, so it is refused before anything is wrapped under it
        if any(_looks_like_key_material(kek_id) for kek_id in keks):
            raise KeyMaterialError(
                "a KEK's name in the keyring looks like key material, not a key id (not shown): "
                "name it as `ehr keys init` does (kek- and 16 hex digits)"
            )
        if active not in keks:
            shown_active = shown(active, "the keyring's 'active_kek'")
            raise KeyMaterialError(f"active KEK {shown_active} is not in the keyring")
        for kek_id, kek in keks.items():
            if len(kek) != KEY_BYTES:
                shown_id = shown(kek_id, "a KEK's name in the keyring")
                raise KeyMaterialError(f"KEK {shown_id} must be {KEY_BYTES} bytes")
        if len(pseudonym_key) != KEY_BYTES:
            raise KeyMaterialError(f"pseudonym key must be {KEY_BYTES} bytes")
        if audit_key is not None and len(audit_key) != KEY_BYTES:
            raise KeyMaterialError(f"audit key must be {KEY_BYTES} bytes")
        if audit_key is not None and audit_key == pseudonym_key:
            raise KeyMaterialError("the audit key must differ from the pseudonym key")
        self._keks = dict(keks)
        self._active = active
        self._pseudonym_key = pseudonym_key
        self._audit_key = audit_key
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
            kek_id = shown(wrapped.kek_id, "the wrapped key's KEK id")
            raise KeyMaterialError(f"KEK {kek_id} is not available to this provider")
        if len(wrapped.blob) < NONCE_BYTES + 16:
            raise InvalidCiphertext("wrapped key is too short")
        nonce, body = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        aad = b"ehr-wrap/1|" + wrapped.kek_id.encode() + b"|" + context
        try:
            return AESGCM(kek).decrypt(nonce, body, aad)
        except InvalidTag as exc:
            kek_id = shown(wrapped.kek_id, "the wrapped key's KEK id")
            raise InvalidCiphertext(f"wrapped key under KEK {kek_id} failed") from exc

    def pseudonym_key(self) -> bytes:
        return self._pseudonym_key

    def audit_key(self) -> bytes:
        """The audit log's MAC key, separate from the pseudonym key that every pipeline
        process holds, so a pipeline process cannot forge audit entries."""
        if self._audit_key is None:
            raise KeyMaterialError(f"no audit key: set {ENV_AUDIT_KEY} (base64 of 32 bytes)")
        return self._audit_key


class EnvKeyProvider(_LocalKekProvider):
    """KEK and pseudonym key from ``EHR_KEK`` / ``EHR_PSEUDONYM_KEY`` (base64, 32 bytes each),
    and the audit key from ``EHR_AUDIT_KEY`` when the process needs one."""

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> EnvKeyProvider:
        env = dict(os.environ) if environ is None else environ
        if ENV_KEK not in env or ENV_PSEUDONYM_KEY not in env:
            raise KeyMaterialError(f"{ENV_KEK} and {ENV_PSEUDONYM_KEY} must both be set")
        kek = _b64decode_key(env[ENV_KEK], ENV_KEK)
        pkey = _b64decode_key(env[ENV_PSEUDONYM_KEY], ENV_PSEUDONYM_KEY)
        kek_id = "env-" + key_fingerprint(kek)
        akey = _b64decode_key(env[ENV_AUDIT_KEY], ENV_AUDIT_KEY) if env.get(ENV_AUDIT_KEY) else None
        return cls({kek_id: kek}, kek_id, pkey, audit_key=akey)


def wrap_retired_kek(
    old_id: str, old_kek: bytes, new_id: str, new_kek: bytes, random_bytes: RandomBytes = os.urandom
) -> dict[str, str]:
    """A retired KEK kept in the keyring, encrypted under the KEK that replaced it, so it
    unwraps data keys a warehouse has not re-wrapped yet but is not lying in the file bare."""
    nonce = random_bytes(NONCE_BYTES)
    aad = _RETIRED_KEK_AAD + old_id.encode() + b"|" + new_id.encode()
    blob = nonce + AESGCM(new_kek).encrypt(nonce, old_kek, aad)
    return {"wrapped_by": new_id, "wrapped": base64.b64encode(blob).decode()}


def _unwrap_retired(keks: dict[str, bytes], retired_doc: dict[str, Any]) -> None:
    """Add to ``keks`` every retired KEK still held (wrapped under a KEK already in ``keks``,
    possibly itself a retired one: rotations chain)."""
    pending = {
        str(k): v for k, v in retired_doc.items() if isinstance(v, dict) and v.get("wrapped")
    }
    while pending:
        ready = [k for k, v in pending.items() if str(v.get("wrapped_by")) in keks]
        if not ready:
            names = ", ".join(
                shown(k, "a name in the keyring's 'retired_keks'") for k in sorted(pending)
            )
            raise KeyMaterialError(
                f"retired KEKs {names} are wrapped under a KEK this keyring does not hold"
            )
        for old_id in ready:
            entry = pending.pop(old_id)
            by = str(entry["wrapped_by"])
            try:
                blob = base64.b64decode(str(entry["wrapped"]), validate=True)
                aad = _RETIRED_KEK_AAD + old_id.encode() + b"|" + by.encode()
                kek = AESGCM(keks[by]).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
            except (binascii.Error, ValueError, InvalidTag) as exc:
                shown_id = shown(old_id, "a name in the keyring's 'retired_keks'")
                raise KeyMaterialError(f"retired KEK {shown_id} does not unwrap") from exc
            keks[old_id] = kek


def _require_kek_matches_its_id(kek_id: str, kek: bytes) -> None:
    """Refuse a KEK whose id has the form of the ids made here (``kek-`` or ``env-`` and the
    16 hex digits of :func:`key_fingerprint`) but is not its key's fingerprint: the key was
    changed in the file (a flipped bit, a hand edit, a key pasted under another's name). Left
    to the first unwrap, every data key under it failed as if its wrapped form were tampered
    with, and the key file went unnamed."""
    if _KEY_ID.fullmatch(kek_id) and kek_id[4:] != key_fingerprint(kek):
        raise KeyMaterialError(
            f"KEK {shown(kek_id, 'a name in the keyring')} does not match its id: its key was "
            "changed, so the keyring is damaged; restore the keyring file from a backup"
        )


class FileKeyProvider(_LocalKekProvider):
    """A JSON keyring file: the active KEK, retired KEKs (wrapped under a newer KEK until
    ``purge-retired``), the pseudonym key, the date-shift key, the audit key, and the registry
    of warehouses whose data keys are wrapped under it."""

    def __init__(self, path: Path, document: dict[str, object]) -> None:
        self.path = path
        self._document = document
        keks_doc = document.get("keks")
        if not isinstance(keks_doc, dict) or not keks_doc:
            raise KeyMaterialError("keyring has no 'keks'")
        keks = {}
        for kek_id, entry in keks_doc.items():
            shown_id = shown(kek_id, "a name in the keyring's 'keks'")
            if not isinstance(entry, dict) or "key" not in entry:
                raise KeyMaterialError(f"keyring entry {shown_id} has no 'key'")
            keks[str(kek_id)] = _b64decode_key(str(entry["key"]), f"KEK {shown_id}")
            _require_kek_matches_its_id(str(kek_id), keks[str(kek_id)])
        self.live_kek_ids = sorted(keks)
        retired = document.get("retired_keks")
        _unwrap_retired(keks, retired if isinstance(retired, dict) else {})
        active = document.get("active_kek")
        pkey = document.get("pseudonym_key")
        if not isinstance(active, str) or not isinstance(pkey, str):
            raise KeyMaterialError("keyring needs 'active_kek' and 'pseudonym_key'")
        pseudonym_key = _b64decode_key(pkey, "pseudonym key")
        akey = document.get("audit_key")
        # keyrings made before the audit key existed: the derived key, until migrated; a
        # migrated keyring still accepts it for the entries written before the migration
        self.legacy_audit = not isinstance(akey, str)
        self.accepts_legacy_audit = self.legacy_audit or document.get("legacy_audit_key") is True
        audit = (
            _b64decode_key(akey, "audit key")
            if isinstance(akey, str)
            else legacy_audit_key(pseudonym_key)
        )
        super().__init__(keks, active, pseudonym_key, audit_key=audit)

    def retired_kek_ids(self) -> list[str]:
        """Retired KEKs whose material the keyring still holds (wrapped)."""
        return sorted(set(self.kek_ids()) - set(self.live_kek_ids))

    def warehouses(self) -> dict[str, str]:
        """Registered warehouse id -> the path it was last registered from."""
        registry = self._document.get("warehouses")
        if not isinstance(registry, dict):
            return {}
        return {str(k): str(v.get("path", "")) for k, v in registry.items() if isinstance(v, dict)}

    def register_warehouse(self, warehouse_id: str, path: Path, clock: Clock = utcnow) -> bool:
        """Record that ``warehouse_id`` (at ``path``) holds data keys wrapped by this keyring.
        Returns True when the keyring file changed."""
        location = str(Path(path).resolve())
        if self.warehouses().get(warehouse_id) == location:
            return False
        with keyring_lock(self.path):
            document = read_keyring_document(self.path)
            registry = document.setdefault("warehouses", {})
            entry = registry.get(warehouse_id)
            if isinstance(entry, dict) and entry.get("path") == location:
                self._document = document
                return False
            registry[warehouse_id] = {"path": location, "registered": clock().isoformat()}
            write_keyring(self.path, document)
        self._document = document
        return True

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        """As :meth:`_LocalKekProvider.unwrap`; a KEK this keyring does not hold is named with
        the key file and why it may be missing (key ids only, never a key)."""
        try:
            return super().unwrap(wrapped, context)
        except KeyMaterialError as exc:
            raise KeyMaterialError(
                f"key file {shown_key_file(self.path)}: {exc}: {self._why_a_kek_is_missing()}"
            ) from exc

    def _why_a_kek_is_missing(self) -> str:
        try:
            active = read_keyring_document(self.path).get("active_kek")
        except KeyMaterialError:
            active = self._active  # the file cannot say more now; its own error says why
        if active != self._active:
            return "the keyring was rotated after this process read it; run again"
        return (
            "the keyring does not hold it (a copy older than the warehouse, restored after a "
            "rotation, or another's); use the keyring file that holds it"
        )

    def require_current(self) -> None:
        """Refuse (KeyMaterialError, key ids only) when the keyring file's active KEK is no
        longer the one this provider read: a rotation finished since. A data key wrapped under
        the KEK it retired would land beside keys the rotation re-wrapped, in a warehouse it may
        not have known of yet, and ``ehr keys purge-retired`` would then drop the only KEK that
        unwraps it. Writers call this before they store a data key."""
        active = read_keyring_document(self.path).get("active_kek")
        if active != self._active:
            now = shown(active, "the keyring's 'active_kek'")
            held = shown(self._active, "the active KEK this process read")
            raise KeyMaterialError(
                f"key file {shown_key_file(self.path)} was rotated after this process read it "
                f"(its active KEK is now {now}, this process holds {held}): no data key was "
                "stored; run again, it reads the rotated keyring"
            )

    @classmethod
    def load(cls, path: Path) -> FileKeyProvider:
        """The keyring at ``path``. An error about its content (a KEK removed, a key that is
        not base64, a retired KEK that does not unwrap) names the file, as one about reading
        it does, so a command's message says which keyring to repair."""
        document = read_keyring_document(path)  # its errors name the file already
        try:
            return cls(path, document)
        except KeyMaterialError as exc:
            raise type(exc)(f"key file {shown_key_file(path)}: {exc}") from exc


def read_keyring_document(path: Path) -> dict[str, Any]:
    """The keyring file's JSON document, checked for its mode and its format (not yet for its
    keys).

    A keyring its group or others may read or write (mode & 0o077) is refused, as OpenSSH
    refuses such a private key, rather than narrowed: its keys may have been read already, and
    whoever made it so should know. The mode is taken from the open file, the one then read.
    """
    if not path.exists():
        raise KeyMaterialError(
            f"no key file at {shown_key_file(path)}; create one with `ehr keys init` "
            f"(or set {ENV_KEY_FILE}, or {ENV_KEK} and {ENV_PSEUDONYM_KEY})"
        )
    try:
        with path.open("rb") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            if mode & 0o077:
                shown_path = shown_key_file(path)
                raise KeyFilePermissionError(
                    f"key file {shown_path} has mode {mode:04o}: its group or others may read "
                    f"or write it, so it is not used; make it its owner's alone with "
                    f"`chmod 600 {shown_path}`"
                )
            document = json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise KeyMaterialError(
            f"key file {shown_key_file(path)} is unreadable or not JSON"
        ) from exc
    if not isinstance(document, dict) or document.get("format") != KEYRING_FORMAT:
        raise KeyMaterialError(
            f"key file {shown_key_file(path)} is not an {KEYRING_FORMAT} keyring"
        )
    return document


@contextlib.contextmanager
def keyring_lock(key_file: Path) -> Iterator[None]:
    """One writer of a keyring at a time (an flock on ``<key file>.lock``): registration by
    ingest and a rotation must not overwrite each other's keyring.

    Every writer of the keyring holds this lock, so once it is taken no temporary file of the
    keyring is being written: any there (:func:`keyring_temporaries`) was left by a writer
    killed (or a power cut) before its rename, and is removed. Such a file is a whole keyring,
    KEKs in the clear: left there, it would keep a KEK that a rotation retired and ``ehr keys
    purge-retired`` dropped, and with it every data key a backup holds under that KEK, an
    erased patient's among them.

    The lock is taken beside the file a symlinked key file names (:func:`keyring_file`), so a
    process given the link and one given the file itself wait for each other."""
    key_file = keyring_file(key_file)
    lock_path = key_file.with_name(key_file.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive_lock(lock_path):
        for stale in keyring_temporaries(key_file):
            stale.unlink(missing_ok=True)
        yield


def keyring_file(key_file: Path) -> Path:
    """The file a keyring path names, through any symlinks: where the keyring is written.

    A keyring is often reached through a link (a secret store's mount, a shared config folder).
    Replacing the link itself with the new keyring would leave the file it pointed at as it
    was: a rotation's retired KEK lying there bare for good (``ehr keys purge-retired`` writes
    the link's new file only), and two keyrings, each read by whoever is given its path."""
    return Path(os.path.realpath(key_file))


def keyring_temporaries(key_file: Path) -> list[Path]:
    """The temporary files :func:`write_keyring` writes the keyring at ``key_file`` through
    (``.<name>.<16 hex digits>.tmp``, :func:`replace_private_file`) that are in its folder."""
    folder = key_file.parent
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(f".{key_file.name}.") + r"[0-9a-f]{16}\.tmp")
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on ``lock_path`` (created mode 0600, kept), held for the block and
    released when it ends or the process dies."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, stat.S_IRUSR | stat.S_IWUSR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _new_kek_entry(random_bytes: RandomBytes, clock: Clock) -> tuple[str, dict[str, object]]:
    kek = random_bytes(KEY_BYTES)
    kek_id = "kek-" + key_fingerprint(kek)
    entry: dict[str, object] = {
        "key": base64.b64encode(kek).decode(),
        "created": clock().isoformat(),
        "retired": None,
    }
    return kek_id, entry


def fsync_file(path: Path) -> None:
    """Flush a file written by someone else (DuckDB's ``COPY``, say) to disk, before it is
    renamed into place."""
    with Path(path).open("rb") as handle:
        os.fsync(handle.fileno())


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
    out of the keyring again. Callers hold :func:`keyring_lock`, which removes the temporary
    file a writer killed before its rename left. A symlinked key file is written where it
    points (:func:`keyring_file`), the link kept."""
    replace_private_file(keyring_file(path), json.dumps(document, indent=2) + "\n")


def init_keyring(
    path: Path,
    *,
    random_bytes: RandomBytes = os.urandom,
    clock: Clock = utcnow,
) -> bool:
    """Create a keyring at ``path`` unless one exists. Returns True when it was created. A
    path that looks like key material (a key pasted into ``EHR_KEY_FILE``) is refused: the
    keyring would be named after the key, and every message naming its file would hold it."""
    if _looks_like_key_material(str(path)):
        raise KeyMaterialError(f"no keyring is made at {shown_key_file(path)}")
    with keyring_lock(path):  # two concurrent inits must not both write a keyring
        if path.exists():
            FileKeyProvider.load(path)  # an existing file must at least be a valid keyring
            return False
        _write_new_keyring(path, random_bytes, clock)
    return True


def _write_new_keyring(path: Path, random_bytes: RandomBytes, clock: Clock) -> None:
    kek_id, entry = _new_kek_entry(random_bytes, clock)
    document: dict[str, object] = {
        "format": KEYRING_FORMAT,
        "created": clock().isoformat(),
        "active_kek": kek_id,
        "keks": {kek_id: entry},
        "pseudonym_key": base64.b64encode(random_bytes(KEY_BYTES)).decode(),
        "date_shift_key": base64.b64encode(random_bytes(KEY_BYTES)).decode(),
        "audit_key": base64.b64encode(random_bytes(KEY_BYTES)).decode(),
        "warehouses": {},
    }
    write_keyring(path, document)


def migrate_audit_key(path: Path, *, random_bytes: RandomBytes = os.urandom) -> bool:
    """Give a keyring made before the audit key existed an audit key of its own. Audit logs
    keep verifying: entries made before are checked with the derived (legacy) key, which the
    keyring remembers to accept (``legacy_audit_key``); new entries use the new key. Returns
    False when the keyring already has an audit key."""
    with keyring_lock(path):
        document = read_keyring_document(path)
        if isinstance(document.get("audit_key"), str):
            return False
        document["audit_key"] = base64.b64encode(random_bytes(KEY_BYTES)).decode()
        document["legacy_audit_key"] = True
        write_keyring(path, document)
    return True


def environment_keys_given() -> bool:
    """Whether the keys are to come from the environment: either variable of the pair is set
    (the other one missing is :class:`EnvKeyProvider`'s error)."""
    return bool(os.environ.get(ENV_KEK) or os.environ.get(ENV_PSEUDONYM_KEY))


def load_key_provider(key_file: str | Path | None = None) -> KeyProvider:
    """Environment keys win when set; otherwise the key file (explicit, ``EHR_KEY_FILE``, or
    ``~/.ehr/keyring.json``). Either variable of the pair set alone is refused: a pseudonym
    key set without its KEK would otherwise be ignored for the key file's, silently."""
    if environment_keys_given():
        return EnvKeyProvider.from_environ()
    return FileKeyProvider.load(Path(key_file) if key_file else default_key_file())
