"""Every registry reader folds models.registry the same way.

Assign all partitions (no consumer group), read to the end before serving (not ready
until then), keep following, last record per ``name@version`` wins, and a record with
an older generation than the one already held for that key is ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiokafka import ConsumerRecord

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.records import ModelVersion as ModelVersionRecord
from scoremesh.contract.topics import TopicName
from services.common.metrics import REGISTRY_RECORDS_SKIPPED
from services.common.model_version import ACTIVE_STAGES, ModelVersion
from services.common.service import TopicFollower
from services.common.settings import Settings

log = logging.getLogger(__name__)

REGISTRY_TOPIC: TopicName = "models.registry"


class RegistryState:
    """The folded registry: pure, no I/O, so it is unit-tested without a broker."""

    def __init__(self) -> None:
        self.versions: dict[str, ModelVersion] = {}

    def apply(self, version: ModelVersion) -> bool:
        """Fold one record; returns True when it changed the state."""
        held = self.versions.get(version.key)
        if held is not None and held.generation >= version.generation:
            return False
        self.versions[version.key] = version
        return True

    def of_model(self, model: str) -> list[ModelVersion]:
        return sorted(
            (v for v in self.versions.values() if v.name == model), key=lambda v: v.semver
        )

    def champion(self, model: str) -> ModelVersion | None:
        champions = [v for v in self.of_model(model) if v.stage == "champion"]
        return max(champions, key=lambda v: v.generation) if champions else None

    def active(self, model: str) -> list[ModelVersion]:
        """Champion first, then enabled challengers."""
        champion = self.champion(model)
        challengers = [
            v
            for v in self.of_model(model)
            if v.stage in ACTIVE_STAGES and v.stage != "champion" and v.enabled
        ]
        return ([champion] if champion else []) + challengers

    def models(self) -> list[str]:
        return sorted({v.name for v in self.versions.values()})

    @property
    def max_generation(self) -> int:
        return max((v.generation for v in self.versions.values()), default=0)


class RegistryView:
    """The folded registry, kept current: a ``TopicFollower`` of models.registry."""

    def __init__(
        self, settings: Settings, on_change: Callable[[RegistryState], None] | None = None
    ) -> None:
        self.settings = settings
        self.state = RegistryState()
        self.on_change = on_change
        self._codec = codec(ModelVersionRecord)
        self._follower = TopicFollower(
            settings, REGISTRY_TOPIC, self._apply, self._changed, what="registry-reader"
        )
        self.ready = self._follower.ready

    async def start(self) -> None:
        await self._follower.start()
        log.info("registry folded", extra={"versions": len(self.state.versions)})

    async def stop(self) -> None:
        await self._follower.stop()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.state)

    def _apply(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        if record.value is None:
            return False
        try:
            version = ModelVersion.from_record(self._codec.decode(record.value))
        except (CodecError, KeyError) as exc:
            REGISTRY_RECORDS_SKIPPED.inc()
            log.error(
                "skipping unreadable registry record",
                extra={"offset": record.offset, "error": str(exc)},
            )
            return False
        return self.state.apply(version)
