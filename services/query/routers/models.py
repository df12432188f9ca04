"""Models: the folded registry, the deployment history, promote / rollback commands and
retrain requests (with the trainer's answer)."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import JSONResponse

from scoremesh.contract.records import DeploymentEvent, ModelCommand
from services.common.commands import (
    RegistryTimeout,
    new_command,
    send_command,
    wait_for_outcome,
)
from services.common.kafka import KafkaUnavailable
from services.common.model_version import ModelVersion
from services.common.retraining import latest_result, manual_request, publish_request
from services.query.deps import MutationAuth, Runtime
from services.query.problems import Problem
from services.query.runtime import QueryRuntime
from services.query.schemas import (
    MODEL_NAME,
    SEMVER,
    DeploymentEventOut,
    HistoryOut,
    ModelOut,
    ModelsOut,
    PromoteIn,
    RetrainAcceptedOut,
    RetrainIn,
    RetrainResultOut,
    RollbackIn,
    VersionOut,
    problem_responses,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"])

Name = Annotated[str, Path(pattern=MODEL_NAME, description="model name")]
Version = Annotated[str, Path(pattern=SEMVER, description="semantic version")]
RequestId = Annotated[
    str,
    Path(
        pattern=r"^[0-9a-f-]{8,64}$", description="request_id from POST /v1/models/{name}/retrain"
    ),
]
ACTOR = "api"


def _summary(v: ModelVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "stage": v.stage,
        "generation": v.generation,
        "canary_percent": v.canary_percent,
        "enabled": v.enabled,
        "registered_at": v.registered_at,
        "updated_at": v.updated_at,
    }


def _folded(runtime: QueryRuntime) -> None:
    if not runtime.view.ready.is_set():
        raise Problem(503, "not-ready", "models.registry is still being read; retry shortly")


def _versions(runtime: QueryRuntime, name: str) -> list[ModelVersion]:
    _folded(runtime)
    versions = runtime.view.state.of_model(name)
    if not versions:
        known = ", ".join(runtime.view.state.models()) or "none yet"
        raise Problem(404, "not-found", f"no model named {name!r} (known models: {known})")
    return versions


def _challengers(runtime: QueryRuntime, name: str) -> list[dict[str, Any]]:
    return [_summary(v) for v in runtime.view.state.active(name) if v.stage != "champion"]


@router.get(
    "",
    summary="Every model in the registry, with its champion and challengers",
    response_model=ModelsOut,
    responses=problem_responses(503),
)
async def list_models(runtime: Runtime) -> Any:
    _folded(runtime)
    state = runtime.view.state
    out = []
    for name in state.models():
        champion = state.champion(name)
        out.append(
            {
                "name": name,
                "champion": champion.version if champion else None,
                "challengers": _challengers(runtime, name),
                "versions": len(state.of_model(name)),
            }
        )
    return {"models": out}


@router.get(
    "/{name}",
    summary="One model: its versions, champion, challengers and what this replica serves",
    response_model=ModelOut,
    responses=problem_responses(404, 503),
)
async def get_model(name: Name, runtime: Runtime) -> Any:
    versions = _versions(runtime, name)
    champion = runtime.view.state.champion(name)
    serving = None
    current = runtime.holder.current.models.get(name)
    if current is not None:
        serving = {
            "champion": current.champion.key if current.champion else None,
            "challengers": [f"{v.key}:{v.stage}" for _, v in current.challengers],
            "failures": dict(current.failures),
        }
    return {
        "name": name,
        "champion": champion.version if champion else None,
        "challengers": _challengers(runtime, name),
        "versions": [_summary(v) for v in versions],
        "serving": serving,
    }


@router.get(
    "/{name}/versions/{version}",
    summary="One version: stage, artifact, feature spec, metrics and limitations",
    response_model=VersionOut,
    responses=problem_responses(404, 503),
)
async def get_version(name: Name, version: Version, runtime: Runtime) -> Any:
    versions = _versions(runtime, name)
    held = next((v for v in versions if v.version == version), None)
    if held is None:
        known = ", ".join(v.version for v in versions)
        raise Problem(404, "not-found", f"{name} has no version {version} (versions: {known})")
    return held.to_json()


@router.get(
    "/{name}/history",
    summary="The deployment log of a model: every stage change and refused command",
    response_model=HistoryOut,
    responses=problem_responses(404, 503),
)
async def history(
    name: Name,
    runtime: Runtime,
    limit: Annotated[int, Query(ge=1, le=10_000, description="the most recent N")] = 100,
) -> Any:
    try:
        events = [e for e in await runtime.history() if e["model"] == name]
    except KafkaUnavailable as exc:
        raise Problem(503, "kafka-unavailable", str(exc)) from exc
    if not events and name not in runtime.view.state.models():
        raise Problem(404, "not-found", f"no model named {name!r} and no history for it")
    return {"model": name, "events": events[-limit:]}


async def send_and_wait(runtime: QueryRuntime, cmd: ModelCommand) -> DeploymentEvent:
    """Send a command to the registry and return its answer from deployments.log (applied
    or refused); the API's routes and the console's buttons both go through here."""
    settings = runtime.settings
    try:
        await send_command(settings, cmd, producer=runtime.producer)
        event = await wait_for_outcome(
            settings, cmd["request_id"], timeout_s=runtime.config.command_timeout_s
        )
    except RegistryTimeout as exc:
        raise Problem(
            504,
            "registry-timeout",
            f"{exc}; the command may still be applied later (request_id {cmd['request_id']})",
            command_request_id=cmd["request_id"],
        ) from exc
    except KafkaUnavailable as exc:
        raise Problem(503, "kafka-unavailable", str(exc)) from exc
    runtime.forget_history()
    log.info(
        "registry command answered",
        extra={
            k: event.get(k) for k in ("request_id", "model", "action", "outcome", "detail", "actor")
        },
    )
    return event


def promote_command(name: str, body: PromoteIn, actor: str = ACTOR) -> ModelCommand:
    options = {"percent": str(body.percent)} if body.percent is not None else {}
    return new_command(
        name,
        "promote",
        actor,
        version=body.version,
        target_stage=body.stage,
        options=options,
        reason=body.reason,
    )


def rollback_command(name: str, body: RollbackIn, actor: str = ACTOR) -> ModelCommand:
    return new_command(name, "rollback", actor, version=body.version, reason=body.reason)


async def _command(runtime: QueryRuntime, cmd: ModelCommand) -> JSONResponse:
    event = await send_and_wait(runtime, cmd)
    if event["outcome"] != "applied":
        raise Problem(409, "command-refused", event.get("detail") or "refused", event=event)
    return JSONResponse(event)


COMMAND_RESPONSES = problem_responses(401, 403, 409, 422, 503, 504)


@router.post(
    "/{name}/promote",
    summary="Move a version to shadow, canary (with a percent), champion or retired",
    response_model=DeploymentEventOut,
    responses=COMMAND_RESPONSES,
    dependencies=[MutationAuth],
)
async def promote(name: Name, body: PromoteIn, runtime: Runtime) -> Any:
    return await _command(runtime, promote_command(name, body))


@router.post(
    "/{name}/rollback",
    summary="Roll back the champion to the previous one, or take a challenger out",
    response_model=DeploymentEventOut,
    responses=COMMAND_RESPONSES,
    dependencies=[MutationAuth],
)
async def rollback(
    name: Name, runtime: Runtime, body: Annotated[RollbackIn | None, Body()] = None
) -> Any:
    return await _command(runtime, rollback_command(name, body or RollbackIn()))


@router.post(
    "/{name}/retrain",
    status_code=202,
    summary="Ask the trainer for a new version trained on recent labelled events",
    description="Publishes a request to retrain.requests, as `scoremesh models retrain` does. "
    "The trainer trains from the champion's recipe, compares with the champion and registers "
    "a better version in shadow; its answer appears at `result_url`.",
    response_model=RetrainAcceptedOut,
    responses=problem_responses(401, 403, 404, 409, 422, 503),
    dependencies=[MutationAuth],
)
async def retrain(
    name: Name, runtime: Runtime, body: Annotated[RetrainIn | None, Body()] = None
) -> Any:
    body = body or RetrainIn()
    _versions(runtime, name)
    if runtime.view.state.champion(name) is None:
        raise Problem(
            409,
            "no-champion",
            f"{name} has no champion, and a retrain starts from the champion; "
            "promote a version first",
        )
    now = int(time.time() * 1000)
    end = int(body.window_end.timestamp() * 1000) if body.window_end else now
    days = body.window_days
    window_s = days * 86400 if days else runtime.settings.retrain.policy.window_s
    request = manual_request(name, ACTOR, body.reason, end, window_s, now)
    try:
        await publish_request(runtime.settings, request, producer=runtime.producer)
    except KafkaUnavailable as exc:
        raise Problem(503, "kafka-unavailable", str(exc)) from exc
    log.info(
        "retrain requested",
        extra={"request_id": request["request_id"], "model": name, "reason": request["reason"]},
    )
    url = f"/v1/models/{name}/retrains/{request['request_id']}"
    return JSONResponse(
        {"request": request, "result_url": url}, status_code=202, headers={"Location": url}
    )


@router.get(
    "/{name}/retrains/{request_id}",
    summary="The trainer's latest word on a retrain request: started, succeeded, rejected, failed, needs_person",
    response_model=RetrainResultOut,
    responses=problem_responses(404, 503),
)
async def retrain_result(name: Name, request_id: RequestId, runtime: Runtime) -> Any:
    try:
        result = await latest_result(runtime.settings, request_id)
    except KafkaUnavailable as exc:
        raise Problem(503, "kafka-unavailable", str(exc)) from exc
    if result is None or result["model"] != name:
        raise Problem(
            404,
            "not-found",
            f"no answer from the trainer for retrain {request_id} of {name} yet: it answers "
            "when it starts the request (is `scoremesh run trainer` running?)",
        )
    return result
