"""What makes two records the same content: the digest ingest compares them by, and the vault
keys (as a content MAC) and verifies on every read."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def content_digest(obj: dict[str, Any]) -> bytes:
    """The digest ingest compares content by: of the parsed record written again with its keys
    sorted and no spaces, so that the same JSON value written compactly or with spaces, with
    its keys in another order, alone on an NDJSON line or inside a Bundle, is one content (the
    bytes as received made each of those a conflict within a batch and a new version across
    batches). Strings compare after their escapes are read; numbers by the value orjson
    parses (``1.50`` and ``1.5`` are one number, as in JSON). Any other difference, however
    small, is another content."""
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).digest()
