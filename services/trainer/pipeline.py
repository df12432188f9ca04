"""Training a recipe with exactly the vectorisation serving uses, exported to ONNX.

Every model scoremesh trains goes through ``train``: the bootstrap model (its recipe is
``BUILTIN_RECIPE``, a declared scikit-learn pipeline) and every retrain (the recipe
recorded with the version it replaces). The model sees what ``Vectoriser`` produces from
the feature spec, in training and in serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

import services
from scoremesh.contract.featurespec import FeatureSpec, Vectoriser
from services.common.evaluation import classification_metrics, reference_distributions
from services.common.model_version import DataWindow, VersionMetadata
from services.common.recipes import (
    ONNX_OPSET,
    EntryPointRecipe,
    Fit,
    PipelineRecipe,
    PipelineStep,
    class_indices,
    operators,
    pin,
    resolve,
    to_onnx,
)

# The built-in recipe: what `models bootstrap` trains, recorded like any team's recipe.
BUILTIN_RECIPE = PipelineRecipe(
    steps=[
        PipelineStep(name="scale", estimator="sklearn.preprocessing.StandardScaler"),
        PipelineStep(
            name="model",
            estimator="sklearn.ensemble.GradientBoostingClassifier",
            params={"n_estimators": 60, "max_depth": 3, "random_state": 0},
        ),
    ]
)


def builtin_recipe() -> PipelineRecipe | EntryPointRecipe:
    """The built-in recipe pinned to the scikit-learn installed here."""
    return pin(BUILTIN_RECIPE)


@dataclass(frozen=True)
class TrainedModel:
    onnx: bytes
    metadata: VersionMetadata


def train(
    spec: FeatureSpec,
    rows: list[dict[str, Any]],
    labels: list[str],
    recipe: PipelineRecipe | EntryPointRecipe,
    seed: int = 0,
    dataset: str = "",
    window: DataWindow | None = None,
    cv_folds: int = 5,
    parent_version: str | None = None,
    limitations: str = "",
    fit: Fit | None = None,
    allowed_packages: tuple[str, ...] = (),
    accept_code: bool = False,
) -> TrainedModel:
    """Fit ``recipe`` (stratified k-fold, then on 80%, evaluated on the held-out 20%),
    convert it to ONNX and describe it: metrics, class balance, reference distributions,
    the recipe with the hash of the code that ran. Raises ``RecipeMismatch`` before any fit
    when the code found here is not the code the recipe recorded. ``fit``: an already
    resolved fit function (benchmarks compare it with the recipe path)."""
    if len(rows) != len(labels) or len(rows) < 50:
        raise ValueError(f"need at least 50 labelled rows, got {len(rows)}")
    if fit is None:
        fit, recipe = resolve(recipe, allowed_packages, accept_code)
    matrix = Vectoriser(spec).transform(rows)
    y = class_indices(labels, spec)
    positive = spec.classes.index(spec.positive)
    x_train, x_test, y_train, y_test = train_test_split(
        matrix, y, test_size=0.2, stratify=y, random_state=seed
    )
    cv_scores: dict[str, list[float]] = {}
    if cv_folds >= 2:
        folds = StratifiedKFold(cv_folds, shuffle=True, random_state=seed)
        for fold_train, fold_test in folds.split(x_train, y_train):
            est = fit(x_train[fold_train], y_train[fold_train], spec)
            proba = est.predict_proba(x_train[fold_test])[:, positive]
            for k, v in classification_metrics(
                y_train[fold_test], est.predict(x_train[fold_test]), proba, positive
            ).items():
                cv_scores.setdefault(k, []).append(v)
    estimator = fit(x_train, y_train, spec)
    test_proba = estimator.predict_proba(x_test)[:, positive]
    holdout = classification_metrics(y_test, estimator.predict(x_test), test_proba, positive)
    onnx = to_onnx(estimator, spec)
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
        reference=reference_distributions(matrix, spec, estimator.predict_proba(matrix), rows),
        limitations=limitations,
        parent_version=parent_version,
        onnx_opset=ONNX_OPSET,
        code_version=f"scoremesh {services.__version__}",
        recipe=recipe,
        onnx_operators=operators(onnx),
    )
    return TrainedModel(onnx=onnx, metadata=metadata)
