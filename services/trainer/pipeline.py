"""Training, with exactly the vectorisation serving uses, exported to ONNX.

The model sees what ``Vectoriser`` produces from a feature spec, in training and in
serving; the scikit-learn pipeline only adds what the ONNX graph carries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import services
from scoremesh.contract.featurespec import FeatureSpec, Vectoriser
from services.common.evaluation import classification_metrics, reference_distributions
from services.common.model_version import DataWindow, VersionMetadata

ONNX_OPSET = 17


@dataclass(frozen=True)
class TrainedModel:
    onnx: bytes
    metadata: VersionMetadata


def make_estimator(seed: int) -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("model", GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=seed)),
        ]
    )


def train(
    spec: FeatureSpec,
    rows: list[dict[str, Any]],
    labels: list[str],
    seed: int = 0,
    dataset: str = "",
    window: DataWindow | None = None,
    cv_folds: int = 5,
    parent_version: str | None = None,
    limitations: str = "",
) -> TrainedModel:
    if len(rows) != len(labels) or len(rows) < 50:
        raise ValueError(f"need at least 50 labelled rows, got {len(rows)}")
    unknown = sorted(set(labels) - set(spec.classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the spec's classes {spec.classes}")
    matrix = Vectoriser(spec).transform(rows)
    y = np.array([spec.classes.index(label) for label in labels])
    positive = spec.classes.index(spec.positive)
    x_train, x_test, y_train, y_test = train_test_split(
        matrix, y, test_size=0.2, stratify=y, random_state=seed
    )
    cv_scores: dict[str, list[float]] = {}
    for fold_train, fold_test in StratifiedKFold(cv_folds, shuffle=True, random_state=seed).split(
        x_train, y_train
    ):
        est = make_estimator(seed).fit(x_train[fold_train], y_train[fold_train])
        proba = est.predict_proba(x_train[fold_test])[:, positive]
        for k, v in classification_metrics(
            y_train[fold_test], est.predict(x_train[fold_test]), proba, positive
        ).items():
            cv_scores.setdefault(k, []).append(v)
    estimator = make_estimator(seed).fit(x_train, y_train)
    test_proba = estimator.predict_proba(x_test)[:, positive]
    holdout = classification_metrics(y_test, estimator.predict(x_test), test_proba, positive)
    onnx_model = convert_sklearn(
        estimator,
        initial_types=[(spec.input_name, FloatTensorType([None, len(spec.features)]))],
        options={id(estimator.named_steps["model"]): {"zipmap": False}},
        target_opset=ONNX_OPSET,
    )
    balance = {c: float(np.mean(y == i)) for i, c in enumerate(spec.classes)}
    metadata = VersionMetadata(
        trained_at=int(time.time() * 1000),
        data_window=window or DataWindow(),
        dataset=dataset,
        dataset_size=len(rows),
        class_balance=balance,
        holdout_metrics=holdout,
        cv_metrics={
            "folds": cv_folds,
            "mean": {k: float(np.mean(v)) for k, v in cv_scores.items()},
            "std": {k: float(np.std(v)) for k, v in cv_scores.items()},
        },
        reference=reference_distributions(
            matrix, spec, estimator.predict_proba(matrix)[:, positive]
        ),
        limitations=limitations,
        parent_version=parent_version,
        onnx_opset=ONNX_OPSET,
        code_version=f"scoremesh {services.__version__}",
    )
    return TrainedModel(onnx=onnx_model.SerializeToString(), metadata=metadata)
