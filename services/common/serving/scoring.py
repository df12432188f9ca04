"""Scoring a batch of checked events with a serving set: shared by the scorer and the API."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from scoremesh.contract.records import Event, Prediction
from services.common.onnx_model import LoadedModel
from services.common.routing import in_canary
from services.common.serving.models import ServingSet


class ScoringError(RuntimeError):
    """The champion could not score a batch."""


@dataclass(frozen=True)
class BatchResult:
    predictions: list[Prediction]
    challenger_errors: dict[str, str]
    # model key -> CPU time (all threads of this process) spent vectorising and scoring the
    # batch. CPU, not wall: a preempted call on a busy 2-core host must not look slow.
    inference_cpu_ms: dict[str, float]


def _predict(
    model: LoadedModel, events: Sequence[Event]
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


def _records(
    events: Sequence[Event],
    mv_name: str,
    mv_version: str,
    variant: str,
    served: list[bool],
    scored: tuple[list[str], list[float], list[dict[str, float]]],
    source: str,
    latency_ms: float,
    now_ms: int,
) -> list[Prediction]:
    labels, positive, per_class = scored
    return [
        {
            "event_id": event["event_id"],
            "entity_id": event["entity_id"],
            "event_time": event["event_time"],
            "features": event["features"],
            "attributes": event.get("attributes") or {},
            "model": mv_name,
            "model_version": mv_version,
            "variant": variant,
            "served": served[i],
            "source": source,
            "score": positive[i],
            "scores": per_class[i],
            "decision": labels[i],
            "latency_ms": latency_ms,
            "scored_at": now_ms,
        }
        for i, event in enumerate(events)
    ]


def score_events(
    serving: ServingSet,
    events: Sequence[Event],
    source: str,
    started: float,
) -> BatchResult:
    """One ONNX call per model for the whole batch. ``started`` is a perf_counter() time.

    Exactly one prediction per event is ``served``: the champion's, or for a canary's
    sticky share of entities the canary's — but only from a canary that scored this batch.
    """
    champion = serving.champion
    if champion is None:
        raise ScoringError("no champion loaded")
    c0 = time.process_time()
    try:
        scored = _predict(champion, events)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ScoringError(f"{champion.key}: {exc}") from exc
    inference_cpu_ms = {champion.key: (time.process_time() - c0) * 1000.0}
    champion_latency = (time.perf_counter() - started) * 1000.0
    errors: dict[str, str] = {}
    challengers = []
    for model, mv in serving.challengers:
        c0 = time.process_time()
        try:
            result = _predict(model, events)
        except Exception as exc:  # a failing challenger never affects the decision
            errors[model.key] = str(exc)
            continue
        inference_cpu_ms[model.key] = (time.process_time() - c0) * 1000.0
        challengers.append((model, mv, result, (time.perf_counter() - started) * 1000.0))
    canary_of: list[str | None] = [None] * len(events)
    for model, mv, _, _ in challengers:
        if mv.stage != "canary":
            continue
        for i, event in enumerate(events):
            if canary_of[i] is None and in_canary(event["entity_id"], mv.canary_percent):
                canary_of[i] = model.key
    now_ms = int(time.time() * 1000)
    predictions = _records(
        events,
        champion.version.name,
        champion.version.version,
        "champion",
        [c is None for c in canary_of],
        scored,
        source,
        champion_latency,
        now_ms,
    )
    for model, mv, result, latency in challengers:
        variant = "canary" if mv.stage == "canary" else "shadow"
        served = [variant == "canary" and c == model.key for c in canary_of]
        predictions += _records(
            events, mv.name, mv.version, variant, served, result, source, latency, now_ms
        )
    return BatchResult(predictions, errors, inference_cpu_ms)
