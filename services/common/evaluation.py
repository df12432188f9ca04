"""How good a model is on labelled data, and the reference distributions drift is measured
against: shared by registration, readiness gates and the trainer."""

from __future__ import annotations

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


def reference_distributions(
    matrix: np.ndarray, spec: FeatureSpec, scores: np.ndarray
) -> dict[str, Any]:
    """Decile edges and shares per feature, and of the score: the baseline for drift tests."""
    ref: dict[str, Any] = {"features": {}, "score": {}}
    qs = np.linspace(0, 1, 11)
    for j, rule in enumerate(spec.features):
        column = matrix[:, j]
        if rule.categories:
            values, counts = np.unique(column, return_counts=True)
            ref["features"][rule.name] = {
                "kind": "categorical",
                "shares": {
                    str(int(v)): float(c / len(column)) for v, c in zip(values, counts, strict=True)
                },
            }
        else:
            ref["features"][rule.name] = {
                "kind": "numeric",
                "edges": [float(v) for v in np.quantile(column, qs)],
                "mean": float(column.mean()),
                "std": float(column.std()),
            }
    ref["score"] = {
        "kind": "numeric",
        "edges": [float(v) for v in np.quantile(scores, qs)],
        "mean": float(scores.mean()),
    }
    return ref
