import hashlib
import hmac

import pytest

from vault.pseudonym import Pseudonymizer


def test_known_answer() -> None:
    p = Pseudonymizer(b"\x0b" * 32)
    expected = hmac.new(b"\x0b" * 32, b"resource\x00Patient/123", hashlib.sha256).hexdigest()
    assert p.resource_key("Patient", "123") == expected[:32] == "e9b61672869607b338c7e5baf0792654"


def test_domains_and_keys_separate() -> None:
    p, q = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    assert p.token("file", "x") != p.token("content", "x")
    assert p.token("file", "x") != q.token("file", "x")
    assert p.token("file", "x") == Pseudonymizer(b"a" * 32).token("file", "x")


def test_rejects_short_key_and_bad_domain() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Pseudonymizer(b"short")
    with pytest.raises(ValueError, match="domain"):
        Pseudonymizer(b"a" * 32).token("", "x")
