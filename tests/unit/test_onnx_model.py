from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scoremesh.contract.featurespec import FeatureRule, FeatureSpec
from services.common.artifacts import sha256_of
from services.common.model_version import ModelVersion
from services.common.onnx_model import ModelLoadError, load_model
from services.trainer.datasets import CREDIT_SPEC, credit_events


def version_for(
    data: bytes, spec: FeatureSpec = CREDIT_SPEC, sha: str | None = None
) -> ModelVersion:
    return ModelVersion(
        name="credit",
        version="1.0.0",
        stage="champion",
        generation=1,
        artifact_uri="x",
        artifact_sha256=sha or sha256_of(data),
        artifact_size=len(data),
        feature_spec_json=spec.model_dump_json(),
        metadata_json="{}",
    )


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    return path


def test_onnx_scores_match_the_training_pipeline(tmp_path: Path, trained_model: Any) -> None:
    model = load_model(version_for(trained_model.onnx), write(tmp_path, trained_model.onnx))
    events = [e for e, _ in credit_events(500, seed=99)]
    scores = model.predict_matrix(model.vectoriser.transform([e["features"] for e in events]))
    assert scores.probabilities.shape == (500, 2)
    np.testing.assert_allclose(scores.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert set(scores.labels) <= {"0", "1"}
    accuracy = np.mean(
        [s == y for s, (_, y) in zip(scores.labels, credit_events(500, seed=99), strict=True)]
    )
    assert accuracy > 0.8


def test_checksum_mismatch_is_refused(tmp_path: Path, trained_model: Any) -> None:
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(
            version_for(trained_model.onnx, sha="0" * 64), write(tmp_path, trained_model.onnx)
        )


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    data = b"not an onnx model at all"
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        load_model(version_for(data), write(tmp_path, data))


def test_inputs_must_match_the_spec(tmp_path: Path, trained_model: Any) -> None:
    narrow = FeatureSpec(features=[FeatureRule(name="age", dtype="long")], classes=["0", "1"])
    with pytest.raises(ModelLoadError, match="takes 9 features but the spec lists 1"):
        load_model(
            version_for(trained_model.onnx, spec=narrow), write(tmp_path, trained_model.onnx)
        )


def test_metadata_records_metrics_balance_and_reference(trained_model: Any) -> None:
    meta = trained_model.metadata
    assert meta.holdout_metrics["accuracy"] > 0.8
    assert set(meta.holdout_metrics) == {"accuracy", "precision", "recall", "f1", "roc_auc"}
    assert meta.cv_metrics["folds"] == 3 and "f1" in meta.cv_metrics["mean"]
    assert sum(meta.class_balance.values()) == pytest.approx(1.0)
    assert set(meta.reference["features"]) == set(CREDIT_SPEC.names)
    assert meta.onnx_opset == 17 and meta.dataset_size == 3000
