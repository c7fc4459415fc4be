"""The two seams through which the vault reads the outside world: the time and random bytes.

Keyrings, data keys, nonces and audit entries take them as parameters so tests can fix them;
production code passes nothing and gets :func:`utcnow` and :func:`os.urandom`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
RandomBytes = Callable[[int], bytes]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC: naive datetimes would be read as local time."""
    return datetime.now(UTC)
