"""Model performance from joined predictions: mergeable sufficient statistics, and what they mean.

A ``GroupStats`` holds, for one model version x variant x segment x window, only sums and
counts (a confusion matrix, the log-loss and Brier sums, a label-delay histogram, per
feature-bin error counts). Sums can be added (partitions, tumbling windows into a sliding
one) and subtracted (a corrected label retracts its old contribution), so every metric is
exactly what scikit-learn computes on the same joined rows:

- accuracy, precision, recall, F1: ``accuracy_score`` and ``precision/recall/f1_score`` with
  ``pos_label`` = the spec's positive class (macro average over the classes when there are
  more than two), ``zero_division=0``;
- log-loss: ``log_loss(labels=classes)``: mean of ``-log(clip(p_true, eps, 1 - eps))``;
- Brier: ``brier_score_loss`` on the positive-class probability (binary), or the multiclass
  form (sum over classes, not halved) for three or more classes.

Label-delay percentiles come from a log-scale histogram (8 buckets per doubling), so they
are within ~4.5 % of the exact value. Threshold evaluation for the monitor is
``performance_breaches``: pure, so the monitor (the only writer of alerts) calls it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import orjson

EPS = 2.220446049250313e-16  # np.finfo(np.float64).eps: scikit-learn's clip for log-loss
DELAY_STEPS_PER_DOUBLING = 8
LOWER_IS_BETTER = frozenset({"log_loss", "brier"})


class Contribution(NamedTuple):
    """What one joined (prediction, label) adds to its groups' statistics (a tuple: made
    for every joined row, where a frozen dataclass's ``__init__`` costs ~3x as much)."""

    label: str
    decision: str
    log_loss: float
    brier: float
    delay_bucket: int
    bins: tuple[str, ...]  # "feature:bin" keys this row falls in


def log_loss_term(scores: Mapping[str, float], label: str) -> float:
    p = float(scores.get(label, 0.0))
    return -math.log(min(max(p, EPS), 1.0 - EPS))


def brier_term(
    scores: Mapping[str, float], label: str, classes: tuple[str, ...], positive: str
) -> float:
    if len(classes) <= 2:
        return (float(label == positive) - float(scores.get(positive, 0.0))) ** 2
    return sum((float(label == c) - float(scores.get(c, 0.0))) ** 2 for c in classes)


def delay_bucket(delay_ms: int) -> int:
    """Log-scale bucket of a label delay: bucket i holds [2^(i/8), 2^((i+1)/8)) ms; 0 holds <= 1."""
    if delay_ms <= 1:
        return 0
    return int(math.log2(delay_ms) * DELAY_STEPS_PER_DOUBLING)


def delay_bucket_value(bucket: int) -> float:
    """A representative delay (ms) for a bucket: its geometric middle."""
    if bucket <= 0:
        return 1.0 if bucket == 0 else 0.0
    return float(2.0 ** ((bucket + 0.5) / DELAY_STEPS_PER_DOUBLING))


@dataclass(slots=True)
class GroupStats:
    """Sufficient statistics of one version x variant x segment x window (see module doc)."""

    classes: tuple[str, ...]
    positive: str
    predicted: int = 0
    labeled: int = 0
    expired_unlabeled: int = 0
    log_loss_sum: float = 0.0
    brier_sum: float = 0.0
    confusion: dict[tuple[str, str], int] = field(default_factory=dict)  # (truth, decision)
    delays: dict[int, int] = field(default_factory=dict)  # delay bucket -> count
    bins: dict[str, list[int]] = field(default_factory=dict)  # "feature:bin" -> [n, errors]

    def add(self, c: Contribution, sign: int = 1, bins: bool = True) -> None:
        """Add (sign=1) or retract (sign=-1) one joined row; ``bins``: count its feature bins."""
        self.labeled += sign
        self.log_loss_sum += sign * c.log_loss
        self.brier_sum += sign * c.brier
        _bump(self.confusion, (c.label, c.decision), sign)
        _bump(self.delays, c.delay_bucket, sign)
        if not bins:
            return
        wrong = int(c.label != c.decision)
        for key in c.bins:
            cell = self.bins.get(key)
            if cell is None:
                cell = self.bins[key] = [0, 0]
            cell[0] += sign
            cell[1] += sign * wrong
            if cell[0] == 0:
                del self.bins[key]

    def merge(self, other: GroupStats) -> GroupStats:
        self.predicted += other.predicted
        self.labeled += other.labeled
        self.expired_unlabeled += other.expired_unlabeled
        self.log_loss_sum += other.log_loss_sum
        self.brier_sum += other.brier_sum
        for k, v in other.confusion.items():
            _bump(self.confusion, k, v)
        for b, v in other.delays.items():
            _bump(self.delays, b, v)
        for key, (n, wrong) in other.bins.items():
            cell = self.bins.setdefault(key, [0, 0])
            cell[0] += n
            cell[1] += wrong
        return self

    def copy(self) -> GroupStats:
        return GroupStats(self.classes, self.positive).merge(self)

    # --- what the sums mean ---------------------------------------------------------------

    @property
    def correct(self) -> int:
        return sum(v for (t, d), v in self.confusion.items() if t == d)

    def delay_percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) of label delay in ms, from the histogram."""
        total = sum(self.delays.values())
        if total <= 0:
            return None
        rank = max(1, math.ceil(q / 100.0 * total))
        seen = 0
        for bucket in sorted(self.delays):
            seen += self.delays[bucket]
            if seen >= rank:
                return delay_bucket_value(bucket)
        return delay_bucket_value(max(self.delays))

    def precision_recall_f1(self) -> tuple[float, float, float]:
        if len(self.classes) <= 2:
            return _prf(self.confusion, self.positive)
        per_class = [_prf(self.confusion, c) for c in self.classes]
        n = len(per_class)
        return (
            sum(p for p, _, _ in per_class) / n,
            sum(r for _, r, _ in per_class) / n,
            sum(f for _, _, f in per_class) / n,
        )

    def metrics(self) -> dict[str, float]:
        """The published metrics map (counts, rates, losses, delay percentiles, error bins)."""
        out: dict[str, float] = {
            "predicted": float(self.predicted),
            "labeled": float(self.labeled),
            "expired_unlabeled": float(self.expired_unlabeled),
        }
        if self.predicted > 0:
            out["coverage"] = self.labeled / self.predicted
        if self.labeled <= 0:
            return out
        precision, recall, f1 = self.precision_recall_f1()
        out |= {
            "accuracy": self.correct / self.labeled,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "log_loss": self.log_loss_sum / self.labeled,
            "brier": self.brier_sum / self.labeled,
        }
        for q in (50, 90, 99):
            value = self.delay_percentile(q)
            if value is not None:
                out[f"label_delay_p{q}_ms"] = value
        for key, (n, wrong) in sorted(self.bins.items()):
            feature, _, bin_name = key.rpartition(":")
            out[f"error_rate:{feature}:{bin_name}"] = wrong / n
            out[f"n:{feature}:{bin_name}"] = float(n)
        return out

    # --- shards: how partitions share their statistics (Redis, see the service) -----------

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "c": list(self.classes),
                "pos": self.positive,
                "pred": self.predicted,
                "lab": self.labeled,
                "exp": self.expired_unlabeled,
                "ll": self.log_loss_sum,
                "br": self.brier_sum,
                "cm": [[t, d, v] for (t, d), v in self.confusion.items()],
                "dl": [[b, v] for b, v in self.delays.items()],
                "bins": self.bins,
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> GroupStats:
        raw: dict[str, Any] = orjson.loads(data)
        return cls(
            classes=tuple(raw["c"]),
            positive=raw["pos"],
            predicted=int(raw["pred"]),
            labeled=int(raw["lab"]),
            expired_unlabeled=int(raw["exp"]),
            log_loss_sum=float(raw["ll"]),
            brier_sum=float(raw["br"]),
            confusion={(t, d): int(v) for t, d, v in raw["cm"]},
            delays={int(b): int(v) for b, v in raw["dl"]},
            bins={k: [int(v[0]), int(v[1])] for k, v in raw["bins"].items()},
        )


# --- where the label join publishes its latest statistics (Redis) -------------------------


def latest_stats_key(prefix: str, model: str, version: str, variant: str, segment: str) -> str:
    """Hash of the newest published MonitoringStats of one group: fields ``tumbling`` and
    ``sliding``, each the record as JSON (written by the label join, read by the monitor's
    status and the query API)."""
    return f"{prefix}monitor:{model}:{version}:{variant}:{segment}"


def stats_index_key(prefix: str, model: str) -> str:
    """Set of ``version:variant:segment`` with a latest-statistics hash, per model."""
    return f"{prefix}monitor:{model}:index"


def _bump(counts: dict[Any, int], key: Any, by: int) -> None:
    value = counts.get(key, 0) + by
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


def _prf(confusion: Mapping[tuple[str, str], int], cls: str) -> tuple[float, float, float]:
    tp = confusion.get((cls, cls), 0)
    predicted = sum(v for (_, d), v in confusion.items() if d == cls)
    actual = sum(v for (t, _), v in confusion.items() if t == cls)
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * tp / (predicted + actual) if predicted + actual else 0.0
    return precision, recall, f1


def merge_all(shards: Iterable[GroupStats]) -> GroupStats | None:
    merged: GroupStats | None = None
    for shard in shards:
        merged = shard.copy() if merged is None else merged.merge(shard)
    return merged


# --- thresholds: evaluated by the monitor, the only writer of alerts ----------------------


@dataclass(frozen=True, slots=True)
class ThresholdRule:
    """Alert when ``metric`` is worse than the training value by more than ``max_drop``.

    For accuracy-like metrics "worse" is lower; for log_loss and brier it is higher. A rule
    needs at least ``min_labels`` labelled rows in the window before it may fire.
    """

    metric: str = "f1"
    max_drop: float = 0.05
    critical_drop: float | None = 0.15
    min_labels: int = 200
    window_kind: Literal["tumbling", "sliding"] = "sliding"
    segments: Literal["all", "every"] = "all"  # only the "all" segment, or every segment


@dataclass(frozen=True, slots=True)
class PerformancePolicy:
    rules: tuple[ThresholdRule, ...] = (ThresholdRule(),)


@dataclass(frozen=True, slots=True)
class Breach:
    model: str
    model_version: str
    variant: str
    segment: str
    metric: str
    observed: float
    baseline: float
    threshold: float
    labels: int
    window_kind: str
    window_start: int
    window_end: int
    severity: Literal["warning", "critical"]

    @property
    def key(self) -> str:
        """One alert per (model, version, signal); the variant and segment are part of the signal."""
        return (
            f"{self.model}@{self.model_version}:performance:{self.metric}:"
            f"{self.variant}:{self.segment}"
        )


def performance_breaches(
    stats: Iterable[Mapping[str, Any]],
    training_metrics: Mapping[str, Mapping[str, float]],
    policy: PerformancePolicy,
) -> list[Breach]:
    """Which MonitoringStats records break a rule of the policy.

    ``stats`` are decoded MonitoringStats records; ``training_metrics`` maps ``model@version``
    to that version's training metrics (e.g. ``metadata.holdout_metrics``). A version with no
    training value for a rule's metric is not judged by that rule. When several records of
    the same (version, variant, segment, rule) qualify, only the newest window is judged.
    """
    newest: dict[tuple[str, str, str, str, int], Mapping[str, Any]] = {}
    for record in stats:
        for i, rule in enumerate(policy.rules):
            if record["window_kind"] != rule.window_kind:
                continue
            if rule.segments == "all" and record["segment"] != "all":
                continue
            ident = (
                record["model"],
                record["model_version"],
                record["variant"],
                record["segment"],
                i,
            )
            held = newest.get(ident)
            if held is None or (record["window_end"], record.get("emitted_at", 0)) >= (
                held["window_end"],
                held.get("emitted_at", 0),
            ):
                newest[ident] = record
    breaches: list[Breach] = []
    for (model, version, variant, segment, i), record in sorted(newest.items()):
        rule = policy.rules[i]
        baseline = training_metrics.get(f"{model}@{version}", {}).get(rule.metric)
        metrics = record["metrics"]
        observed = metrics.get(rule.metric)
        labels = int(metrics.get("labeled", record.get("count", 0)))
        if baseline is None or observed is None or labels < rule.min_labels:
            continue
        lower_better = rule.metric in LOWER_IS_BETTER
        drop = (observed - baseline) if lower_better else (baseline - observed)
        if drop <= rule.max_drop:
            continue
        critical = rule.critical_drop is not None and drop > rule.critical_drop
        threshold = baseline + rule.max_drop if lower_better else baseline - rule.max_drop
        breaches.append(
            Breach(
                model=model,
                model_version=version,
                variant=variant,
                segment=segment,
                metric=rule.metric,
                observed=float(observed),
                baseline=float(baseline),
                threshold=threshold,
                labels=labels,
                window_kind=record["window_kind"],
                window_start=int(record["window_start"]),
                window_end=int(record["window_end"]),
                severity="critical" if critical else "warning",
            )
        )
    return breaches
