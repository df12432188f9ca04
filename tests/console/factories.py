"""Records the console reads, in the forms their writers use: MonitoringStats of the label
join (tumbling windows) and of the monitor's drift evaluations, and Alert records written
through the monitor's own Redis read-model writer."""

from __future__ import annotations

from typing import Any

from scoremesh.contract.codec import codec
from services.common.settings import Settings
from services.monitor.alerts import Transition
from services.monitor.store import AlertStore
from tests.helpers import produce

WINDOW_MS = 60_000
START_MS = 1_767_225_600_000
DRIFT_FEATURES = ("age", "salary", "loan")


def performance_record(
    version: str,
    window: int,
    accuracy: float,
    coverage: float = 0.8,
    segment: str = "all",
    variant: str = "champion",
    model: str = "credit",
    emitted_at: int | None = None,
) -> dict[str, Any]:
    """A tumbling window as the label join publishes it (metrics of GroupStats.metrics)."""
    start = START_MS + window * WINDOW_MS
    labeled = 100
    return {
        "model": model,
        "model_version": version,
        "variant": variant,
        "segment": segment,
        "window_kind": "tumbling",
        "window_start": start,
        "window_end": start + WINDOW_MS,
        "count": labeled,
        "metrics": {
            "predicted": labeled / coverage,
            "labeled": float(labeled),
            "expired_unlabeled": 0.0,
            "coverage": coverage,
            "accuracy": accuracy,
            "precision": accuracy,
            "recall": accuracy,
            "f1": accuracy,
            "log_loss": 0.3,
            "brier": 0.1,
            "error_rate:age:0": 1 - accuracy,
            "n:age:0": 10.0,
        },
        "emitted_at": emitted_at if emitted_at is not None else _now_ms(),
    }


def drift_record(
    version: str,
    evaluation: int,
    psi: float,
    model: str = "credit",
    variant: str = "champion",
    emitted_at: int | None = None,
) -> dict[str, Any]:
    """A drift evaluation as the monitor publishes it: window_kind "drift", segment "",
    ``psi.<feature>``, ``ks.<feature>`` and ``psi.__score__``."""
    start = START_MS + evaluation * WINDOW_MS
    metrics = {f"psi.{f}": psi * (i + 1) for i, f in enumerate(DRIFT_FEATURES)}
    metrics |= {f"ks.{f}": min(1.0, psi / 2 * (i + 1)) for i, f in enumerate(DRIFT_FEATURES)}
    metrics["psi.__score__"] = psi / 2
    return {
        "model": model,
        "model_version": version,
        "variant": variant,
        "segment": "",
        "window_kind": "drift",
        "window_start": start,
        "window_end": start + WINDOW_MS,
        "count": 500,
        "metrics": metrics,
        "emitted_at": emitted_at if emitted_at is not None else _now_ms(),
    }


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


async def publish_stats(settings: Settings, records: list[dict[str, Any]]) -> None:
    encode = codec("MonitoringStats").encode
    await produce(settings, "monitoring.stats", [(r["model"].encode(), encode(r)) for r in records])


def alert_record(
    signal: str,
    version: str = "1.0.0",
    state: str = "firing",
    severity: str = "warning",
    kind: str = "drift",
    model: str = "credit",
    at_ms: int | None = None,
    evidence: dict[str, str] | None = None,
) -> dict[str, Any]:
    at = at_ms if at_ms is not None else _now_ms()
    return {
        "alert_key": f"{model}/{version}/{signal}",
        "kind": kind,
        "severity": severity,
        "state": state,
        "model": model,
        "model_version": version,
        "subject": {"model": model, "version": version, "signal": signal, "segment": "all"},
        "summary": f"{signal} moved away from the reference",
        "evidence": evidence if evidence is not None else {"psi": "0.31", "threshold": "0.2"},
        "first_seen": at - 60_000,
        "last_seen": at,
        "count": 3,
    }


async def write_alerts(
    settings: Settings, records: list[dict[str, Any]], chunk: int = 2000, recent: int = 1000
) -> None:
    """Through the monitor's own writer (the Lua script that keeps the open set and the
    capped list of recent transitions)."""
    store = AlertStore(settings, ttl_s=3600, recent=recent)
    try:
        for i in range(0, len(records), chunk):
            events = [
                Transition("opened" if r["state"] == "firing" else "resolved", r)
                for r in records[i : i + chunk]
            ]
            await store.write(events, {})
    finally:
        await store.close()
