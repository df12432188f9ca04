"""One retrain: run the version's own recipe on the window, compare, validate, register.

The recipe recorded with the champion is what runs, after its code hash is checked; a
champion without one, or whose code changed, is not trained as something else: the
result is ``needs_person``. The training set is the requested window plus a bounded
random sample of older labelled data (``Settings.trainer.window``). Registration is a
single command at the very end, after the artifact is uploaded, so a crash at any point
leaves no half-registered version (an uploaded artifact without a registry record is inert).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoremesh.contract.codec import codec
from services.common.artifacts import fetch_artifact
from services.common.evaluation import classification_metrics
from services.common.kafka import assign_all, make_consumer, read_to_end, start_with_retry
from services.common.model_version import DataWindow, ModelVersion, parse_semver
from services.common.onnx_model import LoadedModel, load_model
from services.common.policies.retrain import TrainingWindowPolicy
from services.common.readiness import load_candidate, validate_model
from services.common.recipes import EntryPointRecipe, Fit, PipelineRecipe, RecipeMismatch, resolve
from services.common.registration import register_version
from services.common.registry_view import RegistryState
from services.common.settings import Settings
from services.trainer.pipeline import TrainedModel, train

log = logging.getLogger(__name__)

ACCEPT_CODE = "accept_recipe_code"  # request evidence: a person vouched for the code found


class TrainingRejected(Exception):
    """The run finished but the candidate must not serve; the message says why."""


@dataclass
class Outcome:
    status: str  # succeeded | rejected | failed | needs_person
    detail: str
    version: str | None = None
    parent_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    examples: int = 0


@dataclass
class TrainingData:
    """The requested window, and the older sample drawn from before it."""

    window: list[dict[str, Any]]
    older: list[dict[str, Any]]
    older_available: int


class _Reservoir:
    """A uniform sample of at most ``size`` examples, the latest label per event kept."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self.items: dict[str, dict[str, Any]] = {}
        self._rng = random.Random(seed)

    def offer(self, example: dict[str, Any]) -> None:
        held = self.items.get(example["event_id"])
        if held is not None:
            if example["label_time"] >= held["label_time"]:
                self.items[example["event_id"]] = example
            return
        self.seen += 1
        if len(self.items) < self.size:
            self.items[example["event_id"]] = example
            return
        if self._rng.randrange(self.seen) < self.size:
            victim = self._rng.choice(list(self.items))
            del self.items[victim]
            self.items[example["event_id"]] = example


async def read_examples(
    settings: Settings,
    start_ms: int,
    end_ms: int,
    policy: TrainingWindowPolicy | None = None,
) -> TrainingData:
    """Labelled examples with event time in [start, end] (per event the latest label wins),
    and a sample of those in the ``older_lookback_s`` before ``start``."""
    policy = policy or TrainingWindowPolicy(older_max_examples=0)
    consumer = make_consumer(settings, group_id=None, max_poll_records=5000)
    await start_with_retry(consumer.start, "trainer-examples", settings)
    decode = codec("TrainingExample").decode
    latest: dict[str, dict[str, Any]] = {}
    older = _Reservoir(policy.older_max_examples, policy.seed)
    older_from = start_ms - int(policy.older_lookback_s * 1000)
    try:
        tps = await assign_all(consumer, settings.topic("training.examples"))

        def keep(record: Any) -> None:
            example = decode(record.value)
            at = example["event_time"]
            if start_ms <= at <= end_ms:
                held = latest.get(example["event_id"])
                if held is None or example["label_time"] >= held["label_time"]:
                    latest[example["event_id"]] = example
            elif older_from <= at < start_ms and policy.older_max_examples:
                older.offer(example)

        await read_to_end(consumer, tps, keep, timeout_s=600)
    finally:
        await consumer.stop()
    window = sorted(latest.values(), key=lambda e: e["event_time"])
    sample = list(older.items.values())
    cap = policy.older_cap(len(window))
    if len(sample) > cap:
        sample = random.Random(policy.seed).sample(sample, cap)
    return TrainingData(window, sorted(sample, key=lambda e: e["event_time"]), older.seen)


def next_version(state: RegistryState, model: str, champion: ModelVersion) -> str:
    major = champion.semver[0]
    minors = [v.semver[1] for v in state.of_model(model) if v.semver[0] == major]
    return f"{major}.{max(minors) + 1}.0"


def train_and_compare(
    champion: LoadedModel,
    data: TrainingData,
    recipe: PipelineRecipe | EntryPointRecipe,
    fit: Fit,
    seed: int,
    window: DataWindow,
    policy: TrainingWindowPolicy,
) -> tuple[TrainedModel, dict[str, float], dict[str, float], list[dict[str, Any]], list[str]]:
    """CPU work, off the event loop. Raises TrainingRejected with the reasons."""
    spec = champion.spec
    examples = data.window
    labels = [e["label"] for e in examples]
    unknown = sorted(set(labels) - set(spec.classes))
    if unknown:
        raise TrainingRejected(f"labels {unknown} are not among the model's classes {spec.classes}")
    if len(examples) < policy.min_examples:
        raise TrainingRejected(
            f"only {len(examples)} labelled examples in the window; need {policy.min_examples}"
        )
    if len(set(labels)) < 2:
        raise TrainingRejected(f"the window has a single class ({labels[0]}); nothing to learn")
    cut = int(len(examples) * (1 - policy.recent_share))
    older = [e for e in data.older if e["label"] in spec.classes]
    fitted, recent = examples[:cut] + older, examples[cut:]
    composition = {
        "window_start": window.start,
        "window_end": window.end,
        "window_examples": len(examples),
        "trained_on_window": cut,
        "compared_on_recent": len(recent),
        "older_sample": len(older),
        "older_available": data.older_available,
        "older_from": older[0]["event_time"] if older else None,
        "older_to": older[-1]["event_time"] if older else None,
        "policy": policy.model_dump(),
    }
    trained = train(
        spec,
        [e["features"] for e in fitted],
        [e["label"] for e in fitted],
        recipe=recipe,
        fit=fit,
        seed=seed,
        dataset="training.examples",
        window=window,
        parent_version=champion.version.version,
        limitations=f"trained on {cut} labelled production events of the window and "
        f"{len(older)} older ones; compared with {champion.version.version} on the "
        f"{len(recent)} most recent",
    )
    trained = TrainedModel(
        trained.onnx, trained.metadata.model_copy(update={"training_window": composition})
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


def recipe_of(
    champion: ModelVersion, settings: Settings, accept_code: bool
) -> tuple[Fit, PipelineRecipe | EntryPointRecipe] | str:
    """The champion's recipe, resolved and checked here, or why a person must step in."""
    recipe = champion.metadata.recipe
    if recipe is None:
        return (
            f"{champion.key} has no training recipe, so scoremesh will not retrain it as "
            "something else; a person must retrain it (or register a version with --recipe "
            "so that the trainer can)"
        )
    try:
        return resolve(recipe, settings.trainer.recipe_packages, accept_code)
    except RecipeMismatch as exc:
        return f"{champion.key}: {exc}"


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
    accept = request.get("evidence", {}).get(ACCEPT_CODE) == "true"
    resolved = await asyncio.to_thread(recipe_of, champion, settings, accept)
    if isinstance(resolved, str):
        return Outcome("needs_person", resolved, parent_version=champion.version)
    fit, recipe = resolved
    policy = settings.trainer.window
    data = await read_examples(settings, request["window_start"], request["window_end"], policy)
    examples = data.window
    path = await fetch_artifact(settings, champion.artifact_uri, champion.artifact_sha256)
    loaded = await asyncio.to_thread(load_model, champion, path, settings.onnx_threads)
    window = DataWindow(start=request["window_start"], end=request["window_end"])
    try:
        trained, new, old, rows, labels = await asyncio.to_thread(
            train_and_compare, loaded, data, recipe, fit, seed, window, policy
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
    shadow: Mapping[str, Any] = result.promotion or {}
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
