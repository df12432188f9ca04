"""One retrain: read the window, train with the serving pipeline, compare, validate, register.

Registration is a single command at the very end, after the artifact is uploaded, so a
crash at any point leaves no half-registered version (an uploaded artifact without a
registry record is inert).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoremesh.contract.codec import codec
from services.common.artifacts import fetch_artifact
from services.common.evaluation import classification_metrics
from services.common.kafka import assign_all, make_consumer, read_to_end, start_with_retry
from services.common.model_version import DataWindow, ModelVersion, parse_semver
from services.common.onnx_model import LoadedModel, load_model
from services.common.readiness import load_candidate, validate_model
from services.common.registration import register_version
from services.common.registry_view import RegistryState
from services.common.settings import Settings
from services.trainer.pipeline import TrainedModel, train

log = logging.getLogger(__name__)

MIN_EXAMPLES = 500
RECENT_SHARE = 0.2


class TrainingRejected(Exception):
    """The run finished but the candidate must not serve; the message says why."""


@dataclass
class Outcome:
    status: str  # succeeded | rejected | failed
    detail: str
    version: str | None = None
    parent_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    examples: int = 0


async def read_examples(settings: Settings, start_ms: int, end_ms: int) -> list[dict[str, Any]]:
    """Labelled examples with event time in [start, end]; per event the latest label wins."""
    consumer = make_consumer(settings, group_id=None, max_poll_records=5000)
    await start_with_retry(consumer.start, "trainer-examples", settings)
    decode = codec("TrainingExample").decode
    latest: dict[str, dict[str, Any]] = {}
    try:
        tps = await assign_all(consumer, settings.topic("training.examples"))

        def keep(record: Any) -> None:
            example = decode(record.value)
            if not start_ms <= example["event_time"] <= end_ms:
                return
            held = latest.get(example["event_id"])
            if held is None or example["label_time"] >= held["label_time"]:
                latest[example["event_id"]] = example

        await read_to_end(consumer, tps, keep, timeout_s=600)
    finally:
        await consumer.stop()
    return sorted(latest.values(), key=lambda e: e["event_time"])


def next_version(state: RegistryState, model: str, champion: ModelVersion) -> str:
    major = champion.semver[0]
    minors = [v.semver[1] for v in state.of_model(model) if v.semver[0] == major]
    return f"{major}.{max(minors) + 1}.0"


def train_and_compare(
    champion: LoadedModel,
    examples: list[dict[str, Any]],
    seed: int,
    window: DataWindow,
) -> tuple[TrainedModel, dict[str, float], dict[str, float], list[dict[str, Any]], list[str]]:
    """CPU work, off the event loop. Raises TrainingRejected with the reasons."""
    spec = champion.spec
    labels = [e["label"] for e in examples]
    unknown = sorted(set(labels) - set(spec.classes))
    if unknown:
        raise TrainingRejected(f"labels {unknown} are not among the model's classes {spec.classes}")
    if len(examples) < MIN_EXAMPLES:
        raise TrainingRejected(
            f"only {len(examples)} labelled examples in the window; need {MIN_EXAMPLES}"
        )
    if len(set(labels)) < 2:
        raise TrainingRejected(f"the window has a single class ({labels[0]}); nothing to learn")
    cut = int(len(examples) * (1 - RECENT_SHARE))
    older, recent = examples[:cut], examples[cut:]
    trained = train(
        spec,
        [e["features"] for e in older],
        [e["label"] for e in older],
        seed=seed,
        dataset="training.examples",
        window=window,
        parent_version=champion.version.version,
        limitations=f"trained on {len(older)} labelled production events; "
        f"compared with {champion.version.version} on the {len(recent)} most recent",
    )
    rows = [e["features"] for e in recent]
    y_recent = np.array([spec.classes.index(e["label"]) for e in recent])
    positive = spec.classes.index(spec.positive)

    def metrics_of(model: LoadedModel) -> dict[str, float]:
        scores = model.predict_matrix(model.vectoriser.transform(rows))
        predicted = np.array([spec.classes.index(v) for v in scores.labels])
        return classification_metrics(y_recent, predicted, scores.positive, positive)

    champion_metrics = metrics_of(champion)
    new_metrics = metrics_of(load_candidate(trained.onnx, spec))
    return trained, new_metrics, champion_metrics, rows, [e["label"] for e in recent]


async def run_request(
    settings: Settings,
    request: dict[str, Any],
    state: RegistryState,
    seed: int = 0,
    min_lift: float = 0.0,
    actor: str = "trainer",
) -> Outcome:
    model = request["model"]
    champion = state.champion(model)
    if champion is None:
        return Outcome("failed", f"{model} has no champion: nothing to retrain from")
    examples = await read_examples(settings, request["window_start"], request["window_end"])
    path = await fetch_artifact(settings, champion.artifact_uri, champion.artifact_sha256)
    loaded = await asyncio.to_thread(load_model, champion, path, settings.onnx_threads)
    window = DataWindow(start=request["window_start"], end=request["window_end"])
    try:
        trained, new, old, rows, labels = await asyncio.to_thread(
            train_and_compare, loaded, examples, seed, window
        )
    except TrainingRejected as exc:
        return Outcome(
            "rejected", str(exc), parent_version=champion.version, examples=len(examples)
        )
    base = Outcome(
        "rejected",
        "",
        parent_version=champion.version,
        metrics=new,
        champion_metrics=old,
        examples=len(examples),
    )
    metric = "accuracy"
    if new[metric] < old[metric] + min_lift:
        base.detail = (
            f"the champion is as good or better on the most recent window: {metric} "
            f"{new[metric]:.3f} vs {old[metric]:.3f}"
        )
        return base
    readiness = await asyncio.to_thread(validate_model, trained.onnx, loaded.spec, rows, labels)
    if not readiness.passed:
        base.detail = "readiness gates not met: " + "; ".join(readiness.failures)
        return base
    version = next_version(state, model, champion)
    parse_semver(version)
    metadata = trained.metadata.model_copy(
        update={
            "comparison": {
                "recent_window": {
                    "candidate": new,
                    "champion": old,
                    "champion_version": champion.version,
                }
            },
        }
    )
    result = await register_version(
        settings,
        model,
        version,
        trained.onnx,
        loaded.spec,
        metadata=metadata,
        rows=rows,
        labels=labels,
        actor=actor,
        reason=f"retrain {request['request_id']}: {request['reason']}",
        stage="shadow",
    )
    if result.outcome["outcome"] != "applied":
        return Outcome(
            "failed",
            f"registry refused {version}: {result.outcome.get('detail', '')}",
            parent_version=champion.version,
            metrics=new,
            champion_metrics=old,
            examples=len(examples),
        )
    shadow = result.promotion or {}
    detail = f"registered {model}@{version}" + (
        " in shadow"
        if shadow.get("outcome") == "applied"
        else f"; shadow refused: {shadow.get('detail')}"
    )
    return Outcome(
        "succeeded",
        detail,
        version=version,
        parent_version=champion.version,
        metrics=new,
        champion_metrics=old,
        examples=len(examples),
    )
