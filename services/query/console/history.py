"""A bounded, in-memory history of ``monitoring.stats``, for the console's charts.

Redis keeps only the latest window of each group; the topic keeps them all (90 days), so
the query service folds the recent part of the topic into this history and keeps
following it (``services/query/console/follower.py``). Pure, no I/O.

One series per (model, version, variant, segment, window kind):

- ``tumbling`` (the label join's performance windows, republished while labels arrive):
  a point per window, the latest record of a window wins;
- ``drift`` (the monitor's drift evaluations, segment ``""``, metrics ``psi.<feature>``,
  ``ks.<feature>``, ``psi.__score__``): a point per evaluation;
- ``sliding`` windows are not kept: each is a rolling summary of tumbling windows the
  history already holds.

Points are keyed by ``window_end`` and kept in order. Bounds: ``max_points`` per series
(oldest dropped) and ``max_series`` in all (the series updated longest ago dropped).
Memory is about ``series x points x metrics x 32 bytes``: performance points keep only
the metrics the console charts (``PERFORMANCE_METRICS``), drift points every metric.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

PERFORMANCE_KIND = "tumbling"
DRIFT_KIND = "drift"
KEPT_KINDS = frozenset({PERFORMANCE_KIND, DRIFT_KIND})
PERFORMANCE_METRICS: tuple[str, ...] = (
    "accuracy",
    "coverage",
    "f1",
    "precision",
    "recall",
    "log_loss",
    "brier",
    "labeled",
    "predicted",
    "label_delay_p50_ms",
)
"""Charted per version and segment; ``coverage`` is labelled / predicted in the window."""
DRIFT_STATISTICS: tuple[str, ...] = ("psi", "ks")
SCORE_FEATURE = "__score__"


class SeriesKey(NamedTuple):
    model: str
    version: str
    variant: str
    segment: str
    kind: str


@dataclass
class Series:
    """The points of one series, ordered by ``window_end``."""

    key: SeriesKey
    ends: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)

    def upsert(self, start: int, end: int, count: int, metrics: dict[str, float]) -> None:
        i = bisect.bisect_left(self.ends, end)
        if i < len(self.ends) and self.ends[i] == end:
            self.starts[i], self.counts[i], self.metrics[i] = start, count, metrics
            return
        self.ends.insert(i, end)
        self.starts.insert(i, start)
        self.counts.insert(i, count)
        self.metrics.insert(i, metrics)

    def trim(self, max_points: int) -> None:
        extra = len(self.ends) - max_points
        if extra > 0:
            del self.ends[:extra], self.starts[:extra], self.counts[:extra], self.metrics[:extra]

    def values(self, metric: str) -> list[tuple[int, float]]:
        """``(window_end, value)`` of every point that has the metric."""
        return [
            (end, m[metric]) for end, m in zip(self.ends, self.metrics, strict=True) if metric in m
        ]

    def metric_names(self) -> set[str]:
        names: set[str] = set()
        for m in self.metrics:
            names.update(m)
        return names

    def __len__(self) -> int:
        return len(self.ends)


def _kept_metrics(kind: str, metrics: Mapping[str, float]) -> dict[str, float]:
    if kind == DRIFT_KIND:
        return {k: float(v) for k, v in metrics.items()}
    return {k: float(metrics[k]) for k in PERFORMANCE_METRICS if k in metrics}


def drift_feature(metric: str) -> tuple[str, str] | None:
    """``psi.age`` -> ``("psi", "age")``; ``None`` for anything else."""
    statistic, dot, feature = metric.partition(".")
    if not dot or not feature or statistic not in DRIFT_STATISTICS:
        return None
    return statistic, feature


class StatsHistory:
    """The console's memory of monitoring.stats: bounded, newest series kept."""

    def __init__(self, max_points: int = 240, max_series: int = 1000) -> None:
        if max_points < 1 or max_series < 1:
            raise ValueError("max_points and max_series must be at least 1")
        self.max_points = max_points
        self.max_series = max_series
        self._series: OrderedDict[SeriesKey, Series] = OrderedDict()
        self.records = 0  # folded into the history
        self.skipped = 0  # kinds the history does not keep (sliding)
        self.dropped_series = 0

    def add(self, record: Mapping[str, Any]) -> bool:
        """Fold one MonitoringStats record; True when it was kept."""
        kind = str(record["window_kind"])
        if kind not in KEPT_KINDS:
            self.skipped += 1
            return False
        key = SeriesKey(
            str(record["model"]),
            str(record["model_version"]),
            str(record["variant"]),
            str(record["segment"]),
            kind,
        )
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = Series(key)
            while len(self._series) > self.max_series:
                self._series.popitem(last=False)
                self.dropped_series += 1
        else:
            self._series.move_to_end(key)
        series.upsert(
            int(record["window_start"]),
            int(record["window_end"]),
            int(record["count"]),
            _kept_metrics(kind, record["metrics"]),
        )
        series.trim(self.max_points)
        self.records += 1
        return True

    def extend(self, records: Iterable[Mapping[str, Any]]) -> int:
        return sum(self.add(r) for r in records)

    # --- reads ----------------------------------------------------------------------

    def series(
        self,
        model: str,
        kind: str,
        *,
        version: str | None = None,
        variant: str | None = None,
        segment: str | None = None,
    ) -> list[Series]:
        """The series of a model, filtered, in (version, variant, segment) order."""
        found = [
            s
            for k, s in self._series.items()
            if k.model == model
            and k.kind == kind
            and (version is None or k.version == version)
            and (variant is None or k.variant == variant)
            and (segment is None or k.segment == segment)
        ]
        found.sort(key=lambda s: (s.key.version, s.key.variant, s.key.segment))
        return found

    def segments(self, model: str, version: str | None = None) -> list[str]:
        """The performance segments seen for a model, ``all`` first."""
        seen = {
            k.segment
            for k in self._series
            if k.model == model
            and k.kind == PERFORMANCE_KIND
            and (version is None or k.version == version)
        }
        return sorted(seen, key=lambda s: (s != "all", s))

    def metric_names(self, model: str, kind: str) -> list[str]:
        names: set[str] = set()
        for s in self.series(model, kind):
            names |= s.metric_names()
        return sorted(names)

    def drift_versions(self, model: str) -> list[str]:
        return sorted(
            {k.version for k in self._series if k.model == model and k.kind == DRIFT_KIND}
        )

    def models(self) -> list[str]:
        return sorted({k.model for k in self._series})

    @property
    def series_count(self) -> int:
        return len(self._series)

    @property
    def point_count(self) -> int:
        return sum(len(s) for s in self._series.values())
