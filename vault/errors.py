"""The error types of the PHI vault: keys, sealing, the audit log and the key lifecycle."""

from __future__ import annotations


class VaultError(Exception):
    """Base class for every error raised by :mod:`vault`.

    Messages never carry PHI or key material: they name key ids, pseudonyms, counts, shapes and
    the paths that were looked at.
    """


class KeyMaterialError(VaultError):
    """Key material is missing, malformed or unusable."""


class KeyFilePermissionError(KeyMaterialError):
    """The key file may be read or written by its group or others (mode & 0o077): it is not
    used (the message names the path, its mode and the chmod that fixes it)."""


class PseudonymKeyMismatchError(KeyMaterialError):
    """The pseudonym key in hand is not the one the warehouse was built with (the message names
    both keys' ids, never a key)."""


class InvalidCiphertext(VaultError):  # noqa: N818 - mirrors cryptography's InvalidTag naming
    """A ciphertext failed authentication: wrong key, wrong associated data, or tampering."""


class KeyDestroyedError(VaultError):
    """The data key was destroyed (crypto-shredded); its ciphertexts are unreadable by design."""


class AuditLogError(VaultError):
    """The audit log cannot be written or read."""


class KeyRotationError(VaultError):
    """The key-encryption key cannot be rotated here (environment or KMS keys, unknown KEKs)."""


class PatientNotFoundError(VaultError):
    """No patient with that pseudonym is in the vault."""


class ErasureIncompleteError(VaultError):
    """The warehouse erasure was committed, but purging a released place failed; run it again."""


class SourceFileNotReadableError(VaultError):
    """A data file of a batch could not be read for a reason of the environment (permissions,
    I/O), not of its content: the batch's ingest fails, nothing of it is marked ingested, and
    it is ingested whole once the file can be read (the message names the file's pseudonym)."""
