"""Windowed statistics against a training reference: PSI, KS, null and range rates, classes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from scoremesh.contract.featurespec import FeatureRule, FeatureSpec
from services.common.policies.monitor import WindowPolicy
from services.monitor.features import FeatureLayout, Preparer, encode_categories
from services.monitor.windows import (
    DriftWindow,
    VersionReference,
    compare_numeric,
    ks_binned,
    ks_pvalue,
    numeric_reference,
    psi,
)

LEVELS = np.linspace(0, 1, 11)


def deciles(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.quantile(values, LEVELS)]


def test_psi_is_zero_for_equal_shares_and_matches_the_formula() -> None:
    even = np.full(10, 0.1)
    assert psi(even, even) == 0.0
    actual = np.array([0.2, 0.3, 0.5])
    expected = np.array([0.3, 0.3, 0.4])
    assert psi(actual, expected) == pytest.approx(
        (0.2 - 0.3) * np.log(0.2 / 0.3) + (0.5 - 0.4) * np.log(0.5 / 0.4)
    )


def test_a_sample_from_the_reference_distribution_has_a_small_psi_and_ks() -> None:
    rng = np.random.default_rng(1)
    ref = numeric_reference(deciles(rng.normal(size=50_000)))
    shares, expected = compare_numeric(rng.normal(size=5_000), ref)
    assert expected == pytest.approx(np.full(10, 0.1), abs=1e-12)
    assert psi(shares, expected) < 0.01 and ks_binned(shares, expected) < 0.03


def test_a_half_sigma_shift_breaches_and_ks_agrees_with_scipy_at_the_edges() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=50_000)
    window = rng.normal(0.5, 1.0, size=5_000)
    ref = numeric_reference(deciles(reference))
    shares, expected = compare_numeric(window, ref)
    assert psi(shares, expected) > 0.2
    # binned D is the exact one-sample D evaluated at the reference's edges: a lower bound
    d = ks_binned(shares, expected)
    exact = scipy_stats.kstest(window, scipy_stats.norm.cdf).statistic
    assert 0.15 < d <= exact + 0.01
    assert ks_pvalue(d, 5_000) < 1e-10 and ks_pvalue(0.0, 5_000) == 1.0


def test_point_masses_deciles_cannot_split_do_not_look_like_drift() -> None:
    """A discrete feature (multiples of 100k, zeros imputed) against its own deciles."""
    rng = np.random.default_rng(3)
    sample = rng.choice(
        [0, 100_000, 200_000, 300_000, 900_000], p=[0.25, 0.1, 0.3, 0.3, 0.05], size=20_000
    )
    ref = numeric_reference(deciles(sample))
    again = rng.choice(
        [0, 100_000, 200_000, 300_000, 900_000], p=[0.25, 0.1, 0.3, 0.3, 0.05], size=5_000
    )
    shares, expected = compare_numeric(again.astype(np.float64), ref)
    assert psi(shares, expected) < 0.01
    moved = rng.choice(
        [0, 100_000, 200_000, 300_000, 900_000], p=[0.05, 0.1, 0.3, 0.3, 0.25], size=5_000
    )
    shares, expected = compare_numeric(moved.astype(np.float64), ref)
    assert psi(shares, expected) > 0.2 and ks_binned(shares, expected) > 0.15


def test_tied_edges_make_one_bin_and_shares_stay_a_distribution() -> None:
    ref = numeric_reference([0, 0, 0, 0, 5, 6, 7, 8, 9, 10, 10])
    assert ref.cuts.tolist() == [0, 5, 6, 7, 8, 9, 10]
    assert ref.low[0] == 0.0 and ref.high[0] == pytest.approx(0.3)
    shares, expected = compare_numeric(np.array([0.0, 0.0, 1.0, 11.0]), ref)
    assert shares.sum() == pytest.approx(1.0) and expected.sum() == pytest.approx(1.0)
    assert (shares >= 0).all() and (expected >= 0).all()


def test_categories_encode_with_an_other_code() -> None:
    values = np.array([3.0, 1.0, 2.0])
    codes = encode_categories(np.array([1.0, 2.0, 3.0, 7.0, -1.0]), values)
    assert codes.tolist() == [1, 2, 0, 3, 3]


SPEC = FeatureSpec(
    features=[
        FeatureRule(name="amount", dtype="double", min=0, max=100, range_action="flag"),
        FeatureRule(name="bonus", dtype="double", nullable=True, impute=0.0),
        FeatureRule(name="tier", dtype="string", categories=["a", "b", "c"]),
    ],
    classes=["no", "yes"],
)


def predictions(
    n: int, seed: int, amount_shift: float = 0.0, null_share: float = 0.2
) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        score = float(rng.beta(2, 5))
        out.append(
            {
                "event_id": f"e{i}",
                "event_time": 1_000 * i,
                "features": {
                    "amount": float(rng.uniform(0, 100) + amount_shift),
                    "bonus": None if rng.random() < null_share else float(rng.exponential(5)),
                    "tier": str(rng.choice(["a", "b", "c"], p=[0.5, 0.3, 0.2])),
                },
                "score": score,
                "scores": {"no": 1 - score, "yes": score},
                "decision": "yes" if score >= 0.5 else "no",
            }
        )
    return out


def reference() -> dict:
    rng = np.random.default_rng(99)
    return {
        "features": {
            "amount": {"kind": "numeric", "edges": deciles(rng.uniform(0, 100, 20_000))},
            "bonus": {
                "kind": "numeric",
                "edges": [0, 0, 0, 0.5, 1.5, 2.5, 3.7, 5.2, 7.3, 10.9, 60],
                "null_rate": 0.2,
            },
            "tier": {"kind": "categorical", "shares": {"0": 0.5, "1": 0.3, "2": 0.2}},
        },
        "score": {"kind": "numeric", "edges": deciles(rng.beta(2, 5, 20_000))},
        "decisions": {"no": 0.89, "yes": 0.11},
    }


def window_for(preds: list[dict], size: int = 2_000) -> DriftWindow:
    layout = FeatureLayout.of(SPEC)
    window = DriftWindow(
        layout,
        VersionReference(layout, reference()),
        WindowPolicy(size=size, hop=500, min_samples=500),
    )
    preparer = Preparer(layout)
    for start in range(0, len(preds), 300):
        window.add(preparer.prepare(preds[start : start + 300]))
    return window


def by_signal(window: DriftWindow) -> dict[str, dict[str, float]]:
    return {m.signal: m.stats for m in window.evaluate()}


def test_a_stationary_window_is_within_every_threshold() -> None:
    stats = by_signal(window_for(predictions(3_000, seed=1)))
    assert stats["reference_drift.amount"]["psi"] < 0.02
    assert stats["reference_drift.tier"]["psi"] < 0.02
    assert stats["reference_drift.score"]["psi"] < 0.02
    assert stats["class_shift"]["psi"] < 0.02
    assert stats["null_rate.bonus"]["rate"] == pytest.approx(0.2, abs=0.03)
    assert abs(stats["null_rate.bonus"]["increase"]) < 0.03
    assert stats["range_violation.amount"]["rate"] == 0.0


def test_window_holds_only_the_newest_rows_and_measures_them_exactly() -> None:
    old = predictions(2_000, seed=2)
    new = predictions(2_000, seed=3, amount_shift=50.0, null_share=0.5)
    window = window_for(old + new)
    assert window.count == 2_000 and window.total == 4_000
    stats = by_signal(window)
    newest = [p["features"] for p in new]
    out_of_range = sum(1 for f in newest if f["amount"] > 100) / 2_000
    nulls = sum(1 for f in newest if f["bonus"] is None) / 2_000
    assert stats["range_violation.amount"]["rate"] == pytest.approx(out_of_range)
    assert stats["null_rate.bonus"]["rate"] == pytest.approx(nulls)
    assert stats["null_rate.bonus"]["increase"] == pytest.approx(nulls - 0.2)
    assert (
        stats["reference_drift.amount"]["psi"] > 1.0 and stats["reference_drift.amount"]["ks"] > 0.4
    )


def test_window_is_due_every_hop_once_it_has_enough_rows() -> None:
    layout = FeatureLayout.of(SPEC)
    window = DriftWindow(
        layout,
        VersionReference(layout, reference()),
        WindowPolicy(size=1_000, hop=400, min_samples=600),
    )
    preparer = Preparer(layout)
    dues = []
    for start in range(0, 2_000, 200):
        window.add(preparer.prepare(predictions(2_000, seed=4)[start : start + 200]))
        dues.append(window.due)
        if window.due:
            window.evaluate()
    assert dues == [False, False, True, False, True, False, True, False, True, False]
