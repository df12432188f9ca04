"""Performance-threshold breaches from monitoring.stats records.

The label-join publishes windowed metrics per version x variant x segment and owns the
rule that judges them (``services.common.performance.performance_breaches``, pure);
the monitor, the only writer of alerts, calls it for each record it consumes.
``PerformanceCheck`` is the seam: any function of that shape can replace it (tests do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.common.model_version import ModelVersion
from services.common.performance import PerformancePolicy as ThresholdPolicy
from services.common.performance import ThresholdRule, performance_breaches
from services.common.policies.monitor import PerformancePolicy, Severity


@dataclass(frozen=True)
class PerformanceBreach:
    metric: str
    value: float
    threshold: float
    severity: Severity
    baseline: float | None = None


@dataclass(frozen=True)
class PerformanceVerdict:
    """Which metrics of a record were judged, and which of those broke their rule."""

    judged: frozenset[str]
    breaches: tuple[PerformanceBreach, ...] = ()


# (MonitoringStats record, the version if the registry knows it) -> verdict. A metric that
# was not judged (too few labels, another window kind, no training value) neither opens
# nor clears an alert.
PerformanceCheck = Callable[[dict[str, Any], ModelVersion | None], PerformanceVerdict]


def label_join_check(policy: PerformancePolicy) -> PerformanceCheck:
    """The label-join's threshold rules, applied to one record at a time."""
    rules = tuple(ThresholdRule(**rule.model_dump()) for rule in policy.rules)
    thresholds = ThresholdPolicy(rules=rules)

    def check(stats: dict[str, Any], version: ModelVersion | None) -> PerformanceVerdict:
        if version is None:
            return PerformanceVerdict(frozenset())
        training = version.metadata.holdout_metrics
        metrics: dict[str, float] = stats.get("metrics") or {}
        labels = int(metrics.get("labeled", stats.get("count", 0)))
        judged = frozenset(
            rule.metric
            for rule in rules
            if rule.window_kind == stats.get("window_kind")
            and (rule.segments == "every" or stats.get("segment") == "all")
            and rule.metric in metrics
            and rule.metric in training
            and labels >= rule.min_labels
        )
        found = performance_breaches(
            [stats], {f"{version.name}@{version.version}": training}, thresholds
        )
        return PerformanceVerdict(
            judged,
            tuple(
                PerformanceBreach(b.metric, b.observed, b.threshold, b.severity, b.baseline)
                for b in found
            ),
        )

    return check


def performance_signal(metric: str, segment: str) -> str:
    return f"performance.{metric}" if segment in ("", "all") else f"performance.{metric}.{segment}"
