"""A loaded, verified, warmed ONNX model version, ready to score float32 batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from scoremesh.contract.featurespec import FeatureSpec, Vectoriser
from services.common.artifacts import sha256_of
from services.common.model_version import ModelVersion


class ModelLoadError(RuntimeError):
    """An artifact could not become a serving model; the message says why."""


@dataclass(frozen=True)
class Scores:
    labels: list[str]
    positive: np.ndarray  # probability of the positive class, float64
    probabilities: np.ndarray  # [n, n_classes]


class LoadedModel:
    def __init__(self, version: ModelVersion, session: ort.InferenceSession) -> None:
        self.version = version
        self.spec: FeatureSpec = version.feature_spec
        self.vectoriser = Vectoriser(self.spec)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        self._prob_output = next((o for o in outputs if "prob" in o.lower()), outputs[-1])
        self.classes = list(self.spec.classes)
        self._positive_index = self.classes.index(self.spec.positive)

    @property
    def key(self) -> str:
        return self.version.key

    def predict_matrix(self, matrix: np.ndarray) -> Scores:
        (probs,) = self.session.run([self._prob_output], {self.input_name: matrix})
        probs = np.asarray(probs, dtype=np.float64)
        best = probs.argmax(axis=1)
        classes = self.classes
        return Scores(
            labels=[classes[i] for i in best.tolist()],
            positive=probs[:, self._positive_index],
            probabilities=probs,
        )


def check_onnx_inputs(session: ort.InferenceSession, spec: FeatureSpec) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(
            f"model has {len(inputs)} inputs; scoremesh feeds one float tensor [batch, features]"
        )
    (inp,) = inputs
    if inp.type != "tensor(float)":
        raise ModelLoadError(f"model input {inp.name!r} is {inp.type}; expected tensor(float)")
    shape = inp.shape
    if len(shape) != 2:
        raise ModelLoadError(f"model input {inp.name!r} has shape {shape}; expected [batch, n]")
    width = shape[1]
    if isinstance(width, int) and width != len(spec.features):
        raise ModelLoadError(
            f"model input {inp.name!r} takes {width} features but the spec lists "
            f"{len(spec.features)} ({', '.join(spec.names)})"
        )
    outputs = session.get_outputs()
    probs = [o for o in outputs if "prob" in o.name.lower()] or outputs[-1:]
    prob = probs[0]
    if prob.type not in ("tensor(float)", "tensor(double)"):
        raise ModelLoadError(
            f"model output {prob.name!r} is {prob.type}; export probabilities as a tensor "
            "(skl2onnx: options={'zipmap': False})"
        )
    if (
        len(prob.shape) == 2
        and isinstance(prob.shape[1], int)
        and prob.shape[1] != len(spec.classes)
    ):
        raise ModelLoadError(
            f"model output {prob.name!r} has {prob.shape[1]} classes, the spec names "
            f"{len(spec.classes)}: {spec.classes}"
        )


def make_session(data: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several private exception types
        raise ModelLoadError(f"not a loadable ONNX model: {str(exc).splitlines()[0]}") from exc


def load_model(version: ModelVersion, path: Path, threads: int = 1) -> LoadedModel:
    """Verify, load, check and warm a model. Blocking: call it off the event loop."""
    data = path.read_bytes()
    if sha256_of(data) != version.artifact_sha256:
        raise ModelLoadError(
            f"{version.key}: artifact sha256 does not match the registry; refusing to load"
        )
    session = make_session(data, threads)
    check_onnx_inputs(session, version.feature_spec)
    model = LoadedModel(version, session)
    warm = model.vectoriser.transform([{}] * 64)
    warm = np.nan_to_num(warm, nan=0.0)
    scores = model.predict_matrix(warm)
    if scores.probabilities.shape != (64, len(model.classes)):
        raise ModelLoadError(
            f"{version.key}: warm-up returned shape {scores.probabilities.shape}, expected "
            f"(64, {len(model.classes)})"
        )
    return model
