"""`scoremesh models bootstrap`: a first champion, trained on data that ships with River."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from services.common.errors import UserError
from services.common.model_version import DataWindow
from services.common.registration import register_version
from services.common.registry_view import RegistryView
from services.common.settings import Settings
from services.trainer.datasets import CREDIT_SPEC, DATASET, credit_events
from services.trainer.pipeline import builtin_recipe, train

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
        recipe=builtin_recipe(),
        seed=BOOTSTRAP_SEED,
        dataset=f"{DATASET}(classification_function=0, seed={BOOTSTRAP_SEED})",
        window=DataWindow(start=pairs[0][0]["event_time"], end=pairs[-1][0]["event_time"]),
        limitations=(
            "Synthetic loan applications (Agrawal function 0: the label depends on age and "
            "salary only). Not valid for other concepts; retrain when the concept drifts."
        ),
    )
    holdout = list(credit_events(4_000, seed=BOOTSTRAP_SEED + 1, id_prefix="holdout"))
    result = await register_version(
        settings,
        settings.model_name,
        BOOTSTRAP_VERSION,
        trained.onnx,
        CREDIT_SPEC,
        metadata=trained.metadata,
        rows=[e["features"] for e, _ in holdout],
        labels=[y for _, y in holdout],
        actor=actor,
        reason="bootstrap: first version",
        stage="champion",
    )
    key = f"{settings.model_name}@{BOOTSTRAP_VERSION}"
    if result.outcome["outcome"] != "applied":
        raise UserError(f"registry refused {key}: {result.outcome['detail']}")
    if result.promotion is None or result.promotion["outcome"] != "applied":
        detail = result.promotion["detail"] if result.promotion else "not attempted"
        raise UserError(f"registry refused to promote {key}: {detail}")
    return BootstrapResult(
        True,
        BOOTSTRAP_VERSION,
        f"{key} trained, validated and promoted to champion",
        trained.metadata.holdout_metrics,
    )
