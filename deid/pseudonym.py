"""Keyed pseudonyms: HMAC-SHA256 under the pseudonym key, never a plain hash.

A plain hash of a resource id or an SSN can be reversed by hashing candidate values; a keyed
HMAC cannot without the key. Every use gets its own domain tag so that a pseudonym made for one
purpose never equals one made for another.
"""

from __future__ import annotations

import hashlib
import hmac

PSEUDONYM_HEX_CHARS = 32  # 128 bits: collision-free at any realistic patient count


class Pseudonymizer:
    """Deterministic, keyed pseudonyms for resource ids and other identifying values."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError(f"pseudonym key must be at least 32 bytes, got {len(key)}")
        self._key = key

    def token(self, domain: str, value: str) -> str:
        """Pseudonym of ``value`` within ``domain`` (hex, 128 bits)."""
        if not domain or "\x00" in domain:
            raise ValueError("domain must be a non-empty string without NUL")
        message = domain.encode() + b"\x00" + value.encode("utf-8")
        digest = hmac.new(self._key, message, hashlib.sha256).hexdigest()
        return digest[:PSEUDONYM_HEX_CHARS]

    def resource_key(self, resource_type: str, resource_id: str) -> str:
        """Pseudonym of the logical resource ``Type/id``; also the patient pseudonym."""
        return self.token("resource", f"{resource_type}/{resource_id}")
