"""`scoremesh monitor status`: current drift state and open alerts, as rows.

Alerts come from the alerts topic (folded, authoritative: works with no monitor running)
or from Redis; drift state comes from Redis, where the monitor writes every window's
measurements; performance per version, variant and segment (metrics, label coverage and
delay, the error rate by feature bin) from Redis, where the label join publishes it. ``format_table`` (services.common.tables) renders rows for a terminal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord
from redis.exceptions import RedisError

from scoremesh.contract.codec import CodecError, codec
from services.common.kafka import assign_all, make_consumer, read_to_end, start_with_retry
from services.common.policies.monitor import severity_rank
from services.common.settings import Settings
from services.common.tables import format_table as format_table  # re-exported
from services.monitor.alerts import AlertBook
from services.monitor.core import ALERTS
from services.monitor.store import AlertStore

ALERT_COLUMNS = (
    "severity",
    "alert_key",
    "kind",
    "summary",
    "first_seen",
    "last_seen",
    "count",
)
VERSION_COLUMNS = (
    "model",
    "version",
    "segment",
    "predictions",
    "labels",
    "label_coverage",
    "label_delay_mean_s",
    "error_rate",
    "mean_score",
    "detections",
)
SEGMENT_COLUMNS = (
    "model",
    "version",
    "variant",
    "segment",
    "window",
    "labeled",
    "coverage",
    "accuracy",
    "f1",
    "log_loss",
    "label_delay_p50_s",
    "label_delay_p99_s",
    "worst_bin",
)
# a feature bin with fewer joined rows than this is listed but never called the worst
MIN_BIN_ROWS = 20
DRIFT_COLUMNS = (
    "model",
    "version",
    "signal",
    "state",
    "psi",
    "ks",
    "rate",
    "sample",
    "window_last",
)


@dataclass(frozen=True)
class MonitorStatus:
    drift: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    alerts_source: str  # "topic" | "redis"
    notes: list[str] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "versions": self.versions,
            "segments": self.segments,
            "drift": self.drift,
            "alerts": self.alerts,
            "alerts_source": self.alerts_source,
            "notes": self.notes,
        }


def _when(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def alert_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [
        {
            "severity": r["severity"],
            "alert_key": r["alert_key"],
            "kind": r["kind"],
            "state": r["state"],
            "model": r["model"],
            "version": r.get("model_version") or "",
            "summary": r["summary"],
            "first_seen": _when(r["first_seen"]),
            "last_seen": _when(r["last_seen"]),
            "count": r.get("count", 1),
            "evidence": r.get("evidence", {}),
        }
        for r in records
        if r["state"] == "firing"
    ]
    rows.sort(key=lambda r: (-severity_rank(r["severity"]), r["alert_key"]))
    return rows


def drift_rows(measurements: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for d in measurements:
        stats = d.get("stats") or {}
        rows.append(
            {
                "model": d["model"],
                "version": d["version"],
                "signal": d["signal"],
                "feature": d.get("feature") or "",
                "state": d.get("state", "ok"),
                "psi": _num(stats.get("psi")),
                "ks": _num(stats.get("ks")),
                "rate": _num(stats.get("rate")),
                "sample": d.get("sample", 0),
                "window_last": _when(d.get("window_last")),
                "stats": stats,
            }
        )
    rows.sort(key=lambda r: (r["model"], r["version"], -severity_rank(r["state"]), r["signal"]))
    return rows


def version_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model version and segment: counts, label coverage and delay, error rate."""
    out = []
    for r in rows:
        row = dict(r)
        for name in ("label_coverage", "label_delay_mean_s", "error_rate", "mean_score"):
            row[name] = _num(r.get(name))
        out.append(row)
    out.sort(key=lambda r: (r.get("model", ""), r.get("version", ""), r.get("segment", "")))
    return out


def error_bins(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """The error rate per feature bin in a MonitoringStats metrics map, worst first (bins
    with fewer than ``MIN_BIN_ROWS`` rows after the rest)."""
    bins: list[dict[str, Any]] = []
    for name, rate in metrics.items():
        if not name.startswith("error_rate:"):
            continue
        feature, _, bin_name = name[len("error_rate:") :].rpartition(":")
        rows = int(metrics.get(f"n:{feature}:{bin_name}", 0))
        bins.append({"feature": feature, "bin": bin_name, "error_rate": rate, "rows": rows})
    bins.sort(key=lambda b: (b["rows"] < MIN_BIN_ROWS, -b["error_rate"], b["feature"], b["bin"]))
    return bins


def segment_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model version, variant and segment: the label join's newest statistics."""
    rows = []
    for r in records:
        metrics = {k: float(v) for k, v in (r.get("metrics") or {}).items()}
        bins = error_bins(metrics)
        worst = bins[0] if bins and bins[0]["rows"] >= MIN_BIN_ROWS else None
        rows.append(
            {
                "model": r["model"],
                "version": r["model_version"],
                "variant": r["variant"],
                "segment": r["segment"],
                "window": f"{r['window_kind']} to {_when(r.get('window_end'))}",
                "labeled": int(metrics.get("labeled", r.get("count", 0))),
                "coverage": _num(metrics.get("coverage")),
                "accuracy": _num(metrics.get("accuracy")),
                "f1": _num(metrics.get("f1")),
                "log_loss": _num(metrics.get("log_loss")),
                "label_delay_p50_s": _seconds(metrics.get("label_delay_p50_ms")),
                "label_delay_p99_s": _seconds(metrics.get("label_delay_p99_ms")),
                "worst_bin": (
                    f"{worst['feature']} {worst['bin']}: {worst['error_rate']:.3g} "
                    f"of {worst['rows']}"
                    if worst
                    else ""
                ),
                "metrics": {k: v for k, v in metrics.items() if ":" not in k},
                "error_bins": bins,
            }
        )
    rows.sort(
        key=lambda r: (r["model"], r["version"], r["variant"], r["segment"] != "all", r["segment"])
    )
    return rows


def _seconds(ms: float | None) -> str:
    return "" if ms is None else _num(ms / 1000)


def _num(value: Any) -> str:
    return "" if value is None else f"{float(value):.4g}"


async def fold_alert_topic(settings: Settings, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every alert's newest record, from the alerts topic."""
    book = AlertBook()
    alert_codec = codec("Alert")
    consumer = make_consumer(settings, group_id=None, max_poll_records=5_000)
    await start_with_retry(consumer.start, "status-alerts", settings)

    def handle(record: ConsumerRecord[bytes, bytes]) -> None:
        # an unreadable record is counted by the monitor itself; status shows the rest
        with contextlib.suppress(CodecError, KeyError, ValueError):
            book.apply_record(alert_codec.decode(record.value or b""))

    try:
        tps = await assign_all(consumer, settings.topic(ALERTS))
        await read_to_end(consumer, tps, handle, timeout_s=timeout_s)
    finally:
        await consumer.stop()
    return [a.to_record() for a in book.alerts.values()]


async def monitor_status(
    settings: Settings, *, alerts_from: str = "topic", store: AlertStore | None = None
) -> MonitorStatus:
    """Drift state (Redis) and open alerts (``alerts_from`` = "topic" or "redis")."""
    notes: list[str] = []
    own = store is None and settings.redis_url is not None
    if own:
        store = AlertStore(settings, ttl_s=60, recent=1)
    drift: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    try:
        if store is not None:
            try:
                drift = drift_rows(await store.drift_rows())
                versions = version_rows(await store.version_rows())
                segments = segment_rows(await store.performance_records())
                if alerts_from == "redis":
                    alerts = alert_rows(await store.open_alerts())
            except (RedisError, OSError) as exc:
                notes.append(f"Redis unavailable ({exc}); drift state needs the monitor's Redis")
        else:
            notes.append("no Redis configured (SCOREMESH_REDIS_URL): drift state is unavailable")
        if alerts_from == "topic" or (alerts_from == "redis" and store is None):
            alerts = alert_rows(await fold_alert_topic(settings))
            alerts_from = "topic"
    finally:
        if own and store is not None:
            await store.close()
    if not drift:
        notes.append("no drift measurements yet: is `scoremesh run monitor` running?")
    return MonitorStatus(
        drift=drift,
        alerts=alerts,
        alerts_source=alerts_from,
        notes=notes,
        versions=versions,
        segments=segments,
    )
