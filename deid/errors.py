"""The one error type of the de-identification and crypto layer."""

from __future__ import annotations


class DeidError(Exception):
    """Base class for every error raised by :mod:`deid`.

    Messages never carry PHI or key material: they name key ids, pseudonyms, counts and shapes.
    """


class KeyMaterialError(DeidError):
    """Key material is missing, malformed or unusable."""


class InvalidCiphertext(DeidError):  # noqa: N818 - mirrors cryptography's InvalidTag naming
    """A ciphertext failed authentication: wrong key, wrong associated data, or tampering."""


class KeyDestroyedError(DeidError):
    """The data key was destroyed (crypto-shredded); its ciphertexts are unreadable by design."""


class AuditLogError(DeidError):
    """The audit log cannot be written or read."""


class KeyRotationError(DeidError):
    """The key-encryption key cannot be rotated here (environment or KMS keys, unknown KEKs)."""


class PatientNotFoundError(DeidError):
    """No patient with that pseudonym is in the vault."""


class ErasureIncompleteError(DeidError):
    """The warehouse erasure was committed, but an erasure hook failed; run it again."""
