"""How good a model is on labelled data, and the reference distributions drift is measured
against: shared by registration, readiness gates and the trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from scoremesh.contract.featurespec import FeatureSpec


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, p_pos: np.ndarray, positive: int
) -> dict[str, float]:
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, pos_label=positive, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, pos_label=positive, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, pos_label=positive, zero_division=0)),
    }
    if len(np.unique(y_true)) > 1:
        out["roc_auc"] = float(roc_auc_score(y_true == positive, p_pos))
    return out


def _numeric(column: np.ndarray) -> dict[str, Any]:
    qs = np.linspace(0, 1, 11)
    return {
        "kind": "numeric",
        "edges": [float(v) for v in np.quantile(column, qs)],
        "mean": float(column.mean()),
        "std": float(column.std()),
    }


def reference_distributions(
    matrix: np.ndarray,
    spec: FeatureSpec,
    probabilities: np.ndarray,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The baseline drift is measured against, from a model's inputs and outputs.

    Per feature: decile edges, mean and std (numeric) or category shares (categorical),
    and the null rate of nullable or optional features when the raw ``rows`` are given;
    of the positive-class score and of the confidence (the top class probability): decile
    edges; ``decisions``: the shares of predicted classes. ``probabilities`` is
    ``[n, len(spec.classes)]`` in the spec's class order.
    """
    ref: dict[str, Any] = {"features": {}, "rows": len(matrix)}
    for j, rule in enumerate(spec.features):
        column = matrix[:, j]
        if rule.categories:
            values, counts = np.unique(column, return_counts=True)
            entry: dict[str, Any] = {
                "kind": "categorical",
                "shares": {
                    str(int(v)): float(c / len(column)) for v, c in zip(values, counts, strict=True)
                },
            }
        else:
            entry = _numeric(column)
        if rows is not None and (rule.nullable or not rule.required):
            entry["null_rate"] = float(np.mean([row.get(rule.name) is None for row in rows]))
        ref["features"][rule.name] = entry
    probabilities = np.asarray(probabilities, dtype=np.float64)
    positive = spec.classes.index(spec.positive)
    ref["score"] = _numeric(probabilities[:, positive])
    ref["confidence"] = _numeric(probabilities.max(axis=1))
    decided = np.bincount(probabilities.argmax(axis=1), minlength=len(spec.classes))
    ref["decisions"] = {
        c: float(decided[i] / max(1, len(matrix))) for i, c in enumerate(spec.classes)
    }
    return ref
