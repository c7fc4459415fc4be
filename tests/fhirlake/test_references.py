from __future__ import annotations

import pytest

from fhirlake.references import classify, is_external, literal_target, local_target

BASE = "https://ehr.example.org/fhir"


@pytest.mark.parametrize(
    ("value", "base", "target"),
    [
        ("Patient/1", None, ("Patient", "1")),
        ("Patient/1/_history/2", None, ("Patient", "1")),
        ("Patient/1", BASE, ("Patient", "1")),
        (f"{BASE}/Patient/1", BASE, ("Patient", "1")),
        (f"{BASE}/Patient/1", BASE + "/", ("Patient", "1")),
        (f"{BASE}/Patient/1", None, None),  # no base configured: every absolute URL is foreign
        ("http://other.example/fhir/Patient/1", BASE, None),
        (f"{BASE}x/Patient/1", BASE, None),  # a base is a whole path prefix, not a string prefix
        (f"{BASE}/nested/Patient/1", BASE, None),
        ("urn:uuid:0f0e", BASE, None),
        ("Patient?identifier=a|b", BASE, None),
        ("#c1", BASE, None),
    ],
)
def test_local_targets(value: str, base: str | None, target: tuple[str, str] | None) -> None:
    assert local_target(value, base) == target


def test_other_servers_are_external_never_local() -> None:
    value = "http://other.example/fhir/Patient/1"
    assert classify(value) == "absolute" and literal_target(value) == ("Patient", "1")
    assert is_external(value, BASE) and is_external(value, None)
    assert not is_external(f"{BASE}/Patient/1", BASE)
    assert not is_external("Patient/1", None)
