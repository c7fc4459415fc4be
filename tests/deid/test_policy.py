from __future__ import annotations

import json
from pathlib import Path

import pytest

from deid.policy import Policy, PolicyError


def rules(*items: dict) -> dict:
    return {"fhirVersion": "R4", "fhirPathRules": list(items)}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "JSON object"),
        ({"fhirPathRules": "x"}, "must be a list"),
        (rules({"path": "Patient.name"}), "rule 0: unknown method None"),
        (rules({"path": "Patient.name", "method": "keep"}, {"method": "redact"}), "rule 1: 'path'"),
        (rules({"path": "Patient.name.where(", "method": "redact"}), "rule 0: path is not valid"),
        (rules({"path": "Patient.name", "method": "redcat"}), "rule 0: unknown method 'redcat'"),
        (rules({"path": "Patient.name", "method": "substitute"}), "needs 'replaceWith'"),
        (rules({"path": "Observation.value", "method": "perturb", "span": -1}), "span"),
        (rules({"path": "Patient.gender", "method": "generalize"}), "non-empty 'cases'"),
        (
            rules({"path": "Patient.gender", "method": "generalize", "cases": {"$this =": "'x'"}}),
            "case condition",
        ),
        ({**rules(), "parameters": {"dateShiftScope": "planet"}}, "dateShiftScope"),
        ({**rules(), "parameters": {"restrictedZipCodeTabulationAreas": ["1234"]}}, "3-digit"),
        ({**rules(), "fhirVersion": "Stu3"}, "R4 only"),
        ({**rules(), "processingErrors": "ignore"}, "processingErrors"),
    ],
)
def test_bad_policies_fail_at_load_with_the_rule_index(document: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(")):
        Policy.from_dict(document)


def test_plans_are_compiled_once_per_resource_type() -> None:
    policy = Policy.from_dict(
        rules(
            {"path": "Patient.name", "method": "redact"},
            {"path": "nodesByType('HumanName')", "method": "redact"},
            {"path": "Observation.subject", "method": "cryptoHash"},
        )
    )
    patient_plan = policy.plan_for("Patient")
    assert [r.index for r in patient_plan] == [0, 1]
    assert policy.plan_for("Patient") is patient_plan
    assert [r.index for r in policy.plan_for("Observation")] == [1, 2]


@pytest.mark.parametrize("name", ["research", "safe_harbor"])
def test_shipped_profiles_load(name: str) -> None:
    policy = Policy.shipped(name)
    assert policy.parameters.restricted_zip3 >= {"036", "059", "893"}
    assert policy.parameters.extension_allow_list
    # the shipped profiles are allow-lists: nothing left for block rules to do
    assert policy.release is not None and not policy.rules
    assert policy.release.resources["*"] == {"id": "pseudonymize"}
    if name == "research":
        assert policy.parameters.date_shift_scope == "patient"
        assert policy.release.date_rule == "shift"
    else:
        assert policy.release.date_rule == "year"


def test_unreadable_policy_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="not JSON"):
        Policy.load(bad)
    bad.write_text(json.dumps(rules({"path": "Patient.id", "method": "keep"})))
    assert Policy.load(bad).name == "p"


@pytest.mark.parametrize("name", ["research", "safe_harbor"])
def test_shipped_parameters_are_the_loaded_policys_without_compiling_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deid import allowlist, policy

    expected = Policy.shipped(name).parameters

    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("the allow-list was compiled")

    monkeypatch.setattr(allowlist, "compile_plan", no_compiling)
    assert policy.shipped_parameters(name) == expected


def test_an_unknown_shipped_profile_names_the_ones_there_are() -> None:
    from deid.policy import shipped_parameters

    with pytest.raises(PolicyError, match=r"no shipped policy 'nope' \(available: \['research'"):
        shipped_parameters("nope")
