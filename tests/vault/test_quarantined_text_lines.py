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


@pytest.mark.parametrize("letter", ["é", "€", "😀"])
def test_a_utf8_line_cut_within_a_character_keeps_its_names(letter: str) -> None:
    """A line cut short (by bytes: a size limit, ``head -c``) within its last character was no
    UTF-8 and read in Windows-1252: every name with a letter outside ASCII before the cut
    came out garbled (Zéphyrine as ZÃ©phyrine), so it gave no canary of hers."""
    line = (
        json.dumps(
            {"resourceType": "Patient", "name": [{"given": ["Zéphyrine"], "family": "Brontëwald"}]},
            ensure_ascii=False,
        )[:-1]
        + f', "address": [{{"city": "Montr{letter}al"'
    )
    raw = line.encode()
    cut = raw[: raw.rindex(letter.encode()) + 1]  # the letter's first byte only
    assert read.quarantined_text(cut) == line[: line.rindex(letter)]
    (patient,) = text_resources(read.quarantined_text(cut))
    assert patient["name"] == [{"given": ["Zéphyrine"], "family": "Brontëwald"}]
