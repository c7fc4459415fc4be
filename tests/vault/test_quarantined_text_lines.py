"""A quarantined record of many lines is read a line at a time, its resources as they come."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from vault import read
from vault.read import text_resources

PATIENT = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Quorvalent"}]}


def test_a_record_of_many_lines_yields_its_first_resource_before_reading_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines_read: list[str] = []
    line_values = read._line_values

    def counting(line: str, read_whole: bool) -> Iterator[object]:
        lines_read.append(line)
        return line_values(line, read_whole)

    monkeypatch.setattr(read, "_line_values", counting)
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


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r", "\x0c", "\x1e"])
def test_lines_split_as_before(sep: str) -> None:
    line = json.dumps(PATIENT)
    text = f" \ufeff{line}{sep}{line[:20]}{sep}{sep}  {line}{sep}"
    assert list(text_resources(text)) == [PATIENT, {}, PATIENT]


@pytest.mark.parametrize("brk", ["\u2028", "\u2029", "\x85"])
def test_a_line_break_a_json_string_may_hold_does_not_cut_its_line(brk: str) -> None:
    """U+2028, U+2029 and U+0085 may stand unescaped in a JSON string (a narrative's text,
    before the name in a Patient as Synthea writes one): a line cut there lost the name."""
    patient = {"resourceType": "Patient", "text": {"div": f"<div>a{brk}b</div>"}} | PATIENT
    lines = [json.dumps(patient, ensure_ascii=False), json.dumps(PATIENT)[:20]]
    # a whole file of lines (UTF-16, refused whole), one of them cut short: read line by line
    for text in ("\n".join(lines), "\n".join(lines).encode("utf-16").decode("utf-16")):
        assert list(text_resources(text)) == [patient, {}]


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


def test_values_joined_on_one_line_are_each_read() -> None:
    """NDJSON files joined where one did not end in a line feed (``cat``), with a byte-order
    mark between them: the line ``{...}{...}`` was read as its first value only, and a
    Patient after it gave no canary; the last value cut short is read as far as it goes."""
    observation = {"resourceType": "Observation", "id": "o1", "status": "final"}
    cut = json.dumps(PATIENT | {"id": "p2"})[:-8]
    for text in (
        json.dumps(observation) + json.dumps(PATIENT),
        json.dumps(observation) + "\ufeff" + json.dumps(PATIENT) + " " + cut,
        json.dumps(observation) + "\ufeff" + json.dumps(PATIENT),  # the mark alone between
        json.dumps(observation) + json.dumps(PATIENT) + "\n" + json.dumps(observation),
    ):
        resources = list(text_resources(text))
        assert resources[:2] == [observation, PATIENT], text
    assert resources[2] == observation
    (*_, last) = text_resources(json.dumps(observation) + json.dumps(PATIENT) + " " + cut)
    assert last == {"resourceType": "Patient", "id": "p2", "name": [{}]}


def test_a_json_array_is_read_as_its_objects_and_bundles_not_its_nested_arrays() -> None:
    """A file written as a JSON array of resources is read as its objects (a Bundle among
    them as its entries); an array inside the array is no resource and is not walked: a
    record of a million lines of ``[[[`` walked every level of every line."""
    patient = {"resourceType": "Patient", "id": "p"}
    bundle = {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Person"}}]}
    text = json.dumps([patient, [{"resourceType": "Observation"}], bundle, 7])
    assert [r["resourceType"] for r in text_resources(text)] == ["Patient", "Person"]


def test_documents_written_indented_one_after_another_are_each_read() -> None:
    """Two indented documents in one file (a Bundle and a Patient written by an exporter that
    writes one document a resource, joined): read as no value whole and as no resource a line
    at a time, its Patient gave no canary. The last one cut short is read as far as it goes."""
    observation = {"resourceType": "Observation", "id": "o1", "status": "final"}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": observation}]}
    second = PATIENT | {"id": "p2"}
    cut = json.dumps(second, indent=2)[:-8]  # its closing brackets lost
    text = "\n".join(json.dumps(v, indent=2) for v in (bundle, PATIENT)) + "\n" + cut
    assert list(text_resources(text)) == [observation, PATIENT, second]
    ndjson = json.dumps(observation) + "\n" + json.dumps(PATIENT) + "\n{oops\n"
    assert list(text_resources(ndjson)) == [observation, PATIENT]  # a line at a time, as before


@pytest.mark.parametrize(
    "record",
    [
        # a Patient contained in the record it was sent with
        {"resourceType": "Observation", "status": "?", "contained": [PATIENT]},
        # a Patient as a Parameters' value, or a part of one
        {"resourceType": "Parameters", "parameter": [{"name": "patient", "resource": PATIENT}]},
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "match", "part": [{"name": "p", "resource": PATIENT}]}],
        },
        # a Bundle whose one entry is written as an object, not an array
        {"resourceType": "Bundle", "type": "searchset", "entry": {"resource": PATIENT}},
        # ... contained in a Bundle's entry
        {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Encounter", "contained": [PATIENT]}}],
        },
    ],
)
def test_a_patient_carried_inside_a_refused_record_is_read(record: dict[str, object]) -> None:
    """A Patient contained in a record, a Parameters' value or a Bundle entry written as an
    object was read as the record holding it alone: refused, it gave no canary while her
    records in other files were released, and the erasure's search of her resources missed
    it."""
    found = [r for r in text_resources(json.dumps(record)) if r.get("resourceType") == "Patient"]
    assert found == [PATIENT]
