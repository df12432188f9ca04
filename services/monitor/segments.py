"""What `scoremesh monitor status` shows of a version besides drift: counts, decision
shares, label coverage and delay, and the error rate over the version's whole stream.

Kept by the second stage (the owner of the version's whole stream) and snapshotted with
the detectors. Error rates by input-feature bin would need the features on
predictions.labeled, which the label join does not publish.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from services.monitor.features import FeatureLayout, PreparedBatch
from services.monitor.windows import VersionReference


class VersionStats:
    def __init__(self, layout: FeatureLayout, reference: VersionReference) -> None:
        self.classes = layout.classes
        self.predictions = 0
        self.score_sum = 0.0
        self.decisions = np.zeros(len(layout.classes) + 1, dtype=np.int64)
        self.labels = 0
        self.errors = 0
        self.delay_sum_ms = 0
        self.delay_max_ms = 0
        self.first_event_ms: int | None = None
        self.last_event_ms: int | None = None

    def add_predictions(self, batch: PreparedBatch) -> None:
        n = len(batch)
        if n == 0:
            return
        self.predictions += n
        self.score_sum += float(batch.scores.sum())
        self.decisions += np.bincount(batch.decisions, minlength=len(self.decisions))[
            : len(self.decisions)
        ]
        first, last = int(batch.event_times.min()), int(batch.event_times.max())
        self.first_event_ms = (
            first if self.first_event_ms is None else min(self.first_event_ms, first)
        )
        self.last_event_ms = last if self.last_event_ms is None else max(self.last_event_ms, last)

    def add_labels(self, errors: np.ndarray, delays_ms: np.ndarray) -> None:
        if len(errors) == 0:
            return
        self.labels += len(errors)
        self.errors += int(errors.sum())
        self.delay_sum_ms += int(delays_ms.sum())
        self.delay_max_ms = max(self.delay_max_ms, int(delays_ms.max()))

    def as_dict(self) -> dict[str, Any]:
        labels = self.labels
        shares = self.decisions / self.predictions if self.predictions else self.decisions * 0.0
        return {
            "predictions": self.predictions,
            "mean_score": self.score_sum / self.predictions if self.predictions else None,
            "decisions": {c: float(shares[i]) for i, c in enumerate((*self.classes, "unknown"))},
            "labels": labels,
            "label_coverage": labels / self.predictions if self.predictions else None,
            "label_delay_mean_s": self.delay_sum_ms / labels / 1000 if labels else None,
            "label_delay_max_s": self.delay_max_ms / 1000 if labels else None,
            "error_rate": self.errors / labels if labels else None,
            "first_event_ms": self.first_event_ms,
            "last_event_ms": self.last_event_ms,
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "predictions": self.predictions,
            "score_sum": self.score_sum,
            "decisions": self.decisions.tolist(),
            "labels": self.labels,
            "errors": self.errors,
            "delay_sum_ms": self.delay_sum_ms,
            "delay_max_ms": self.delay_max_ms,
            "first_event_ms": self.first_event_ms,
            "last_event_ms": self.last_event_ms,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.predictions = int(state.get("predictions", 0))
        self.score_sum = float(state.get("score_sum", 0.0))
        decisions = state.get("decisions") or []
        if len(decisions) == len(self.decisions):
            self.decisions = np.asarray(decisions, dtype=np.int64)
        self.labels = int(state.get("labels", 0))
        self.errors = int(state.get("errors", 0))
        self.delay_sum_ms = int(state.get("delay_sum_ms", 0))
        self.delay_max_ms = int(state.get("delay_max_ms", 0))
        self.first_event_ms = state.get("first_event_ms")
        self.last_event_ms = state.get("last_event_ms")
