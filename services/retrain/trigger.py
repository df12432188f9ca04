"""Turning alerts, stats and a schedule into retrain requests: pure, no I/O.

One request per alert episode (alert key + first_seen), at most one per interval and
``max_per_day`` per day; scheduled retrains are skipped when too few labels arrived.
Suppressed triggers are counted with their reason.
"""

from __future__ import annotations

import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

from scoremesh.contract.records import Alert, MonitoringStats, RetrainRequest
from services.common.policies.retrain import SEVERITIES, RetrainPolicy

DAY_MS = 86_400_000


@dataclass
class PendingChange:
    """An alert episode waiting for enough labels from after the change it signalled."""

    episode: str
    anchor_ms: int  # event time of the detection
    alert: Alert
    labels: int = 0


@dataclass
class ModelTrigger:
    pending: dict[str, PendingChange] = field(default_factory=dict)
    last_request_ms: int | None = None
    recent_requests_ms: deque[int] = field(default_factory=deque)
    episodes: set[str] = field(default_factory=set)
    labels_since_last: int = 0
    latest_event_ms: int = 0


@dataclass
class TriggerState:
    models: dict[str, ModelTrigger] = field(default_factory=dict)
    suppressed: Counter[str] = field(default_factory=Counter)

    def of(self, model: str) -> ModelTrigger:
        return self.models.setdefault(model, ModelTrigger())

    def fold_request(self, request: RetrainRequest) -> None:
        """Rebuild state from our own output topic (retrain.requests) at start."""
        m = self.of(request["model"])
        at = int(request["requested_at"])
        m.last_request_ms = max(m.last_request_ms or 0, at)
        m.recent_requests_ms.append(at)
        episode = request.get("evidence", {}).get("episode")
        if episode:
            m.episodes.add(episode)
            m.pending.pop(episode, None)
        m.labels_since_last = 0


def episode_of(alert: Alert) -> str:
    return f"{alert['alert_key']}@{alert['first_seen']}"


def _request(
    model: str,
    reason: str,
    evidence: dict[str, str],
    m: ModelTrigger,
    policy: RetrainPolicy,
    now_ms: int,
    actor: str,
) -> RetrainRequest:
    end = m.latest_event_ms or now_ms
    return {
        "request_id": str(uuid.uuid4()),
        "model": model,
        "reason": reason,
        "evidence": evidence,
        "window_start": int(end - policy.window_s * 1000),
        "window_end": end,
        "actor": actor,
        "requested_at": now_ms,
    }


def _gate(m: ModelTrigger, policy: RetrainPolicy, now_ms: int) -> str | None:
    while m.recent_requests_ms and m.recent_requests_ms[0] <= now_ms - DAY_MS:
        m.recent_requests_ms.popleft()
    if m.last_request_ms is not None and now_ms - m.last_request_ms < policy.min_interval_s * 1000:
        return "interval"
    if len(m.recent_requests_ms) >= policy.max_per_day:
        return "max_per_day"
    if m.labels_since_last < policy.min_new_labels:
        return "too_few_labels"
    return None


def _record(m: ModelTrigger, request: RetrainRequest) -> None:
    m.last_request_ms = request["requested_at"]
    m.recent_requests_ms.append(request["requested_at"])
    m.labels_since_last = 0


def counts_labels(stats: MonitoringStats) -> bool:
    """Labels are counted once: champion variant, all segments, tumbling windows."""
    return bool(
        stats["variant"] == "champion"
        and stats["segment"] == "all"
        and stats["window_kind"] == "tumbling"
    )


def on_stats(
    state: TriggerState,
    stats: MonitoringStats,
    policy: RetrainPolicy | None = None,
    now_ms: int = 0,
    actor: str = "retrain-trigger",
) -> list[RetrainRequest]:
    """Count new labels and track event time; release changes that now have enough labels."""
    m = state.of(stats["model"])
    m.latest_event_ms = max(m.latest_event_ms, int(stats["window_end"]))
    if not counts_labels(stats):
        return []
    m.labels_since_last += int(stats["count"])
    ready: list[RetrainRequest] = []
    for change in list(m.pending.values()):
        if int(stats["window_start"]) >= change.anchor_ms:
            change.labels += int(stats["count"])
        if policy is not None and change.labels >= policy.min_labels_after_change:
            del m.pending[change.episode]
            request = _from_alert(
                state,
                m,
                change.alert,
                change.episode,
                policy,
                now_ms,
                actor,
                window_start=change.anchor_ms,
            )
            if request is not None:
                ready.append(request)
    return ready


def on_alert(
    state: TriggerState,
    alert: Alert,
    policy: RetrainPolicy,
    now_ms: int,
    actor: str = "retrain-trigger",
    replay: bool = False,
) -> RetrainRequest | None:
    if alert["state"] != "firing" or alert["kind"] not in policy.alert_kinds:
        return None
    if SEVERITIES.index(alert["severity"]) < SEVERITIES.index(policy.min_severity):
        return None
    signal = alert.get("subject", {}).get("signal", "")
    if policy.signals and signal not in policy.signals:
        return None
    m = state.of(alert["model"])
    episode = episode_of(alert)
    if episode in m.episodes:
        return None  # this episode already asked for a retrain (or its update repeats it)
    m.episodes.add(episode)
    if policy.train_from_change:
        if m.pending:
            # Another signal of a change already waiting for labels: the same episode.
            state.suppressed["change_pending"] += 1
            return None
        m.pending[episode] = PendingChange(episode, int(alert["first_seen"]), alert)
        return None
    if replay:
        return None
    return _from_alert(state, m, alert, episode, policy, now_ms, actor)


def _from_alert(
    state: TriggerState,
    m: ModelTrigger,
    alert: Alert,
    episode: str,
    policy: RetrainPolicy,
    now_ms: int,
    actor: str,
    window_start: int | None = None,
) -> RetrainRequest | None:
    blocked = _gate(m, policy, now_ms)
    if blocked:
        state.suppressed[blocked] += 1
        return None
    request = _request(
        alert["model"],
        f"{alert['kind']}: {alert['summary']}",
        {
            "episode": episode,
            "alert_key": alert["alert_key"],
            "severity": alert["severity"],
            "model_version": alert.get("model_version") or "",
            **{f"alert.{k}": str(v) for k, v in alert.get("evidence", {}).items()},
        },
        m,
        policy,
        now_ms,
        actor,
    )
    if window_start is not None:
        request["window_start"] = window_start
        request["evidence"]["trained_from"] = "change"
    _record(m, request)
    return request


def on_schedule(
    state: TriggerState,
    model: str,
    policy: RetrainPolicy,
    now_ms: int,
    actor: str = "retrain-trigger:schedule",
) -> RetrainRequest | None:
    m = state.of(model)
    blocked = _gate(m, policy, now_ms)
    if blocked:
        state.suppressed[f"schedule_{blocked}"] += 1
        return None
    request = _request(
        model,
        f"scheduled ({policy.schedule})",
        {"schedule": policy.schedule or "", "labels": str(m.labels_since_last)},
        m,
        policy,
        now_ms,
        actor,
    )
    _record(m, request)
    return request
