"""The alert manager: conditions in, Alert records and notifications out. Pure, no I/O.

One alert per ``alert_key = model/version/signal``, however many partitions, detectors or
monitor processes saw the condition:

- the first observation opens it (``opened``, notified); later ones fold in: ``count``
  and ``last_seen`` grow, the partitions that saw it accumulate in the evidence, and the
  record is re-written at most every ``heartbeat_s`` (not notified);
- a higher severity escalates it at once (``escalated``, notified);
- it resolves once its condition has been clear for ``cooldown_s``: for windowed
  statistics, clear means the last evaluation here fell below the resolve level; for
  events (a detector firing, a refused command) it is enough that none came. Repeats
  inside the cooldown therefore never open a second alert.

Time is the time of the data (event time for predictions, label time for labels, window
end for stats, wall time for deployment records), so replays and tests are exact.

The state is the alerts topic itself: ``AlertBook.apply_record`` folds it at start (the
monitor's own output, last record per key wins by episode order), no pickle.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from services.common.policies.monitor import AlertPolicy, Severity, SeverityRule, severity_rank

AlertEvent = Literal["opened", "escalated", "updated", "resolved", "renotify"]
NOTIFIED: frozenset[str] = frozenset({"opened", "escalated", "resolved", "renotify"})
MAX_PARTITIONS_SHOWN = 64


def alert_key(model: str, version: str | None, signal: str) -> str:
    return f"{model}/{version or '-'}/{signal}"


def time_domain(signal: str) -> str:
    """Which clock a signal's times come from: an alert resolves against that clock only."""
    if signal == "error_rate":
        return "labels"
    if signal.startswith("performance."):
        return "stats"
    if signal.startswith(("deployment_refused", "model_load", "retrain.")):
        return "wall"
    return "events"


@dataclass(frozen=True)
class Condition:
    """Something observed now: a detector fired, a statistic breached, a command was refused."""

    model: str
    version: str | None
    signal: str
    kind: str
    severity: Severity
    summary: str
    at_ms: int
    subject: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, str] = field(default_factory=dict)
    partition: int | None = None
    explicit_clear: bool = False  # True: resolves only after clear() says so (windowed tests)

    @property
    def key(self) -> str:
        return alert_key(self.model, self.version, self.signal)


@dataclass
class AlertState:
    key: str
    kind: str
    severity: str
    state: str  # firing | resolved
    model: str
    version: str | None
    subject: dict[str, str]
    summary: str
    evidence: dict[str, str]
    first_seen: int
    last_seen: int
    count: int
    # local bookkeeping, not on the wire
    explicit_clear: bool = False
    clear_since: int | None = None
    last_written: int = 0
    last_notified: int = 0

    @property
    def firing(self) -> bool:
        return self.state == "firing"

    @property
    def order(self) -> tuple[int, int, int, int]:
        """Records of one key sort by episode, then progress; resolved beats firing."""
        return (self.first_seen, self.count, self.last_seen, 1 if self.state == "resolved" else 0)

    def to_record(self) -> dict[str, Any]:
        return {
            "alert_key": self.key,
            "kind": self.kind,
            "severity": self.severity,
            "state": self.state,
            "model": self.model,
            "model_version": self.version,
            "subject": dict(self.subject),
            "summary": self.summary,
            "evidence": dict(self.evidence),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "count": self.count,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> AlertState:
        signal = record["alert_key"].split("/", 2)[-1]
        return cls(
            key=record["alert_key"],
            kind=record["kind"],
            severity=record["severity"],
            state=record["state"],
            model=record["model"],
            version=record.get("model_version"),
            subject=dict(record.get("subject") or {}),
            summary=record.get("summary", ""),
            evidence=dict(record.get("evidence") or {}),
            first_seen=int(record["first_seen"]),
            last_seen=int(record["last_seen"]),
            count=int(record.get("count", 1)),
            explicit_clear=record.get("evidence", {}).get("resolves") == "on_clear"
            or not _is_event_signal(signal),
            last_written=int(record["last_seen"]),
            last_notified=int(record["first_seen"]),
        )


def _is_event_signal(signal: str) -> bool:
    return signal.startswith(
        ("stream_drift.", "category_shift.", "error_rate", "deployment_refused", "model_load")
    )


@dataclass(frozen=True)
class Transition:
    """An Alert record to write, and whether people should hear about it."""

    event: AlertEvent
    record: dict[str, Any]

    @property
    def notify(self) -> bool:
        return self.event in NOTIFIED

    @property
    def key(self) -> str:
        return str(self.record["alert_key"])


class AlertBook:
    """Alert state by key, folded from Alert records (the topic) and from the manager."""

    def __init__(self) -> None:
        self.alerts: dict[str, AlertState] = {}

    def apply_record(self, record: dict[str, Any]) -> bool:
        """Fold one record; True when it replaced what was held (it is newer)."""
        incoming = AlertState.from_record(record)
        held = self.alerts.get(incoming.key)
        if held is not None and held.order >= incoming.order:
            return False
        if held is not None and held.first_seen == incoming.first_seen:
            incoming.clear_since = held.clear_since
            incoming.last_notified = max(held.last_notified, incoming.last_notified)
        self.alerts[incoming.key] = incoming
        return True

    def open_alerts(self) -> list[AlertState]:
        return sorted(
            (a for a in self.alerts.values() if a.firing),
            key=lambda a: (-severity_rank(a.severity), a.key),
        )


def _rule_for(rules: Sequence[SeverityRule], signal: str, statistic: str) -> SeverityRule | None:
    for rule in rules:
        if rule.statistic == statistic and fnmatch.fnmatchcase(signal, rule.signal):
            return rule
    return None


@dataclass(frozen=True)
class Verdict:
    """What the rules say about a set of statistics: a severity, clear, or in between."""

    severity: Severity | None
    clear: bool
    breached: dict[str, tuple[float, float]]  # statistic -> (value, level reached)


def classify(
    rules: Sequence[SeverityRule], signal: str, stats: dict[str, float], resolve_ratio: float
) -> Verdict:
    severity: Severity | None = None
    clear = True
    breached: dict[str, tuple[float, float]] = {}
    for name, value in stats.items():
        rule = _rule_for(rules, signal, name)
        if rule is None:
            continue
        found = rule.thresholds.severity(value)
        if found is not None:
            level = getattr(rule.thresholds, found)
            breached[name] = (value, float(level))
            if severity is None or severity_rank(found) > severity_rank(severity):
                severity = found
        lowest = rule.thresholds.lowest()
        if lowest is None:
            continue
        if rule.thresholds.below:
            if value <= lowest / resolve_ratio:
                clear = False
        elif value >= lowest * resolve_ratio:
            clear = False
    return Verdict(severity, clear and severity is None, breached)


class AlertManager:
    """Turns conditions into transitions; ``book`` is its state (fold the topic into it)."""

    def __init__(self, policy: AlertPolicy, book: AlertBook | None = None) -> None:
        self.policy = policy
        self.book = book if book is not None else AlertBook()
        self.cooldown_ms = int(policy.cooldown_s * 1000)
        self.heartbeat_ms = int(policy.heartbeat_s * 1000)
        self.renotify_ms = int(policy.renotify_s * 1000)

    def observe(self, cond: Condition) -> list[Transition]:
        key = cond.key
        held = self.book.alerts.get(key)
        at = cond.at_ms
        if held is None or not held.firing:
            alert = AlertState(
                key=key,
                kind=cond.kind,
                severity=cond.severity,
                state="firing",
                model=cond.model,
                version=cond.version,
                subject=dict(cond.subject),
                summary=cond.summary,
                evidence=dict(cond.evidence),
                first_seen=at,
                last_seen=at,
                count=1,
                explicit_clear=cond.explicit_clear,
                last_written=at,
                last_notified=at,
            )
            if cond.explicit_clear:
                alert.evidence["resolves"] = "on_clear"
            if held is not None and held.first_seen >= at:
                alert.first_seen = held.first_seen + 1  # a newer episode, even on equal times
            if cond.partition is not None:
                alert.evidence["partitions"] = str(cond.partition)
            self.book.alerts[key] = alert
            return [Transition("opened", alert.to_record())]
        held.count += 1
        held.last_seen = max(held.last_seen, at)
        held.clear_since = None
        partitions = _merge_partitions(held.evidence.get("partitions"), cond.partition)
        held.evidence.update(cond.evidence)
        if cond.explicit_clear:
            held.evidence["resolves"] = "on_clear"
        if partitions:
            held.evidence["partitions"] = partitions
        if severity_rank(cond.severity) > severity_rank(held.severity):
            held.severity = cond.severity
            held.summary = cond.summary
            held.last_written = at
            held.last_notified = at
            return [Transition("escalated", held.to_record())]
        if self.renotify_ms and at - held.last_notified >= self.renotify_ms:
            held.last_written = at
            held.last_notified = at
            return [Transition("renotify", held.to_record())]
        if at - held.last_written >= self.heartbeat_ms:
            held.last_written = at
            return [Transition("updated", held.to_record())]
        return []

    def clear(self, key: str, at_ms: int) -> list[Transition]:
        """A windowed statistic was evaluated here and is below its resolve level."""
        held = self.book.alerts.get(key)
        if held is None or not held.firing:
            return []
        if held.clear_since is None:
            held.clear_since = at_ms
        return self._maybe_resolve(held, at_ms)

    def sweep(self, clocks: dict[str, int]) -> list[Transition]:
        """Resolve what has been quiet for the cooldown, each alert against its own clock."""
        out: list[Transition] = []
        for alert in list(self.book.alerts.values()):
            if not alert.firing:
                continue
            now = clocks.get(time_domain(alert.key.split("/", 2)[-1]))
            if now is not None:
                out.extend(self._maybe_resolve(alert, now))
        return out

    def _maybe_resolve(self, alert: AlertState, now: int) -> list[Transition]:
        if alert.explicit_clear and alert.clear_since is None:
            return []
        # last_seen may come from a sibling monitor (folded from the topic) and be newer
        # than the moment this process last saw the condition clear
        quiet_since = max(alert.last_seen, alert.clear_since or 0)
        if now - quiet_since < self.cooldown_ms:
            return []
        alert.state = "resolved"
        alert.evidence["resolved_at"] = str(now)
        alert.last_written = now
        return [Transition("resolved", alert.to_record())]

    def fold(self, records: Iterable[dict[str, Any]]) -> int:
        return sum(1 for r in records if self.book.apply_record(r))


def _merge_partitions(held: str | None, partition: int | None) -> str | None:
    if partition is None:
        return held
    seen = {int(p) for p in held.split(",") if p} if held else set()
    seen.add(partition)
    return ",".join(str(p) for p in sorted(seen)[:MAX_PARTITIONS_SHOWN])
