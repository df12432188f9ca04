"""Sending commands to the registry and waiting for its answer (the CLI, API, trainer use it)."""

from __future__ import annotations

import time
import uuid

from aiokafka import AIOKafkaProducer, TopicPartition

from scoremesh.contract.codec import codec
from scoremesh.contract.records import DeploymentEvent, ModelCommand
from scoremesh.contract.topics import TopicName
from services.common.errors import UserError
from services.common.kafka import (
    assign_all,
    make_consumer,
    read_to_end,
    send_one,
    start_with_retry,
)
from services.common.settings import Settings

COMMANDS_TOPIC: TopicName = "models.commands"
DEPLOYMENTS_TOPIC: TopicName = "deployments.log"


class RegistryTimeout(UserError, TimeoutError):
    """No answer from the registry in time; the message says what to check."""


def new_command(
    model: str,
    action: str,
    actor: str,
    version: str | None = None,
    target_stage: str | None = None,
    proposal: str | None = None,
    options: dict[str, str] | None = None,
    reason: str = "",
) -> ModelCommand:
    return {
        "request_id": str(uuid.uuid4()),
        "model": model,
        "action": action,
        "version": version,
        "target_stage": target_stage,
        "proposal": proposal,
        "options": options or {},
        "actor": actor,
        "reason": reason,
        "issued_at": int(time.time() * 1000),
    }


async def send_command(
    settings: Settings, command: ModelCommand, producer: AIOKafkaProducer | None = None
) -> None:
    await send_one(
        settings,
        settings.topic(COMMANDS_TOPIC),
        codec(ModelCommand).encode(command),
        command["model"].encode(),
        "command-producer",
        producer,
    )


async def wait_for_outcome(
    settings: Settings, request_id: str, timeout_s: float = 60.0
) -> DeploymentEvent:
    """The registry's DeploymentEvent for a request id (applied or refused)."""
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "deployments-reader", settings)
    decode = codec(DeploymentEvent).decode
    try:
        tps: list[TopicPartition] = await assign_all(consumer, settings.topic(DEPLOYMENTS_TOPIC))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(*tps, timeout_ms=500)
            for records in batches.values():
                for record in records:
                    if record.value is None:
                        continue
                    event = decode(record.value)
                    if event["request_id"] == request_id:
                        return event
        raise RegistryTimeout(
            f"no answer from the registry for request {request_id} in {timeout_s:.0f}s; "
            "is `scoremesh run registry` running?"
        )
    finally:
        await consumer.stop()


async def command(
    settings: Settings, cmd: ModelCommand, timeout_s: float = 60.0
) -> DeploymentEvent:
    await send_command(settings, cmd)
    return await wait_for_outcome(settings, cmd["request_id"], timeout_s)


async def read_history(settings: Settings, model: str | None = None) -> list[DeploymentEvent]:
    consumer = make_consumer(settings, group_id=None)
    await start_with_retry(consumer.start, "deployments-reader", settings)
    decode = codec(DeploymentEvent).decode
    events: list[DeploymentEvent] = []
    try:
        tps = await assign_all(consumer, settings.topic(DEPLOYMENTS_TOPIC))
        await read_to_end(
            consumer, tps, lambda r: events.append(decode(r.value)) if r.value else None
        )
    finally:
        await consumer.stop()
    return [e for e in events if model is None or e["model"] == model]


def refusal(cmd: ModelCommand, detail: str) -> DeploymentEvent:
    """The answer to a command refused before it was sent (a readiness gate, say), in the
    form the registry answers with, so callers handle both alike."""
    return {
        "request_id": cmd["request_id"],
        "model": cmd["model"],
        "version": cmd.get("version"),
        "action": cmd["action"],
        "outcome": "refused",
        "generation": 0,
        "actor": cmd["actor"],
        "reason": cmd.get("reason", ""),
        "detail": detail,
        "at": cmd["issued_at"],
    }


def describe(event: DeploymentEvent) -> str:
    """One line for people: what the registry did with a command."""
    what = f"{event['model']}@{event['version']}" if event.get("version") else event["model"]
    if event["outcome"] == "refused":
        return f"refused {event['action']} of {what}: {event['detail']}"
    if event["action"] == "register":
        return f"registered {what}"
    moved = f"{event.get('from_stage')} -> {event.get('to_stage')}"
    extra = (
        f" (previous champion {event['previous_champion']})"
        if event.get("previous_champion")
        else ""
    )
    return f"{event['action']}: {what} {moved}{extra}"
