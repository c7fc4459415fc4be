"""A quarantined record of many lines is read a line at a time, its resources as they come."""

from __future__ import annotations

import json

import pytest

from vault import read
from vault.read import text_resources

PATIENT = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Quorvalent"}]}


def test_a_record_of_many_lines_yields_its_first_resource_before_reading_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines_read: list[str] = []
    line_json = read._line_json

    def counting(line: str) -> object:
        lines_read.append(line)
        return line_json(line)

    monkeypatch.setattr(read, "_line_json", counting)
    # no JSON as a whole (its lines cut short): each line read alone, nested lists after it
    text = json.dumps(PATIENT)[:-1] + "\n" + "[[[[[[[[\n" * 10_000
    first = next(text_resources(text))
    assert first == PATIENT
    assert len(lines_read) == 1


def test_a_record_of_one_line_cut_short_is_read_whole_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    text_json = read._text_json

    def counting(text: str) -> object:
        calls.append(len(text))
        return text_json(text)

    monkeypatch.setattr(read, "_text_json", counting)
    text = json.dumps(PATIENT)[:-8]  # the family name cut short: left out, never "Quorval"
    assert list(text_resources(text)) == [{"resourceType": "Patient", "id": "p1", "name": [{}]}]
    assert calls == [len(text)]


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r", "\u2028", "\x0c"])
def test_lines_split_as_before(sep: str) -> None:
    line = json.dumps(PATIENT)
    text = f" \ufeff{line}{sep}{line[:20]}{sep}{sep}  {line}{sep}"
    assert list(text_resources(text)) == [PATIENT, {}, PATIENT]
