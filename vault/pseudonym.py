"""Keyed pseudonyms: HMAC-SHA256 under the pseudonym key, never a plain hash.

A plain hash of a resource id or an SSN can be reversed by hashing candidate values; a keyed
HMAC cannot without the key. Every use gets its own domain tag so that a pseudonym made for one
purpose never equals one made for another.
"""

from __future__ import annotations

import hashlib
import hmac

PSEUDONYM_HEX_CHARS = 32  # 128 bits: collision-free at any realistic patient count
_CACHE_LIMIT = 50_000  # references repeat (every resource names its patient): memoise a window


class Pseudonymizer:
    """Deterministic, keyed pseudonyms for resource ids and other identifying values."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError(f"pseudonym key must be at least 32 bytes, got {len(key)}")
        self._key = key
        self._cache: dict[tuple[str, str], str] = {}

    def token(self, domain: str, value: str, *, memoise: bool = True) -> str:
        """Pseudonym of ``value`` within ``domain`` (hex, 128 bits). Values seen once only
        (content digests) pass ``memoise=False`` to keep the window for repeating ones."""
        cached = self._cache.get((domain, value)) if memoise else None
        if cached is not None:
            return cached
        if not domain or "\x00" in domain:
            raise ValueError("domain must be a non-empty string without NUL")
        message = domain.encode() + b"\x00" + value.encode("utf-8")
        token = hmac.digest(self._key, message, hashlib.sha256).hex()[:PSEUDONYM_HEX_CHARS]
        if memoise:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[(domain, value)] = token
        return token

    def resource_key(self, resource_type: str, resource_id: str) -> str:
        """Pseudonym of the logical resource ``Type/id``; also the patient pseudonym."""
        return self.token("resource", f"{resource_type}/{resource_id}")


# A versionId this long or shorter and made of digits is a version counter, kept as it is: the
# newest version is the highest number (vault.warehouse.NEWEST_VERSION_FIRST)
VERSION_COUNTER_DIGITS = 6


def stored_version_id(pseudo: Pseudonymizer, version_id: str | None) -> str | None:
    """What the vault keeps in plain text of a ``meta.versionId``: a version counter as it is,
    any other value (an id, which may be text such as a name or a longer number such as an SSN)
    as its pseudonym. Versions are only compared for equality and, as numbers, for order, so
    both survive; a non-counter version is ordered by ``lastUpdated``, as before."""
    if version_id is None:
        return None
    if version_id.isascii() and version_id.isdigit() and len(version_id) <= VERSION_COUNTER_DIGITS:
        return version_id
    return "v-" + pseudo.token("version", version_id)
