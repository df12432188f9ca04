"""Scoring a batch of checked events with a serving set: shared by the scorer and the API."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.onnx_model import LoadedModel
from services.common.routing import in_canary
from services.scorer.models import ServingSet


class ScoringError(RuntimeError):
    """The champion could not score a batch."""


@dataclass(frozen=True)
class BatchResult:
    predictions: list[dict[str, Any]]
    challenger_errors: dict[str, str]
    inference_ms: dict[str, float]  # model key -> time spent vectorising and scoring the batch


def _predict(
    model: LoadedModel, events: Sequence[dict[str, Any]]
) -> tuple[list[str], list[float], list[dict[str, float]]]:
    matrix = model.vectoriser.transform([e["features"] for e in events])
    scores = model.predict_matrix(matrix)
    classes = model.classes
    probs = scores.probabilities.tolist()
    return (
        scores.labels,
        scores.positive.tolist(),
        [dict(zip(classes, row, strict=True)) for row in probs],
    )


def score_events(
    serving: ServingSet,
    events: Sequence[dict[str, Any]],
    source: str,
    started: float,
) -> BatchResult:
    """One ONNX call per model for the whole batch. ``started`` is a perf_counter() time."""
    champion = serving.champion
    if champion is None:
        raise ScoringError("no champion loaded")
    t0 = time.perf_counter()
    try:
        labels, positive, per_class = _predict(champion, events)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ScoringError(f"{champion.key}: {exc}") from exc
    inference_ms = {champion.key: (time.perf_counter() - t0) * 1000.0}
    now_ms = int(time.time() * 1000)
    latency_ms = (time.perf_counter() - started) * 1000.0
    name, version = champion.version.name, champion.version.version
    canaries = [(m, v) for m, v in serving.challengers if v.stage == "canary"]
    predictions: list[dict[str, Any]] = []
    canary_of: list[str | None] = [None] * len(events)
    for model, mv in canaries:
        for i, event in enumerate(events):
            if canary_of[i] is None and in_canary(event["entity_id"], mv.canary_percent):
                canary_of[i] = model.key
    for i, event in enumerate(events):
        predictions.append(
            {
                "event_id": event["event_id"],
                "entity_id": event["entity_id"],
                "event_time": event["event_time"],
                "features": event["features"],
                "attributes": event.get("attributes") or {},
                "model": name,
                "model_version": version,
                "variant": "champion",
                "served": canary_of[i] is None,
                "source": source,
                "score": positive[i],
                "scores": per_class[i],
                "decision": labels[i],
                "latency_ms": latency_ms,
                "scored_at": now_ms,
            }
        )
    errors: dict[str, str] = {}
    for model, mv in serving.challengers:
        t0 = time.perf_counter()
        try:
            c_labels, c_positive, c_per_class = _predict(model, events)
        except Exception as exc:  # a failing challenger never affects the decision
            errors[model.key] = str(exc)
            continue
        inference_ms[model.key] = (time.perf_counter() - t0) * 1000.0
        c_latency = (time.perf_counter() - started) * 1000.0
        variant = "canary" if mv.stage == "canary" else "shadow"
        for i, event in enumerate(events):
            predictions.append(
                {
                    "event_id": event["event_id"],
                    "entity_id": event["entity_id"],
                    "event_time": event["event_time"],
                    "features": event["features"],
                    "attributes": event.get("attributes") or {},
                    "model": mv.name,
                    "model_version": mv.version,
                    "variant": variant,
                    "served": variant == "canary" and canary_of[i] == model.key,
                    "source": source,
                    "score": c_positive[i],
                    "scores": c_per_class[i],
                    "decision": c_labels[i],
                    "latency_ms": c_latency,
                    "scored_at": now_ms,
                }
            )
    return BatchResult(predictions, errors, inference_ms)
