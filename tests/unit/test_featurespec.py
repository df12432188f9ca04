from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from scoremesh.contract.featurespec import FeatureRule, FeatureSpec, RuleSet, Vectoriser
from services.trainer.datasets import CREDIT_SPEC, credit_events


def event(**features: Any) -> dict[str, Any]:
    base, _ = next(credit_events(1, seed=3))
    base["features"].update(features)
    return base


@pytest.fixture
def rules() -> RuleSet:
    return RuleSet([CREDIT_SPEC], "credit@1.0.0#g2")


def codes(result: Any) -> list[str]:
    return [r.code for r in result.rejections]


def test_valid_event_is_normalised_and_stamped(rules: RuleSet) -> None:
    result = rules.check(event(age=30.0, salary=50_000))
    assert result.ok
    assert result.event is not None
    assert result.event["rule_set"] == "credit@1.0.0#g2"
    assert result.event["features"]["age"] == 30 and type(result.event["features"]["age"]) is int
    assert type(result.event["features"]["salary"]) is float


@pytest.mark.parametrize(
    ("features", "code", "field"),
    [
        ({"salary": "a lot"}, "wrong_type", "salary"),
        ({"salary": True}, "wrong_type", "salary"),  # a bool is not a number
        ({"age": 30.5}, "wrong_type", "age"),
        ({"loan": math.nan}, "not_finite", "loan"),
        ({"loan": math.inf}, "not_finite", "loan"),
        ({"age": 250}, "out_of_range", "age"),
        ({"zipcode": 42}, "unknown_category", "zipcode"),
        ({"salary": None}, "null_feature", "salary"),
    ],
)
def test_each_rule_rejects_with_its_reason(
    rules: RuleSet, features: dict[str, Any], code: str, field: str
) -> None:
    result = rules.check(event(**features))
    assert not result.ok
    assert [(r.code, r.field) for r in result.rejections] == [(code, field)]


def test_missing_required_feature(rules: RuleSet) -> None:
    e = event()
    del e["features"]["age"]
    assert codes(rules.check(e)) == ["missing_feature"]


def test_nullable_feature_passes_and_flag_rules_do_not_reject(rules: RuleSet) -> None:
    result = rules.check(event(commission=None, car=25, brand_new_field=1))
    assert result.ok
    assert sorted(f.code for f in result.flags) == ["out_of_range", "unknown_feature"]
    assert result.event is not None and result.event["flags"] == ["out_of_range", "unknown_feature"]


@pytest.mark.parametrize("car", [2**63, -(2**63) - 1, 10**30, 1e19])
def test_a_long_beyond_64_bits_is_rejected_even_where_range_only_flags(
    rules: RuleSet, car: Any
) -> None:
    # found by tests/faults/test_fuzz_http.py: it passed with a flag, the API answered 200
    # and the prediction could never be encoded for the predictions topic
    result = rules.check(event(car=car))
    assert codes(result) == ["wrong_type"] and "64-bit" in result.rejections[0].message
    assert rules.check(event(car=2**63 - 1)).ok


def test_whole_float_event_time_and_null_attributes_are_accepted(rules: RuleSet) -> None:
    e = event()
    e["event_time"] = 1_700_000_000_000.0
    e["attributes"] = None
    result = rules.check(e)
    assert result.ok and result.event is not None
    assert result.event["event_time"] == 1_700_000_000_000 and result.event["attributes"] == {}


@pytest.mark.parametrize("value", [1e39, -1e300, 3.5e38])
def test_a_double_beyond_float32_is_rejected_even_where_range_only_flags(value: float) -> None:
    spec = CREDIT_SPEC.model_copy(
        update={
            "features": [
                r.model_copy(update={"range_action": "flag"}) if r.name == "salary" else r
                for r in CREDIT_SPEC.features
            ]
        }
    )
    rules = RuleSet([spec], "credit@1.0.0#g2")
    result = rules.check(event(salary=value))
    assert codes(result) == ["not_finite"] and "float32" in result.rejections[0].message
    flagged = rules.check(event(salary=3.0e38))
    assert flagged.ok and [f.code for f in flagged.flags] == ["out_of_range"]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda e: e.pop("event_id"), "event_id"),
        (lambda e: e.__setitem__("event_id", ""), "event_id"),
        (lambda e: e.__setitem__("entity_id", 7), "entity_id"),
        (lambda e: e.__setitem__("event_time", "yesterday"), "event_time"),
        (lambda e: e.__setitem__("event_time", "2026-01-01T00:00:00"), "event_time"),  # no zone
        (lambda e: e.__setitem__("attributes", {"a": 1}), "attributes"),
        (lambda e: e.__setitem__("attributes", ""), "attributes"),  # was read as {}
        (lambda e: e.__setitem__("attributes", []), "attributes"),
        (lambda e: e.__setitem__("event_time", 1_700_000_000_000.7), "event_time"),  # truncated
        (lambda e: e.__setitem__("features", [1, 2]), "features"),
    ],
)
def test_envelope_errors(rules: RuleSet, mutate: Any, field: str) -> None:
    e = event()
    mutate(e)
    result = rules.check(e)
    assert ("invalid_envelope", field) in [(r.code, r.field) for r in result.rejections]


def test_iso_event_time_with_zone_is_accepted(rules: RuleSet) -> None:
    e = event()
    e["event_time"] = "2026-01-01T00:00:00Z"
    result = rules.check(e)
    assert result.event is not None and result.event["event_time"] == 1_767_225_600_000


def test_non_object_is_rejected(rules: RuleSet) -> None:
    assert codes(rules.check([1, 2, 3])) == ["invalid_envelope"]


def test_challenger_only_feature_is_known_and_checked() -> None:
    extra = FeatureSpec(
        features=[
            *CREDIT_SPEC.features,
            FeatureRule(name="score_bureau", dtype="double", min=0, max=1),
        ],
        classes=["0", "1"],
    )
    rules = RuleSet([CREDIT_SPEC, extra], "v")
    assert rules.check(event()).ok  # absent: fine, the champion does not need it
    assert rules.check(event(score_bureau=0.5)).flags == []
    assert codes(rules.check(event(score_bureau=3.0))) == ["out_of_range"]


def test_spec_rejects_inconsistent_rules() -> None:
    with pytest.raises(ValidationError, match="impute"):
        FeatureRule(name="x", dtype="double", nullable=True)
    with pytest.raises(ValidationError, match="min"):
        FeatureRule(name="x", dtype="double", min=5, max=1)
    with pytest.raises(ValidationError, match="categories"):
        FeatureRule(name="x", dtype="string")
    with pytest.raises(ValidationError, match="unique"):
        FeatureSpec(features=[FeatureRule(name="x", dtype="long")] * 2, classes=["a", "b"])


def test_vectoriser_orders_imputes_and_encodes() -> None:
    spec = FeatureSpec(
        features=[
            FeatureRule(name="b", dtype="double", nullable=True, impute=-1.0),
            FeatureRule(name="a", dtype="boolean"),
            FeatureRule(name="c", dtype="string", categories=["x", "y"]),
        ],
        classes=["0", "1"],
    )
    matrix = Vectoriser(spec).transform(
        [
            {"a": True, "b": 2.5, "c": "y"},
            {"a": False, "b": None, "c": "x"},
        ]
    )
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, np.array([[2.5, 1, 1], [-1, 0, 0]], dtype=np.float32))
