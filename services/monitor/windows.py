"""Windowed tests of one model version against its training reference, vectorised.

The reference is what the trainer stores in ``metadata.reference``
(``services/common/evaluation.reference_distributions``): decile edges of every numeric
feature and of the score, category shares of categorical features. A window is the last
``size`` predictions of a version (a count window: its sample size, and so the power of
the tests, does not depend on traffic), tested every ``hop`` predictions:

- PSI per feature and of the score, over the reference's bins;
- Kolmogorov-Smirnov D per numeric feature and of the score, evaluated at the reference's
  edges (the reference keeps quantiles, not the sample, so D is a lower bound of the
  exact statistic; its p-value is reported as evidence, thresholds are on D);
- input-range violation rate against the feature spec's min/max;
- null rate (and its increase over ``reference.features[f].null_rate`` when present);
- prediction-class distribution shift: PSI of the decided classes against
  ``reference.decisions`` (predicted-class shares on training data) when present, else
  the training class balance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import kolmogorov  # type: ignore[import-untyped]

from services.common.policies.monitor import WindowPolicy
from services.monitor.features import FeatureLayout, PreparedBatch


@dataclass(frozen=True)
class QuantileReference:
    """The reference CDF at each cut point, known only to lie in ``[low, high]``.

    A quantile edge ``c`` at level ``k/m`` says ``F(c-) <= k/m <= F(c)``; edges tied at one
    value (a point mass, e.g. an imputed 0 or a discrete feature) widen the interval.
    """

    cuts: np.ndarray
    low: np.ndarray
    high: np.ndarray


def numeric_reference(edges: Sequence[float]) -> QuantileReference:
    """Cut points and CDF intervals from quantile edges ``q_0 .. q_m`` at levels ``i/m``."""
    e = np.asarray(edges, dtype=np.float64)
    m = len(e) - 1
    if m < 1 or not np.all(np.isfinite(e)) or np.any(np.diff(e) < 0):
        raise ValueError("reference edges need at least two finite, sorted values")
    cuts = np.unique(e[1:m])
    low = np.searchsorted(e, cuts, side="left") / m
    high = (np.searchsorted(e, cuts, side="right") - 1) / m
    return QuantileReference(cuts, low, high)


def compare_numeric(column: np.ndarray, ref: QuantileReference) -> tuple[np.ndarray, np.ndarray]:
    """(window shares, reference shares) over the reference's bins.

    At each cut the window's CDF is also an interval, ``[P(x < c), P(x <= c)]``; where the
    two intervals overlap the CDFs may agree and are taken to, elsewhere the nearest ends
    are compared. Continuous data gets the usual binned comparison; discrete data is not
    punished for the point masses deciles cannot split.
    """
    n = len(column)
    if n == 0:
        return np.zeros(len(ref.cuts) + 1), np.diff(np.concatenate(([0.0], ref.low, [1.0])))
    below = (column[:, None] < ref.cuts[None, :]).sum(axis=0) / n
    at_or_below = (column[:, None] <= ref.cuts[None, :]).sum(axis=0) / n
    lo, hi = np.maximum(below, ref.low), np.minimum(at_or_below, ref.high)
    overlap = lo <= hi
    agreed = (lo + hi) / 2
    window_lower = at_or_below < ref.low  # the window's CDF is below the reference's
    r = np.where(overlap, agreed, np.where(window_lower, ref.low, ref.high))
    w = np.where(overlap, agreed, np.where(window_lower, at_or_below, below))
    return (
        np.diff(np.concatenate(([0.0], w, [1.0]))),
        np.diff(np.concatenate(([0.0], r, [1.0]))),
    )


def categorical_reference(shares: Mapping[str, float], values: np.ndarray) -> np.ndarray:
    """Expected share per category code (``values`` order), plus "other" (last)."""
    out = np.zeros(len(values) + 1, dtype=np.float64)
    for k, v in enumerate(values.tolist()):
        out[k] = float(shares.get(str(int(v)), 0.0))
    total = out.sum()
    if total > 0:
        out /= total
    return out


def psi(actual: np.ndarray, expected: np.ndarray, epsilon: float = 1e-4) -> float:
    """Population stability index of two share vectors (floored at ``epsilon``)."""
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_binned(actual: np.ndarray, expected: np.ndarray) -> float:
    """KS D between two binned distributions: the largest gap of their CDFs at the cuts
    (a lower bound of the exact statistic, which needs the reference sample)."""
    return float(np.max(np.abs(np.cumsum(actual) - np.cumsum(expected))))


def ks_pvalue(d: float, n: int) -> float:
    """Asymptotic one-sample KS p-value (Kolmogorov distribution, Stephens' correction)."""
    if n <= 0:
        return 1.0
    root = math.sqrt(n)
    return float(kolmogorov((root + 0.12 + 0.11 / root) * d))


def shares_of(bins: np.ndarray, n_bins: int) -> np.ndarray:
    counts = np.bincount(bins, minlength=n_bins)[:n_bins]
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


@dataclass(frozen=True)
class Measurement:
    """One windowed statistic set for one signal, ready for the severity rules."""

    signal: str
    kind: str  # drift | data_quality
    feature: str | None
    stats: dict[str, float]
    sample: int
    window_first_ms: int
    window_last_ms: int


class VersionReference:
    """The parsed reference of one version, matched to its feature layout."""

    def __init__(
        self,
        layout: FeatureLayout,
        reference: Mapping[str, Any],
        class_balance: Mapping[str, float] | None = None,
    ) -> None:
        features = reference.get("features") or {}
        self.numeric: dict[int, QuantileReference] = {}
        self.categorical: dict[int, np.ndarray] = {}
        self.null_rate: dict[int, float] = {}
        for j in layout.numeric:
            ref = features.get(layout.names[j]) or {}
            if ref.get("kind") == "numeric" and ref.get("edges"):
                self.numeric[j] = numeric_reference(ref["edges"])
        for j in layout.categorical:
            ref = features.get(layout.names[j]) or {}
            if ref.get("kind") == "categorical" and ref.get("shares"):
                self.categorical[j] = categorical_reference(ref["shares"], layout.cat_values[j])
        for j in layout.nullable:
            ref = features.get(layout.names[j]) or {}
            if isinstance(ref.get("null_rate"), int | float):
                self.null_rate[j] = float(ref["null_rate"])
        score = reference.get("score") or {}
        self.score = numeric_reference(score["edges"]) if score.get("edges") else None
        decisions = reference.get("decisions") or class_balance or {}
        self.classes: np.ndarray | None = None
        if decisions:
            shares = [float(decisions.get(c, 0.0)) for c in layout.classes] + [0.0]
            arr = np.asarray(shares, dtype=np.float64)
            self.classes = arr / arr.sum() if arr.sum() > 0 else None


class DriftWindow:
    """A ring buffer of one version's last predictions and the tests on it."""

    def __init__(
        self, layout: FeatureLayout, reference: VersionReference, policy: WindowPolicy
    ) -> None:
        self.layout = layout
        self.reference = reference
        self.policy = policy
        size = policy.size
        self.matrix = np.zeros((size, len(layout.names)), dtype=np.float32)
        self.nulls = np.zeros((size, len(layout.nullable)), dtype=bool)
        self.out_of_range = np.zeros((size, len(layout.bounded)), dtype=bool)
        self.codes = {j: np.zeros(size, dtype=np.int64) for j in layout.categorical}
        self.scores = np.zeros(size, dtype=np.float64)
        self.decisions = np.zeros(size, dtype=np.int64)
        self.times = np.zeros(size, dtype=np.int64)
        self.count = 0  # rows in the buffer
        self.head = 0  # next row to write
        self.since_eval = 0
        self.total = 0

    def add(self, batch: PreparedBatch) -> None:
        n = len(batch)
        size = self.policy.size
        src = 0
        if n > size:  # only the newest rows can stay
            src = n - size
        while src < n:
            take = min(size - self.head, n - src)
            dst = slice(self.head, self.head + take)
            rows = slice(src, src + take)
            self.matrix[dst] = batch.matrix[rows]
            self.nulls[dst] = batch.nulls[rows]
            self.out_of_range[dst] = batch.out_of_range[rows]
            for j, codes in batch.codes.items():
                if j in self.codes:
                    self.codes[j][dst] = codes[rows]
            self.scores[dst] = batch.scores[rows]
            self.decisions[dst] = batch.decisions[rows]
            self.times[dst] = batch.event_times[rows]
            self.head = (self.head + take) % size
            src += take
        self.count = min(size, self.count + n)
        self.since_eval += n
        self.total += n

    @property
    def due(self) -> bool:
        return self.count >= self.policy.min_samples and self.since_eval >= self.policy.hop

    def evaluate(self) -> list[Measurement]:
        """Every windowed statistic of the current window."""
        self.since_eval = 0
        n = self.count
        if n == 0:
            return []
        rows = slice(0, n)
        times = self.times[rows]
        first, last = int(times.min()), int(times.max())
        eps = self.policy.psi_epsilon
        ref = self.reference
        layout = self.layout
        out: list[Measurement] = []

        def measured(signal: str, kind: str, feature: str | None, stats: dict[str, float]) -> None:
            out.append(Measurement(signal, kind, feature, stats, n, first, last))

        for j, quantiles in ref.numeric.items():
            shares, expected = compare_numeric(self.matrix[rows, j].astype(np.float64), quantiles)
            d = ks_binned(shares, expected)
            measured(
                f"reference_drift.{layout.names[j]}",
                "drift",
                layout.names[j],
                {"psi": psi(shares, expected, eps), "ks": d, "ks_p": ks_pvalue(d, n)},
            )
        for j, expected in ref.categorical.items():
            shares = shares_of(self.codes[j][rows], len(expected))
            measured(
                f"reference_drift.{layout.names[j]}",
                "drift",
                layout.names[j],
                {"psi": psi(shares, expected, eps)},
            )
        if ref.score is not None:
            shares, expected = compare_numeric(self.scores[rows], ref.score)
            d = ks_binned(shares, expected)
            measured(
                "reference_drift.score",
                "drift",
                "score",
                {"psi": psi(shares, expected, eps), "ks": d, "ks_p": ks_pvalue(d, n)},
            )
        if ref.classes is not None:
            shares = shares_of(self.decisions[rows], len(ref.classes))
            measured("class_shift", "drift", None, {"psi": psi(shares, ref.classes, eps)})
        if layout.nullable:
            rates = self.nulls[rows].mean(axis=0)
            for k, j in enumerate(layout.nullable):
                stats = {"rate": float(rates[k])}
                if j in ref.null_rate:
                    stats["increase"] = float(rates[k]) - ref.null_rate[j]
                    stats["reference"] = ref.null_rate[j]
                measured(f"null_rate.{layout.names[j]}", "data_quality", layout.names[j], stats)
        if layout.bounded:
            rates = self.out_of_range[rows].mean(axis=0)
            for k, j in enumerate(layout.bounded):
                measured(
                    f"range_violation.{layout.names[j]}",
                    "data_quality",
                    layout.names[j],
                    {"rate": float(rates[k])},
                )
        return out
