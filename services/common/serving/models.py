"""The model versions a scorer serves, for every model, swapped whole between batches.

Loading happens off the event loop; a version that fails to load is never served and the
model's previous set keeps serving, so a bad artifact can never take scoring down. Each
model is reconciled on its own: one model's bad artifact leaves the others untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from scoremesh.contract.featurespec import RuleSet
from services.common.artifacts import ArtifactError, fetch_artifact
from services.common.metrics import ACTIVE_VERSION, MODEL_LOAD_FAILURES
from services.common.model_version import ModelVersion
from services.common.onnx_model import LoadedModel, ModelLoadError, load_model
from services.common.registry_view import RegistryState
from services.common.rulesets import rule_set_version
from services.common.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSet:
    """An immutable snapshot: the champion and the challengers, with their roles."""

    champion: LoadedModel | None = None
    challengers: tuple[tuple[LoadedModel, ModelVersion], ...] = ()
    generation: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        champion = [self.champion.key] if self.champion else []
        return champion + [m.key for m, _ in self.challengers]


@dataclass(frozen=True)
class Serving:
    """What a scorer serves, every model at once: an immutable snapshot per batch."""

    models: Mapping[str, ServingSet] = field(default_factory=lambda: MappingProxyType({}))
    known: frozenset[str] = frozenset()  # every model the registry has a version of
    generation: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    def of(self, model: str) -> ServingSet | None:
        """The model's serving set, if it has a loaded champion."""
        serving = self.models.get(model)
        return serving if serving is not None and serving.champion is not None else None

    def unavailable(self, model: str) -> str:
        """Why events for a model without a serving set are dead-lettered: the reason code
        (``unknown_model`` when no version of it was ever registered) and a message."""
        if model not in self.known:
            return "unknown_model"
        return "model_unavailable"

    @property
    def keys(self) -> list[str]:
        return [key for serving in self.models.values() for key in serving.keys]

    @property
    def serving_models(self) -> list[str]:
        return sorted(name for name, s in self.models.items() if s.champion is not None)


LoadFailureHook = Callable[[ModelVersion, str], Awaitable[None]]


class ModelHolder:
    """Keeps ``current`` in step with the registry, for every model this process serves
    (``SCOREMESH_MODELS``, all models when unset)."""

    def __init__(self, settings: Settings, on_load_failure: LoadFailureHook | None = None) -> None:
        self.settings = settings
        self.on_load_failure = on_load_failure
        self.subset = frozenset(settings.models) if settings.models else None
        self.current = Serving()
        self.reconciled = asyncio.Event()  # set once the first registry state is loaded
        self.loading = False  # a reconcile (which may load models) is under way
        self._loaded: dict[tuple[str, str], LoadedModel] = {}  # (key, sha256) -> model
        self._failed: dict[tuple[str, str], str] = {}
        self._pending: RegistryState | None = None
        self._wake = asyncio.Event()
        self.changed = asyncio.Event()

    def on_registry(self, state: RegistryState) -> None:
        self._pending = state
        self._wake.set()

    async def run(self) -> None:
        """Reconcile the serving set with the registry whenever it changes."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            state, self._pending = self._pending, None
            if state is not None:
                self.loading = True
                try:
                    await self.reconcile(state)
                finally:
                    self.loading = False

    async def _load(self, version: ModelVersion) -> LoadedModel | None:
        ident = (version.key, version.artifact_sha256)
        if ident in self._loaded:
            return self._loaded[ident]
        if ident in self._failed:
            return None
        try:
            path = await fetch_artifact(
                self.settings, version.artifact_uri, version.artifact_sha256
            )
            model = await asyncio.to_thread(load_model, version, path, self.settings.onnx_threads)
        except (ArtifactError, ModelLoadError, OSError) as exc:
            self._failed[ident] = str(exc)
            MODEL_LOAD_FAILURES.labels(version.name, version.version).inc()
            log.error(
                "model version failed to load; previous set keeps serving",
                extra={"version": version.key, "error": str(exc)},
            )
            if self.on_load_failure is not None:
                await self.on_load_failure(version, str(exc))
            return None
        self._loaded[ident] = model
        log.info("model version loaded", extra={"version": version.key, "stage": version.stage})
        return model

    def serves(self, model: str) -> bool:
        return self.subset is None or model in self.subset

    async def reconcile(self, state: RegistryState) -> None:
        models: dict[str, ServingSet] = {}
        for name in state.models():
            if self.serves(name):
                models[name] = await self._reconcile_model(state, name)
        failures = {k: v for (k, _), v in self._failed.items()}
        self.current = Serving(
            MappingProxyType(models), frozenset(state.models()), state.max_generation, failures
        )
        live = set(self.current.keys)
        self._loaded = {k: m for k, m in self._loaded.items() if m.key in live}
        self.reconciled.set()
        self.changed.set()

    async def _reconcile_model(self, state: RegistryState, name: str) -> ServingSet:
        active = state.active(name)
        held = self.current.models.get(name)
        champion_version = next((v for v in active if v.stage == "champion"), None)
        champion = await self._load(champion_version) if champion_version else None
        if champion_version is not None and champion is None and held is not None:
            # Keep serving the champion we have rather than none at all.
            champion = held.champion
        challengers: list[tuple[LoadedModel, ModelVersion]] = []
        for version in active:
            if version.stage == "champion":
                continue
            model = await self._load(version)
            if model is not None:
                challengers.append((model, version))
        ACTIVE_VERSION.labels(name).info(
            {
                "champion": champion.key if champion else "",
                "challengers": ",".join(f"{v.key}:{v.stage}" for _, v in challengers),
            }
        )
        failures = {k: v for (k, _), v in self._failed.items() if k.startswith(f"{name}@")}
        return ServingSet(champion, tuple(challengers), state.max_generation, failures)


def serving_rule_set(serving: ServingSet, state: RegistryState) -> RuleSet | None:
    """The rule set for exactly the versions a serving set scores with.

    Built from the loaded models rather than the registry, so an event is never checked
    against a version that is not loaded yet; names use the registry's current records.
    """
    champion = serving.champion
    if champion is None:
        return None
    loaded = [champion.version, *(mv for _, mv in serving.challengers)]
    named = [state.versions.get(v.key, v) for v in loaded]
    return RuleSet([v.feature_spec for v in loaded], rule_set_version(named))
