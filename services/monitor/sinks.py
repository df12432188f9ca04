"""Where alerts go: the log, a generic webhook, Slack, PagerDuty. Never blocking the stream.

``SinkHub.submit`` is synchronous and O(1): each sink has a bounded queue (oldest dropped
and counted when full) drained by its own background task, which retries with
exponential backoff and jitter on connection errors, 429 and 5xx (honouring
``Retry-After``), and gives up on other 4xx, saying why. An optional ``gate`` (Redis in the
service) lets one monitor process out of several send a given notification.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from scoremesh.client.retry import Backoff
from services.common.policies.monitor import SinkPolicy, severity_rank
from services.monitor import metrics as m
from services.monitor.alerts import Transition

log = logging.getLogger(__name__)

Gate = Callable[[Transition], Awaitable[bool]]


@dataclass(frozen=True)
class Request:
    url: str
    body: dict[str, Any]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


class Sink:
    """One destination. ``render`` builds the HTTP request; None means nothing to send."""

    name = "sink"

    def __init__(self, min_severity: str = "info") -> None:
        self.min_severity = min_severity

    def wants(self, transition: Transition) -> bool:
        return severity_rank(transition.record["severity"]) >= severity_rank(self.min_severity)

    def render(self, transition: Transition) -> Request | None:
        raise NotImplementedError


class LogSink(Sink):
    """Structured log lines; no network, so it runs inline."""

    name = "log"

    def emit(self, transition: Transition) -> None:
        record = transition.record
        level = {"critical": logging.ERROR, "warning": logging.WARNING}.get(
            record["severity"], logging.INFO
        )
        if transition.event == "resolved":
            level = logging.INFO
        log.log(
            level,
            f"alert {transition.event}: {record['summary']}",
            extra={
                "alert_key": record["alert_key"],
                "alert_event": transition.event,
                "severity": record["severity"],
                "alert_state": record["state"],
                "count": record["count"],
                "evidence": record["evidence"],
            },
        )

    def render(self, transition: Transition) -> Request | None:
        return None


class WebhookSink(Sink):
    """A generic JSON POST: ``{"version": 1, "event": ..., "alert": <Alert record>}``."""

    name = "webhook"

    def __init__(self, url: str, min_severity: str = "info") -> None:
        super().__init__(min_severity)
        self.url = url

    def render(self, transition: Transition) -> Request | None:
        return Request(
            self.url, {"version": 1, "event": transition.event, "alert": transition.record}
        )


class SlackSink(Sink):
    """Slack incoming-webhook JSON: a fallback ``text`` and Block Kit ``blocks``."""

    name = "slack"
    ICONS = {
        "critical": ":red_circle:",
        "warning": ":large_orange_circle:",
        "info": ":white_circle:",
    }

    def __init__(self, url: str, min_severity: str = "warning") -> None:
        super().__init__(min_severity)
        self.url = url

    def render(self, transition: Transition) -> Request | None:
        a = transition.record
        resolved = transition.event == "resolved"
        icon = ":white_check_mark:" if resolved else self.ICONS.get(a["severity"], "")
        title = f"{icon} [{a['severity'].upper()}] {transition.event.upper()}: {a['alert_key']}"
        evidence = "\n".join(f"• {k}: {v}" for k, v in sorted(a["evidence"].items())[:20])
        return Request(
            self.url,
            {
                "text": f"{title}: {a['summary']}",
                "blocks": [
                    {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
                    {"type": "section", "text": {"type": "mrkdwn", "text": a["summary"][:3000]}},
                    {
                        "type": "section",
                        "fields": [
                            {"type": "mrkdwn", "text": f"*Model*\n{a['model']}"},
                            {"type": "mrkdwn", "text": f"*Version*\n{a['model_version'] or '-'}"},
                            {"type": "mrkdwn", "text": f"*Kind*\n{a['kind']}"},
                            {"type": "mrkdwn", "text": f"*Count*\n{a['count']}"},
                            {"type": "mrkdwn", "text": f"*First seen*\n{_iso(a['first_seen'])}"},
                            {"type": "mrkdwn", "text": f"*Last seen*\n{_iso(a['last_seen'])}"},
                        ],
                    },
                    {
                        "type": "section",
                        "text": {"type": "mrkdwn", "text": f"*Evidence*\n{evidence}"[:3000]},
                    },
                ],
            },
        )


class PagerDutySink(Sink):
    """PagerDuty Events API v2: trigger and resolve with ``dedup_key`` = the alert key."""

    name = "pagerduty"
    SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}

    def __init__(self, routing_key: str, url: str, min_severity: str = "critical") -> None:
        super().__init__(min_severity)
        self.routing_key = routing_key
        self.url = url

    def render(self, transition: Transition) -> Request | None:
        a = transition.record
        if transition.event == "resolved":
            return Request(
                self.url,
                {
                    "routing_key": self.routing_key,
                    "event_action": "resolve",
                    "dedup_key": a["alert_key"],
                },
            )
        return Request(
            self.url,
            {
                "routing_key": self.routing_key,
                "event_action": "trigger",
                "dedup_key": a["alert_key"],
                "client": "scoremesh monitor",
                "payload": {
                    "summary": a["summary"][:1024],
                    "source": f"scoremesh/{a['model']}",
                    "severity": self.SEVERITY.get(a["severity"], "warning"),
                    "timestamp": _iso(a["last_seen"]),
                    "component": a["model"],
                    "group": f"{a['model']}@{a['model_version'] or '-'}",
                    "class": a["kind"],
                    "custom_details": {
                        "event": transition.event,
                        "subject": a["subject"],
                        "evidence": a["evidence"],
                        "first_seen": _iso(a["first_seen"]),
                        "count": a["count"],
                    },
                },
            },
        )


def sinks_from_policy(policy: SinkPolicy) -> list[Sink]:
    levels = policy.min_severity
    sinks: list[Sink] = [LogSink(levels.get("log", "info"))]
    if policy.webhook_url:
        sinks.append(WebhookSink(policy.webhook_url, levels.get("webhook", "info")))
    if policy.slack_webhook_url is not None:
        sinks.append(
            SlackSink(policy.slack_webhook_url.get_secret_value(), levels.get("slack", "warning"))
        )
    if policy.pagerduty_routing_key is not None:
        sinks.append(
            PagerDutySink(
                policy.pagerduty_routing_key.get_secret_value(),
                policy.pagerduty_url,
                levels.get("pagerduty", "critical"),
            )
        )
    return sinks


class _Outbox:
    """A sink's bounded queue and the task that drains it."""

    def __init__(self, sink: Sink, size: int) -> None:
        self.sink = sink
        self.queue: collections.deque[Transition] = collections.deque()
        self.size = size
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.busy = False

    def put(self, transition: Transition) -> None:
        if len(self.queue) >= self.size:
            self.queue.popleft()
            m.SINK_DROPPED.labels(self.sink.name).inc()
        self.queue.append(transition)
        m.SINK_QUEUE.labels(self.sink.name).set(len(self.queue))
        self.wake.set()


class SinkHub:
    def __init__(
        self,
        sinks: Sequence[Sink],
        policy: SinkPolicy,
        gate: Gate | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.policy = policy
        self.gate = gate
        self.log_sinks = [s for s in sinks if isinstance(s, LogSink)]
        self._outboxes = [
            _Outbox(s, policy.queue_size) for s in sinks if not isinstance(s, LogSink)
        ]
        self._client = client
        self._own_client = client is None
        self.delivered: collections.Counter[str] = collections.Counter()
        self._progress = asyncio.Event()

    @property
    def sinks(self) -> list[Sink]:
        return [*self.log_sinks, *(o.sink for o in self._outboxes)]

    async def start(self) -> None:
        if self._client is None and self._outboxes:
            self._client = httpx.AsyncClient(timeout=self.policy.timeout_s)
        for box in self._outboxes:
            box.task = asyncio.create_task(self._drain(box), name=f"sink-{box.sink.name}")

    def submit(self, transition: Transition) -> None:
        """Hand a transition to every sink that wants it. Never waits."""
        if not transition.notify:
            return
        for sink in self.log_sinks:
            if sink.wants(transition):
                sink.emit(transition)
        for box in self._outboxes:
            if box.sink.wants(transition):
                box.put(transition)

    def pending(self) -> int:
        return sum(len(b.queue) + (1 if b.busy else 0) for b in self._outboxes)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queue is empty (or the timeout); True when all were sent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.pending() and loop.time() < deadline:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), deadline - loop.time())
        return self.pending() == 0

    async def stop(self, drain_timeout_s: float = 2.0) -> None:
        await self.drain(drain_timeout_s)
        for box in self._outboxes:
            if box.task is not None:
                box.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await box.task
        if self._client is not None and self._own_client:
            await self._client.aclose()

    async def _drain(self, box: _Outbox) -> None:
        while True:
            if not box.queue:
                box.wake.clear()
                await box.wake.wait()
                continue
            transition = box.queue.popleft()
            m.SINK_QUEUE.labels(box.sink.name).set(len(box.queue))
            box.busy = True
            try:
                if self.gate is not None and not await self.gate(transition):
                    m.SINK_DELIVERIES.labels(box.sink.name, "suppressed").inc()
                    continue
                request = box.sink.render(transition)
                if request is not None:
                    outcome = await self._deliver(box.sink.name, request)
                    m.SINK_DELIVERIES.labels(box.sink.name, outcome).inc()
                    self.delivered[f"{box.sink.name}:{outcome}"] += 1
            except Exception:  # a sink bug must never kill the drain task
                log.exception("alert sink failed", extra={"sink": box.sink.name})
                m.SINK_DELIVERIES.labels(box.sink.name, "error").inc()
            finally:
                box.busy = False
                self._progress.set()

    async def _deliver(self, sink: str, request: Request) -> str:
        assert self._client is not None, "start() first"
        policy = self.policy
        backoff = Backoff(policy.backoff_initial_s, policy.backoff_max_s, jitter=True)
        for attempt in range(1, policy.max_attempts + 1):
            retry_after: float | None = None
            try:
                response = await self._client.post(request.url, json=request.body)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    return "sent"
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code != 429 and response.status_code < 500:
                    log.error(
                        "alert sink refused the notification; not retrying",
                        extra={"sink": sink, "error": problem},
                    )
                    return "refused"
                with contextlib.suppress(ValueError):
                    retry_after = float(response.headers.get("retry-after", ""))
            if attempt == policy.max_attempts:
                log.error(
                    "alert sink unreachable; notification dropped",
                    extra={"sink": sink, "attempts": attempt, "error": problem},
                )
                return "failed"
            wait = backoff.next()  # the schedule moves on whatever the server asked for
            wait = min(retry_after if retry_after is not None else wait, policy.backoff_max_s)
            log.warning(
                "alert sink failed, retrying",
                extra={
                    "sink": sink,
                    "attempt": attempt,
                    "retry_in_s": round(wait, 2),
                    "error": problem,
                },
            )
            await asyncio.sleep(wait)
        return "failed"
