"""Production-readiness validation of a model artifact against its spec.

Run by `scoremesh models validate`, by `register` before anything is sent, and by the
trainer before a retrained version may register. The report goes into the version's
metadata (``validation``); a gate that is not met fails with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from scoremesh.contract.featurespec import FeatureSpec, Vectoriser
from services.common.evaluation import classification_metrics
from services.common.model_version import ModelVersion
from services.common.onnx_model import LoadedModel, ModelLoadError, check_onnx_inputs, make_session

LATENCY_BATCHES = (1, 8, 64, 256, 1024)


@dataclass(frozen=True)
class ReadinessReport:
    passed: bool
    failures: list[str]
    report: dict[str, Any]


def load_candidate(onnx: bytes, spec: FeatureSpec) -> LoadedModel:
    session = make_session(onnx, 1)
    check_onnx_inputs(session, spec)
    version = ModelVersion(
        name="candidate",
        version="0.0.0",
        stage="registered",
        generation=0,
        artifact_uri="",
        artifact_sha256="",
        artifact_size=len(onnx),
        feature_spec_json=spec.model_dump_json(),
        metadata_json="{}",
    )
    return LoadedModel(version, session)


def _time_calls(model: LoadedModel, matrix: np.ndarray, runs: int) -> dict[str, float]:
    """Wall-clock and thread-CPU percentiles of ``runs`` calls on one batch.

    The session runs on the calling thread (one intra-op thread), so its CPU time is the
    model's own cost; wall-clock adds whatever else the machine was doing. Gates compare
    the CPU figure, so that a busy neighbour cannot refuse a model (both are reported).
    """
    model.predict_matrix(matrix)  # warm
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.thread_time()
        model.predict_matrix(matrix)
        cpu.append((time.thread_time() - c0) * 1000)
        wall.append((time.perf_counter() - t0) * 1000)
    return {
        "p50_ms": round(float(np.percentile(wall, 50)), 4),
        "p99_ms": round(float(np.percentile(wall, 99)), 4),
        "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 4),
        "cpu_p99_ms": round(float(np.percentile(cpu, 99)), 4),
        "per_row_us": round(float(np.median(wall)) * 1000 / len(matrix), 3),
    }


def _latency(
    model: LoadedModel, spec: FeatureSpec, rows: list[dict[str, Any]], runs: int
) -> dict[str, dict[str, float]]:
    base = Vectoriser(spec).transform(rows[: max(LATENCY_BATCHES)] or [{}])
    return {
        str(size): _time_calls(
            model,
            np.resize(base, (size, base.shape[1])).astype(np.float32),
            max(5, runs // max(1, size // 64)),
        )
        for size in LATENCY_BATCHES
    }


def _edge_cases(
    model: LoadedModel, spec: FeatureSpec, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Nulls and out-of-range inputs must still give valid probabilities."""
    template = dict(rows[0]) if rows else {}
    cases: dict[str, dict[str, Any]] = {}
    for rule in spec.features:
        if rule.nullable or not rule.required:
            cases[f"{rule.name}=null"] = {**template, rule.name: None}
        if rule.min is not None:
            cases[f"{rule.name}=min"] = {**template, rule.name: rule.min}
            cases[f"{rule.name}<min"] = {**template, rule.name: rule.min - abs(rule.min or 1) * 10}
        if rule.max is not None:
            cases[f"{rule.name}=max"] = {**template, rule.name: rule.max}
            cases[f"{rule.name}>max"] = {**template, rule.name: rule.max * 10 + 1}
        if rule.categories:
            unseen: Any = (
                "__unseen__" if rule.dtype == "string" else max(map(int, rule.categories)) + 1
            )
            cases[f"{rule.name}=unknown category"] = {**template, rule.name: unseen}
    names = list(cases)
    scores = model.predict_matrix(model.vectoriser.transform([cases[n] for n in names]))
    probs = scores.probabilities
    bad = [
        n
        for n, row in zip(names, probs, strict=True)
        if not np.all(np.isfinite(row)) or abs(float(row.sum()) - 1.0) > 1e-3
    ]
    return {
        "cases": len(names),
        "invalid_outputs": bad,
        "decisions": dict(zip(names, scores.labels, strict=True)),
    }


def validate_model(
    onnx: bytes,
    spec: FeatureSpec,
    rows: list[dict[str, Any]] | None = None,
    labels: list[str] | None = None,
    folds: int = 5,
    latency_runs: int = 200,
) -> ReadinessReport:
    failures: list[str] = []
    report: dict[str, Any] = {"artifact_bytes": len(onnx), "validated_at": int(time.time() * 1000)}
    try:
        model = load_candidate(onnx, spec)
    except ModelLoadError as exc:
        return ReadinessReport(False, [str(exc)], report)
    rows = rows or []
    gates = spec.gates
    if gates.max_artifact_bytes is not None and len(onnx) > gates.max_artifact_bytes:
        failures.append(
            f"artifact is {len(onnx)} bytes, the gate allows {gates.max_artifact_bytes}"
        )
    report["latency"] = _latency(model, spec, rows, latency_runs)
    for gate in gates.latency:
        measured = report["latency"].get(str(gate.batch_size))
        if measured is None:
            matrix = np.zeros((gate.batch_size, len(spec.features)), dtype=np.float32)
            measured = report["latency"][str(gate.batch_size)] = _time_calls(model, matrix, 50)
        if measured["cpu_p99_ms"] > gate.p99_ms:
            failures.append(
                f"p99 latency at batch {gate.batch_size} is {measured['cpu_p99_ms']:.2f} ms of "
                f"model compute (wall-clock {measured['p99_ms']:.2f} ms), "
                f"the gate allows {gate.p99_ms} ms"
            )
    report["edge_cases"] = _edge_cases(model, spec, rows)
    if report["edge_cases"]["invalid_outputs"]:
        failures.append(
            "invalid probabilities for: " + ", ".join(report["edge_cases"]["invalid_outputs"])
        )
    if labels:
        if len(labels) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
        unknown = sorted(set(labels) - set(spec.classes))
        if unknown:
            raise ValueError(
                f"labels {unknown[:5]} are not among the spec's classes {spec.classes}"
            )
        y = np.array([spec.classes.index(v) for v in labels])
        positive = spec.classes.index(spec.positive)
        matrix = model.vectoriser.transform(rows)
        scores = model.predict_matrix(matrix)
        predicted = np.array([spec.classes.index(v) for v in scores.labels])
        report["metrics"] = classification_metrics(y, predicted, scores.positive, positive)
        balance = {c: float(np.mean(y == i)) for i, c in enumerate(spec.classes)}
        report["class_balance"] = balance
        if gates.min_class_share is not None:
            rare = [c for c, share in balance.items() if share < gates.min_class_share]
            if rare:
                failures.append(
                    f"classes {rare} are rarer than {gates.min_class_share:.0%} in the data: "
                    "metrics on them are unreliable"
                )
        counts = np.bincount(y, minlength=len(spec.classes))
        k = int(min(folds, counts[counts > 0].min())) if len(counts[counts > 0]) > 1 else 0
        if k >= 2:
            per_fold = []
            for _, idx in StratifiedKFold(k, shuffle=True, random_state=0).split(matrix, y):
                per_fold.append(
                    classification_metrics(y[idx], predicted[idx], scores.positive[idx], positive)
                )
            report["folds"] = {
                "k": k,
                "mean": {m: float(np.mean([f[m] for f in per_fold])) for m in per_fold[0]},
                "min": {m: float(np.min([f[m] for f in per_fold])) for m in per_fold[0]},
            }
        for metric, floor in gates.min_metrics.items():
            value = report["metrics"].get(metric)
            if value is None:
                failures.append(f"gate metric {metric!r} could not be computed on this data")
            elif value < floor:
                failures.append(f"{metric} is {value:.3f}, the gate requires >= {floor}")
    elif gates.min_metrics:
        report["metrics"] = {}
        report["note"] = "no labelled data given: metric gates not evaluated"
    report["passed"] = not failures
    report["failures"] = failures
    return ReadinessReport(not failures, failures, report)
