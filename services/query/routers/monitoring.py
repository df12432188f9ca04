"""Monitoring and alerts: the monitor's read model in Redis (``services/monitor/store.py``).

Drift measurements per ``model@version`` and the open alerts are read with the monitor's
own ``AlertStore``; recently resolved alerts come from its ``alerts:recent`` list. When
the monitor has written nothing yet, these routes answer empty lists with a note.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from redis.exceptions import RedisError

from services.common.alert_store import AlertReadModel
from services.query.deps import Runtime
from services.query.problems import Problem
from services.query.runtime import QueryRuntime
from services.query.schemas import MODEL_NAME, AlertsOut, MonitoringOut, problem_responses

router = APIRouter(prefix="/v1", tags=["monitoring"])


def _alert_store(runtime: QueryRuntime) -> AlertReadModel:
    if runtime.alerts is None:
        raise Problem(503, "store-unavailable", "this server has no Redis; set SCOREMESH_REDIS_URL")
    return runtime.alerts


def _unavailable(exc: Exception) -> Problem:
    return Problem(503, "store-unavailable", f"the query store (Redis) did not answer: {exc}")


@router.get(
    "/monitoring/{model}",
    summary="The monitor's latest drift measurements per version and signal",
    response_model=MonitoringOut,
    responses=problem_responses(503),
)
async def monitoring(
    model: Annotated[str, Path(pattern=MODEL_NAME)],
    runtime: Runtime,
    version: Annotated[str | None, Query(max_length=64)] = None,
) -> Any:
    try:
        rows = await _alert_store(runtime).drift_rows()
        figures = await _alert_store(runtime).version_rows()
        segments = await _alert_store(runtime).performance_records(model)
    except (RedisError, OSError) as exc:
        raise _unavailable(exc) from exc
    versions = [
        r
        for r in figures
        if r.get("model") == model and (version is None or r.get("version") == version)
    ]
    stats = [
        r
        for r in rows
        if r.get("model") == model and (version is None or r.get("version") == version)
    ]
    stats.sort(key=lambda r: (str(r.get("version")), str(r.get("signal"))))
    note = None
    if not stats:
        note = (
            f"no drift measurements for {model!r} yet: the monitor service writes them once "
            "it runs and has seen a window of predictions"
        )
    segments = [r for r in segments if version is None or r.get("model_version") == version]
    return {
        "model": model,
        "stats": stats,
        "versions": versions,
        "segments": segments,
        "note": note,
    }


@router.get(
    "/alerts",
    summary="Alerts raised by the monitor: open ones by default, most recently seen first",
    response_model=AlertsOut,
    responses=problem_responses(503),
)
async def alerts(
    runtime: Runtime,
    model: Annotated[str | None, Query(pattern=MODEL_NAME)] = None,
    state: Literal["firing", "resolved", "all"] = "firing",
    severity: Literal["info", "warning", "critical"] | None = None,
) -> Any:
    store = _alert_store(runtime)
    try:
        found = await store.alerts("firing" if state == "firing" else "all")
    except (RedisError, OSError) as exc:
        raise _unavailable(exc) from exc
    picked = [
        a
        for a in found
        if (model is None or a.get("model") == model)
        and (state == "all" or a.get("state") == state)
        and (severity is None or a.get("severity") == severity)
    ]
    picked.sort(key=lambda a: a.get("last_seen") or 0, reverse=True)
    note = None
    if not found:
        note = "no alerts recorded: the monitor service writes them once it runs"
    return {"alerts": picked, "note": note}
