"""registry: the only writer of models.registry and deployments.log.

Its state is the registry topic itself (plus deployments.log for history and handled
request ids): folded at start, then kept in memory while it applies commands. See
docs/adr/0002-registry-state-is-its-topic.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack

from aiokafka import ConsumerRecord

from scoremesh.contract.codec import CodecError, codec
from scoremesh.contract.records import DeploymentEvent, ModelCommand
from scoremesh.contract.records import ModelVersion as ModelVersionRecord
from scoremesh.contract.topics import TopicName
from services.common.artifacts import ArtifactError, fetch_artifact
from services.common.batchloop import BatchLoop, Out, Record
from services.common.health import HealthServer
from services.common.kafka import make_producer
from services.common.metrics import COMMANDS
from services.common.model_version import ModelVersion, VersionProposal
from services.common.onnx_model import ModelLoadError, check_onnx_inputs, make_session
from services.common.service import StreamService, enter_client, fold_topics, on_exit
from services.common.settings import Settings
from services.registry.logic import Decision, RegistryBook, decide

log = logging.getLogger(__name__)

COMMANDS_TOPIC: TopicName = "models.commands"
REGISTRY_TOPIC: TopicName = "models.registry"
DEPLOYMENTS_TOPIC: TopicName = "deployments.log"


async def check_artifact(settings: Settings, proposal_json: str | None) -> str | None:
    """What is wrong with a proposal's artifact, or None: present, sha256 right, inputs match."""
    try:
        proposal = VersionProposal.model_validate_json(proposal_json or "")
    except ValueError:
        return None  # decide() reports the proposal itself
    try:
        path = await fetch_artifact(settings, proposal.artifact_uri, proposal.artifact_sha256)
        data = path.read_bytes()
        if len(data) != proposal.artifact_size:
            return f"artifact is {len(data)} bytes, the proposal says {proposal.artifact_size}"
        session = await asyncio.to_thread(make_session, data, 1)
        check_onnx_inputs(session, proposal.feature_spec)
    except (ArtifactError, ModelLoadError, OSError) as exc:
        return str(exc)
    return None


async def verify_artifact(settings: Settings, version: ModelVersion) -> str | None:
    """Re-check a registered version's bytes before it is put in front of traffic."""
    try:
        await fetch_artifact(settings, version.artifact_uri, version.artifact_sha256)
    except (ArtifactError, OSError) as exc:
        return str(exc)
    return None


async def fold_book(settings: Settings, book: RegistryBook) -> RegistryBook:
    """Fold the registry and the deployment log into ``book``: what ``decide`` needs."""
    version_codec = codec(ModelVersionRecord)
    event_codec = codec(DeploymentEvent)

    def on_version(record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is not None:
            book.apply_version(ModelVersion.from_record(version_codec.decode(record.value)))

    def on_event(record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is not None:
            book.apply_event(event_codec.decode(record.value))

    await fold_topics(
        settings, [(REGISTRY_TOPIC, on_version), (DEPLOYMENTS_TOPIC, on_event)], "registry-fold"
    )
    return book


class RegistryService(StreamService):
    """Consumes models.commands; core ``decide``; produces models.registry, deployments.log."""

    name = "registry"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.book = RegistryBook()
        self.producer = make_producer(settings)
        self.loop = BatchLoop(
            settings,
            self.name,
            f"{settings.topic_prefix}scoremesh-registry",
            [settings.topic(COMMANDS_TOPIC)],
            self.producer,
            self._process,
        )
        self._command_codec = codec(ModelCommand)
        self._version_codec = codec(ModelVersionRecord)
        self._event_codec = codec(DeploymentEvent)
        self.folded = False

    def register_checks(self, health: HealthServer) -> None:
        health.add_check("state", lambda: (self.folded, "registry and deployment log folded"))
        self.loop.add_checks(health)

    async def setup(self, stack: AsyncExitStack) -> None:
        await enter_client(stack, self.producer, "registry-producer", self.settings)
        on_exit(stack, self.loop.stop)
        await self._fold()
        self.folded = True

    async def _fold(self) -> None:
        await fold_book(self.settings, self.book)
        log.info(
            "registry state folded",
            extra={"versions": len(self.book.state.versions), "generation": self.book.generation},
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.loop.start(stop)
        await self.loop.run(stop)

    async def _process(self, records: list[Record]) -> list[Out]:
        outs: list[Out] = []
        for record in records:
            try:
                cmd = self._command_codec.decode(record.value or b"")
            except CodecError as exc:
                COMMANDS.labels("unknown", "undecodable").inc()
                log.error(
                    "undecodable command skipped",
                    extra={"offset": record.offset, "error": str(exc)},
                )
                continue
            if cmd["request_id"] in self.book.handled:
                COMMANDS.labels(cmd["action"], "duplicate").inc()
                continue
            problem = None
            if cmd["action"] == "register":
                problem = await check_artifact(self.settings, cmd.get("proposal"))
            elif cmd["action"] == "promote" and cmd.get("target_stage") != "retired":
                held = self.book.state.versions.get(f"{cmd['model']}@{cmd.get('version')}")
                if held is not None:
                    problem = await verify_artifact(self.settings, held)
            decision = decide(self.book, cmd, int(time.time() * 1000), problem)
            outs.extend(self._emit(decision))
        return outs

    def _emit(self, decision: Decision) -> list[Out]:
        event = decision.event
        COMMANDS.labels(event["action"], decision.outcome).inc()
        log_fn = log.warning if decision.refused else log.info
        log_fn(
            "command " + decision.outcome,
            extra={
                k: event[k]
                for k in ("request_id", "model", "version", "action", "to_stage", "detail", "actor")
            },
        )
        outs = []
        for version in decision.records:
            self.book.apply_version(version)
            outs.append(
                Out(
                    self.settings.topic(REGISTRY_TOPIC),
                    version.key.encode(),
                    self._version_codec.encode(version.to_record()),
                )
            )
        self.book.apply_event(event)
        outs.append(
            Out(
                self.settings.topic(DEPLOYMENTS_TOPIC),
                event["model"].encode(),
                self._event_codec.encode(event),
            )
        )
        return outs
