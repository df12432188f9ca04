"""Sinks against a local HTTP server: Slack and PagerDuty payloads, retries, a bounded queue."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.common.policies.monitor import AlertPolicy, SinkPolicy
from services.monitor.alerts import AlertManager, Condition, Transition
from services.monitor.sinks import PagerDutySink, SinkHub, SlackSink, WebhookSink

FAST = SinkPolicy(backoff_initial_s=0.01, backoff_max_s=0.05, max_attempts=4, timeout_s=2)


class Receiver:
    """An HTTP server on 127.0.0.1 in a thread; ``fail[path]`` answers that many 503s first."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.fail: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.delay_s = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(receiver.delay_s)
                if receiver.fail.get(self.path, 0) > 0:
                    receiver.fail[self.path] -= 1
                    code = 503
                else:
                    receiver.received.append((self.path, body))
                    code = receiver.status.get(self.path, 200)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def paths(self) -> list[str]:
        return [p for p, _ in self.received]

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [b for p, b in self.received if p == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def condition(at: int, severity: str = "critical") -> Condition:
    return Condition(
        model="credit",
        version="1.2.0",
        signal="reference_drift.salary",
        kind="drift",
        severity=severity,  # type: ignore[arg-type]
        summary="credit 1.2.0: salary drifted from the training reference (psi 0.31 >= 0.25)",
        at_ms=at,
        subject={"model": "credit", "version": "1.2.0", "feature": "salary", "segment": "all"},
        evidence={
            "psi": "0.31",
            "threshold": "0.25",
            "window": "last 5000 predictions",
            "sample": "5000",
        },
        explicit_clear=True,
    )


def hub_for(receiver: Receiver, policy: SinkPolicy = FAST) -> SinkHub:
    return SinkHub(
        [
            SlackSink(f"{receiver.url}/slack", "warning"),
            PagerDutySink("R0UT1NGKEY", f"{receiver.url}/pagerduty", "critical"),
            WebhookSink(f"{receiver.url}/hook", "info"),
        ],
        policy,
    )


async def test_a_condition_repeated_inside_the_cooldown_pages_once_then_resolves(
    receiver: Receiver,
) -> None:
    manager = AlertManager(AlertPolicy(cooldown_s=600, heartbeat_s=60))
    hub = hub_for(receiver)
    await hub.start()
    try:
        for i in range(50):  # every 10 s for ~8 minutes: one condition, noisy
            for t in manager.observe(condition(1_767_225_600_000 + i * 10_000)):
                hub.submit(t)
        assert await hub.drain(10)
        assert sorted(receiver.paths()) == ["/hook", "/pagerduty", "/slack"]

        (trigger,) = receiver.bodies("/pagerduty")
        assert trigger["routing_key"] == "R0UT1NGKEY" and trigger["event_action"] == "trigger"
        assert trigger["dedup_key"] == "credit/1.2.0/reference_drift.salary"
        payload = trigger["payload"]
        assert payload["severity"] == "critical" and payload["source"] == "scoremesh/credit"
        assert payload["summary"].startswith("credit 1.2.0: salary drifted")
        assert payload["timestamp"].endswith("Z") and payload["class"] == "drift"
        assert payload["custom_details"]["evidence"]["psi"] == "0.31"

        (slack,) = receiver.bodies("/slack")
        assert "CRITICAL" in slack["text"] and "salary drifted" in slack["text"]
        assert [b["type"] for b in slack["blocks"]] == ["header", "section", "section", "section"]
        assert any("psi: 0.31" in b.get("text", {}).get("text", "") for b in slack["blocks"])

        (hook,) = receiver.bodies("/hook")
        assert hook["event"] == "opened" and hook["alert"]["alert_key"] == trigger["dedup_key"]

        key = trigger["dedup_key"]
        end = 1_767_225_600_000 + 49 * 10_000
        for t in manager.clear(key, end + 60_000) + manager.clear(key, end + 661_000):
            hub.submit(t)
        assert await hub.drain(10)
    finally:
        await hub.stop()
    resolve = receiver.bodies("/pagerduty")[-1]
    assert resolve == {"routing_key": "R0UT1NGKEY", "event_action": "resolve", "dedup_key": key}
    assert "RESOLVED" in receiver.bodies("/slack")[-1]["text"]
    assert receiver.bodies("/hook")[-1]["alert"]["state"] == "resolved"
    assert len(receiver.received) == 6


async def test_server_errors_are_retried_with_backoff(receiver: Receiver) -> None:
    receiver.fail["/slack"] = 2
    hub = SinkHub([SlackSink(f"{receiver.url}/slack")], FAST)
    await hub.start()
    try:
        started = time.monotonic()
        hub.submit(
            Transition("opened", AlertManager(AlertPolicy()).observe(condition(0))[0].record)
        )
        assert await hub.drain(10)
    finally:
        await hub.stop()
    assert receiver.paths() == ["/slack"] and receiver.fail["/slack"] == 0
    assert time.monotonic() - started >= 0.01  # it waited between attempts
    assert hub.delivered == {"slack:sent": 1}


async def test_a_refusal_is_not_retried_and_a_dead_endpoint_gives_up(receiver: Receiver) -> None:
    receiver.status["/hook"] = 400
    hub = SinkHub(
        [WebhookSink(f"{receiver.url}/hook"), WebhookSink("http://127.0.0.1:9/nothing-here")], FAST
    )
    await hub.start()
    try:
        hub.submit(AlertManager(AlertPolicy()).observe(condition(0))[0])
        assert await hub.drain(10)
    finally:
        await hub.stop()
    assert receiver.paths() == ["/hook"]
    assert hub.delivered == {"webhook:refused": 1, "webhook:failed": 1}


async def test_a_full_queue_drops_the_oldest_and_counts_it(receiver: Receiver) -> None:
    receiver.delay_s = 0.5
    hub = SinkHub([WebhookSink(f"{receiver.url}/hook")], SinkPolicy(queue_size=3))
    before = (
        REGISTRY.get_sample_value(
            "scoremesh_alert_notifications_dropped_total", {"sink": "webhook"}
        )
        or 0.0
    )
    manager = AlertManager(AlertPolicy())
    transitions = [
        manager.observe(condition(0).__class__(**{**condition(0).__dict__, "signal": f"s{i}"}))[0]
        for i in range(10)
    ]
    await hub.start()
    try:
        started = time.perf_counter()
        for t in transitions:
            hub.submit(t)
        assert time.perf_counter() - started < 0.05  # never waits for the network
        assert await hub.drain(10)
    finally:
        await hub.stop()
    dropped = REGISTRY.get_sample_value(
        "scoremesh_alert_notifications_dropped_total", {"sink": "webhook"}
    )
    assert dropped is not None and dropped - before >= 6
    keys = [b["alert"]["alert_key"].rsplit("/", 1)[1] for b in receiver.bodies("/hook")]
    assert keys[-3:] == ["s7", "s8", "s9"]  # the newest survive


async def test_a_gate_lets_only_one_process_notify(receiver: Receiver) -> None:
    claimed: set[str] = set()

    async def gate(t: Transition) -> bool:  # what AlertStore.claim does with SET NX
        token = f"{t.key}:{t.event}"
        if token in claimed:
            return False
        claimed.add(token)
        return True

    hubs = [SinkHub([WebhookSink(f"{receiver.url}/hook")], FAST, gate=gate) for _ in range(2)]
    for hub in hubs:
        await hub.start()
    try:
        for hub in hubs:  # two monitor processes open the same alert
            hub.submit(AlertManager(AlertPolicy()).observe(condition(0))[0])
        for hub in hubs:
            assert await hub.drain(10)
    finally:
        for hub in hubs:
            await hub.stop()
    assert receiver.paths() == ["/hook"]
