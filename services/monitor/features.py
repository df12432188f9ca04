"""Predictions of one model version as arrays: the model's view of the features and more.

The matrix comes from ``Vectoriser`` (the code the scorer and the trainer use, nulls
imputed as the model saw them), so the training reference in the version's metadata and
the live windows are computed on the same numbers. Null and range masks come from the
raw values; categorical columns become codes ``0..k-1`` with ``k`` for anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoremesh.contract.featurespec import FeatureRule, FeatureSpec, Vectoriser


def category_values(rule: FeatureRule) -> np.ndarray:
    """The values the vectoriser produces for each category, in category order.

    String categories become their index; numeric categories (e.g. a ``long`` code) keep
    their value. ``reference_distributions`` keys shares by ``str(int(value))`` of both.
    """
    cats = rule.categories or []
    if rule.dtype == "string":
        return np.arange(len(cats), dtype=np.float64)
    return np.asarray([float(c) for c in cats], dtype=np.float64)


def encode_categories(column: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Codes ``0..k-1`` for known values, ``k`` for unknown ones (vectorised)."""
    k = len(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    pos = np.searchsorted(ordered, column)
    pos_clipped = np.minimum(pos, k - 1)
    known = (pos < k) & (ordered[pos_clipped] == column)
    return np.where(known, order[pos_clipped], k).astype(np.int64)


@dataclass(frozen=True)
class FeatureLayout:
    """Which columns of a version's matrix are monitored, and how."""

    spec: FeatureSpec
    names: tuple[str, ...]  # every spec feature, in matrix order
    numeric: tuple[int, ...]  # monitored numeric columns
    categorical: tuple[int, ...]  # monitored categorical columns
    nullable: tuple[int, ...]  # columns whose value may be null or missing
    bounded: tuple[int, ...]  # numeric columns with a min or max
    lows: np.ndarray
    highs: np.ndarray
    cat_values: dict[int, np.ndarray]
    classes: tuple[str, ...]

    @classmethod
    def of(cls, spec: FeatureSpec, exclude: frozenset[str] = frozenset()) -> FeatureLayout:
        numeric: list[int] = []
        categorical: list[int] = []
        nullable: list[int] = []
        bounded: list[int] = []
        for j, rule in enumerate(spec.features):
            if rule.name in exclude:
                continue
            if rule.categories:
                categorical.append(j)
            elif rule.dtype in ("double", "long"):
                numeric.append(j)
                if rule.min is not None or rule.max is not None:
                    bounded.append(j)
            if rule.nullable or not rule.required:
                nullable.append(j)
        return cls(
            spec=spec,
            names=tuple(spec.names),
            numeric=tuple(numeric),
            categorical=tuple(categorical),
            nullable=tuple(nullable),
            bounded=tuple(bounded),
            lows=np.asarray(
                [
                    -np.inf if spec.features[j].min is None else spec.features[j].min
                    for j in bounded
                ],
                dtype=np.float64,
            ),
            highs=np.asarray(
                [np.inf if spec.features[j].max is None else spec.features[j].max for j in bounded],
                dtype=np.float64,
            ),
            cat_values={j: category_values(spec.features[j]) for j in categorical},
            classes=tuple(spec.classes),
        )


@dataclass(frozen=True)
class PreparedBatch:
    """One version's predictions from one batch, as arrays (n rows)."""

    matrix: np.ndarray  # [n, F] float32, imputed as the model saw it
    nulls: np.ndarray  # [n, len(layout.nullable)] bool
    out_of_range: np.ndarray  # [n, len(layout.bounded)] bool
    codes: dict[int, np.ndarray]  # categorical column -> codes [n]
    scores: np.ndarray  # [n] float64, probability of the positive class
    confidence: np.ndarray  # [n] float64, probability of the decided class
    decisions: np.ndarray  # [n] int64, class index (len(classes) = unknown)
    event_times: np.ndarray  # [n] int64, ms

    def __len__(self) -> int:
        return len(self.scores)


class Preparer:
    """Turns decoded Prediction records of one version into a ``PreparedBatch``."""

    def __init__(self, layout: FeatureLayout) -> None:
        self.layout = layout
        self.vectoriser = Vectoriser(layout.spec)
        self._class_index = {c: i for i, c in enumerate(layout.classes)}

    def prepare(self, predictions: Sequence[dict[str, Any]]) -> PreparedBatch:
        layout = self.layout
        n = len(predictions)
        rows = [p["features"] for p in predictions]
        matrix = self.vectoriser.transform(rows)
        nulls = np.empty((n, len(layout.nullable)), dtype=bool)
        for k, j in enumerate(layout.nullable):
            name = layout.names[j]
            nulls[:, k] = np.fromiter((r.get(name) is None for r in rows), dtype=bool, count=n)
        if layout.bounded:
            block = matrix[:, list(layout.bounded)].astype(np.float64)
            out_of_range = (block < layout.lows) | (block > layout.highs)
            for k, j in enumerate(layout.bounded):
                if j in layout.nullable:
                    out_of_range[:, k] &= ~nulls[:, layout.nullable.index(j)]
        else:
            out_of_range = np.zeros((n, 0), dtype=bool)
        codes = {
            j: encode_categories(matrix[:, j].astype(np.float64), values)
            for j, values in layout.cat_values.items()
        }
        scores = np.fromiter((p["score"] for p in predictions), dtype=np.float64, count=n)
        if len(layout.classes) == 2:
            confidence = np.maximum(scores, 1.0 - scores)
        else:
            confidence = np.fromiter(
                (max(p["scores"].values(), default=0.0) for p in predictions),
                dtype=np.float64,
                count=n,
            )
        unknown = len(layout.classes)
        index = self._class_index
        decisions = np.fromiter(
            (index.get(p["decision"], unknown) for p in predictions), dtype=np.int64, count=n
        )
        times = np.fromiter((p["event_time"] for p in predictions), dtype=np.int64, count=n)
        return PreparedBatch(
            matrix, nulls, out_of_range, codes, scores, confidence, decisions, times
        )
