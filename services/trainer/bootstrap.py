"""`scoremesh models bootstrap`: a first champion, trained on data that ships with River."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from services.common.artifacts import upload_artifact
from services.common.kafka import make_producer, start_with_retry
from services.common.model_version import DataWindow, VersionProposal
from services.common.registry_view import RegistryView
from services.common.settings import Settings
from services.registry.client import command, new_command
from services.trainer.datasets import CREDIT_SPEC, DATASET, credit_events
from services.trainer.pipeline import train

log = logging.getLogger(__name__)

BOOTSTRAP_VERSION = "1.0.0"
BOOTSTRAP_ROWS = 20_000
BOOTSTRAP_SEED = 7


@dataclass(frozen=True)
class BootstrapResult:
    created: bool
    version: str
    message: str
    metrics: dict[str, float]


async def current_champion(settings: Settings) -> Any:
    view = RegistryView(settings)
    await view.start()
    try:
        return view.state.champion(settings.model_name)
    finally:
        await view.stop()


async def bootstrap(settings: Settings, actor: str = "bootstrap") -> BootstrapResult:
    champion = await current_champion(settings)
    if champion is not None:
        return BootstrapResult(
            False, champion.version, f"{champion.key} is already champion; nothing to do", {}
        )
    pairs = list(credit_events(BOOTSTRAP_ROWS, seed=BOOTSTRAP_SEED))
    rows = [e["features"] for e, _ in pairs]
    labels = [label for _, label in pairs]
    trained = train(
        CREDIT_SPEC,
        rows,
        labels,
        seed=BOOTSTRAP_SEED,
        dataset=f"{DATASET}(classification_function=0, seed={BOOTSTRAP_SEED})",
        window=DataWindow(start=pairs[0][0]["event_time"], end=pairs[-1][0]["event_time"]),
        limitations=(
            "Synthetic loan applications (Agrawal function 0: the label depends on age and "
            "salary only). Not valid for other concepts; retrain when the concept drifts."
        ),
    )
    producer = make_producer(settings)
    await start_with_retry(producer.start, "bootstrap-producer", settings)
    try:
        ref = await upload_artifact(producer, settings, trained.onnx)
    finally:
        await producer.stop()
    proposal = VersionProposal(
        version=BOOTSTRAP_VERSION,
        artifact_uri=ref.uri,
        artifact_sha256=ref.sha256,
        artifact_size=ref.size,
        feature_spec=CREDIT_SPEC,
        metadata=trained.metadata,
    )
    model = settings.model_name
    outcome = await command(
        settings,
        new_command(
            model,
            "register",
            actor,
            proposal=proposal.model_dump_json(),
            reason="bootstrap: first version",
        ),
    )
    if outcome["outcome"] != "applied":
        raise RuntimeError(f"registry refused {model}@{BOOTSTRAP_VERSION}: {outcome['detail']}")
    outcome = await command(
        settings,
        new_command(
            model,
            "promote",
            actor,
            version=BOOTSTRAP_VERSION,
            target_stage="champion",
            reason="bootstrap: first champion",
        ),
    )
    if outcome["outcome"] != "applied":
        raise RuntimeError(f"registry refused promotion: {outcome['detail']}")
    return BootstrapResult(
        True,
        BOOTSTRAP_VERSION,
        f"{model}@{BOOTSTRAP_VERSION} trained and promoted to champion",
        trained.metadata.holdout_metrics,
    )
