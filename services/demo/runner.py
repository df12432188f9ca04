"""`scoremesh demo`: the loop on the embedded stack, accounted event by event.

Starts the stack (unless one is configured), the registry, validator, scorer and query
service as real processes (the console's address is printed while it runs), bootstraps a
champion, produces events (some deliberately invalid, as Avro and as JSON), then waits
until every event is accounted for: produced = valid + rejected and valid = scored. Exit
code 0 only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from scoremesh.contract.codec import codec, decode_any
from services.common.devstack import DevStack, StackState, free_port
from services.common.kafka import (
    assign_all,
    ensure_topics,
    make_consumer,
    make_producer,
    start_with_retry,
)
from services.common.settings import Settings, default_home
from services.demo.picture import Picture, render
from services.demo.story import Observer, markers, story, stream_with_labels
from services.trainer.bootstrap import bootstrap
from services.trainer.datasets import credit_events

DEMO_SERVICES = ("registry", "validator", "scorer", "query")
DEMO_SEED = 2026


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class DemoOptions:
    events: int = 20_000
    invalid_share: float = 0.03
    keep_stack: bool = False
    output: str = "demo-output"
    timeout_s: float = 300.0
    quiet: bool = False
    closed_loop: bool = True
    drift_at: int | None = None  # default: half of ``events``
    after_promotion: int = 3_000
    max_events: int | None = None  # default: 3 x ``events``
    rate: float = 800.0
    label_delay_mean: float = 200.0
    label_missing_share: float = 0.05

    @property
    def drift_index(self) -> int:
        return self.drift_at if self.drift_at is not None else self.events // 2

    @property
    def max_index(self) -> int:
        return self.max_events if self.max_events is not None else 3 * self.events


LOOP_SERVICES = ("label-join", "monitor", "retrain-trigger", "trainer")
# The story's clock: one event per second of event time, so windows are short enough to
# judge a challenger within a few thousand events.
LOOP_SETTINGS: dict[str, Any] = {
    "label_join_tumbling_s": 300,
    "label_join_sliding_s": 1800,
    "label_join_grace_s": 600,
    "label_join_publish_interval_s": 1.0,
    "retrain_policy": {
        "min_new_labels": 0,
        "min_interval_s": 300,
        "train_from_change": True,
        "min_labels_after_change": 1500,
    },
    "promotion_policy": {"min_labels": 300, "canary_percent": 30, "max_labels": 8000},
}


class Progress:
    """A progress line: redrawn in place on a terminal, a line per step otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.tty = sys.stdout.isatty()
        self.quiet = quiet
        self._last = 0.0

    def say(self, text: str) -> None:
        if not self.quiet:
            print(("\r\033[K" if self.tty else "") + text, flush=True)

    def bar(self, label: str, done: int, total: int, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self._last < (0.1 if self.tty else 2.0):
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        line = f"{label:<10} [{'#' * filled}{'.' * (width - filled)}] {done:>7}/{total}"
        if self.tty:
            print("\r\033[K" + line, end="", flush=True)
        else:
            print(line, flush=True)

    def end(self) -> None:
        if self.tty and not self.quiet:
            print(flush=True)


# --- invalid inputs, each with the reason the validator must give ----------------------


def invalid_value(kind: str, event: dict[str, Any]) -> bytes:
    if kind == "garbage":
        return os.urandom(48)
    if kind == "string_for_number":
        return orjson.dumps({**event, "features": {**event["features"], "salary": "a lot"}})
    if kind == "not_finite":
        return codec("Event").encode({**event, "features": {**event["features"], "loan": math.nan}})
    if kind == "missing_feature":
        features = {k: v for k, v in event["features"].items() if k != "age"}
        return orjson.dumps({**event, "features": features})
    if kind == "out_of_range":
        return orjson.dumps({**event, "features": {**event["features"], "age": 250}})
    if kind == "unknown_category":
        return orjson.dumps({**event, "features": {**event["features"], "zipcode": 42}})
    if kind == "too_large":
        return orjson.dumps({**event, "attributes": {"note": "x" * 100_000}})
    if kind == "missing_event_id":
        return orjson.dumps({k: v for k, v in event.items() if k != "event_id"})
    if kind == "truncated":
        return codec("Event").encode(event)[:-7]
    raise ValueError(kind)


EXPECTED_REASON = {
    "garbage": "undecodable",
    "string_for_number": "wrong_type",
    "not_finite": "not_finite",
    "missing_feature": "missing_feature",
    "out_of_range": "out_of_range",
    "unknown_category": "unknown_category",
    "too_large": "too_large",
    "missing_event_id": "invalid_envelope",
    "truncated": "truncated",
}
INVALID_KINDS = tuple(EXPECTED_REASON)


@dataclass
class Produced:
    total: int
    valid_expected: int
    by_kind: Counter[str]
    started: float
    finished: float


async def produce_events(
    settings: Settings, n: int, invalid_share: float, progress: Progress, seed: int = DEMO_SEED
) -> Produced:
    producer = make_producer(settings, max_request_size=8 * 1024 * 1024)
    await start_with_retry(producer.start, "demo-producer", settings)
    topic = settings.topic("events.raw")
    event_codec = codec("Event")
    rng = np.random.default_rng(seed)
    by_kind: Counter[str] = Counter()
    futures = []
    started = time.time()
    try:
        for i, (event, _label) in enumerate(credit_events(n, seed=seed)):
            if rng.random() < invalid_share:
                kind = INVALID_KINDS[int(rng.integers(len(INVALID_KINDS)))]
                value = invalid_value(kind, event)
            else:
                kind = "valid"
                value = event_codec.encode(event) if i % 3 else orjson.dumps(event)
            by_kind[kind] += 1
            futures.append(await producer.send(topic, value, key=event["entity_id"].encode()))
            if len(futures) >= 2000:
                await asyncio.gather(*futures)
                futures.clear()
            progress.bar("produce", i + 1, n)
        await asyncio.gather(*futures)
        progress.bar("produce", n, n, force=True)
        progress.end()
    finally:
        await producer.stop()
    return Produced(n, by_kind["valid"], by_kind, started, time.time())


@dataclass
class Accounting:
    valid: set[str]
    rejected: dict[tuple[int, int], dict[str, Any]]
    scored: dict[str, str]  # event_id -> model version (champion variant)
    duplicates: Counter[str]
    latencies_ms: list[float]
    last_prediction_ts: float

    @property
    def rejected_by_reason(self) -> Counter[str]:
        return Counter(r["reasons"][0]["code"] for r in self.rejected.values())


async def account(
    settings: Settings,
    produced: Produced,
    progress: Progress,
    timeout_s: float,
    procs: dict[str, subprocess.Popen[bytes]] | None = None,
) -> Accounting:
    consumer = make_consumer(settings, group_id=None, max_poll_records=5000)
    await start_with_retry(consumer.start, "demo-accounting", settings)
    acc = Accounting(set(), {}, {}, Counter(), [], 0.0)
    raw_ts: dict[str, float] = {}
    try:
        tps: list[Any] = []
        for name in ("events.valid", "events.rejected", "predictions"):
            tps += await _assign_more(consumer, settings.topic(name), tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                name = tp.topic[len(settings.topic_prefix) :]
                for record in records:
                    value = decode_any(name, record.value or b"")
                    if name == "events.valid":
                        if value["event_id"] in acc.valid:
                            acc.duplicates["events.valid"] += 1
                        acc.valid.add(value["event_id"])
                        raw_ts[value["event_id"]] = record.timestamp
                    elif name == "events.rejected":
                        acc.rejected[(value["source_partition"], value["source_offset"])] = value
                    elif value["variant"] == "champion":
                        if value["event_id"] in acc.scored:
                            acc.duplicates["predictions"] += 1
                        acc.scored[value["event_id"]] = value["model_version"]
                        acc.latencies_ms.append(value["latency_ms"])
                        acc.last_prediction_ts = max(
                            acc.last_prediction_ts, record.timestamp / 1000
                        )
            if procs is not None and any(p.poll() is not None for p in procs.values()):
                break
            settled = len(acc.valid) + len(acc.rejected)
            progress.bar("score", len(acc.scored), produced.valid_expected)
            if settled >= produced.total and len(acc.scored) >= len(acc.valid):
                break
        progress.bar("score", len(acc.scored), produced.valid_expected, force=True)
        progress.end()
    finally:
        await consumer.stop()
    return acc


async def _assign_more(consumer: Any, topic: str, held: list[Any]) -> list[Any]:
    tps = await assign_all(consumer, topic)
    consumer.assign(held + tps)
    await consumer.seek_to_beginning(*(held + tps))
    return tps


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def start_services(
    settings: Settings, env_overrides: dict[str, Any], logs: Path, names: tuple[str, ...]
) -> dict[str, subprocess.Popen[bytes]]:
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key, value in env_overrides.items():
        env[f"SCOREMESH_{key.upper()}"] = _env_value(value)
    env["SCOREMESH_METRICS_PORT"] = "0"
    procs = {}
    for name in names:
        with (logs / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "run", name],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
    return procs


def stop_services(
    procs: dict[str, subprocess.Popen[bytes]], deadline_s: float = 25.0
) -> dict[str, int | None]:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(deadline_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = proc.wait()
    return codes


def console_url(settings: Settings) -> str:
    return f"http://{settings.api.host}:{settings.api.port}/console"


def run_demo(settings: Settings, options: DemoOptions) -> int:
    progress = Progress(options.quiet)
    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    stack: DevStack | None = None
    state: StackState | None = None
    started_stack = False
    if not settings.kafka_bootstrap or not settings.redis_url:
        stack = DevStack(default_home(), settings)
        progress.say("starting the embedded stack (tansu broker + Redis) ...")
        state, started_stack = stack.up()
        overrides = state.settings_overrides()
    else:
        overrides = {"kafka_bootstrap": settings.kafka_bootstrap, "redis_url": settings.redis_url}
    prefix = settings.topic_prefix or f"demo-{int(time.time())}."
    overrides["topic_prefix"] = prefix
    overrides["artifact_dir"] = str(out / "artifacts")
    # The query service (and its console) on a free local port, so a second demo or a
    # running `scoremesh run query` never collides with it.
    overrides["api_host"] = "127.0.0.1"
    overrides["api_port"] = free_port()
    if options.closed_loop:
        overrides.update(LOOP_SETTINGS)
    demo_settings = Settings(**{**settings.model_dump(exclude_none=True), **overrides})
    progress.say(
        f"Kafka {demo_settings.kafka_bootstrap}, Redis {demo_settings.redis_url}, "
        f"topics prefixed {prefix!r}"
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        asyncio.run(ensure_topics(demo_settings))
        names = DEMO_SERVICES + (LOOP_SERVICES if options.closed_loop else ())
        procs = start_services(demo_settings, overrides, out / "logs", names)
        progress.say("started: " + ", ".join(f"{n} (pid {p.pid})" for n, p in procs.items()))
        progress.say(
            f"console: {console_url(demo_settings)}  (live while the demo runs; "
            "read-only unless SCOREMESH_API_TOKEN is set)"
        )
        report = asyncio.run(_loop(demo_settings, options, progress, procs))
    finally:
        codes = stop_services(procs) if procs else {}
        if stack is not None and started_stack and not options.keep_stack:
            stack.down()
    report["service_exit_codes"] = codes
    (out / "report.json").write_text(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    print_report(report, out)
    return 0 if report["accounted"] and report.get("loop_closed", True) else 1


async def _loop(
    settings: Settings,
    options: DemoOptions,
    progress: Progress,
    procs: dict[str, subprocess.Popen[bytes]],
) -> dict[str, Any]:
    await asyncio.sleep(0.5)
    dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
    if dead:
        raise DemoError(f"services exited at start: {dead}; see their logs")
    progress.say("training credit@1.0.0 on River's Agrawal generator and registering it ...")
    result = await bootstrap(settings, actor="demo")
    progress.say(result.message + (f"  holdout {_fmt(result.metrics)}" if result.metrics else ""))
    observer = Observer(settings)
    stop_observer = asyncio.Event()
    following = asyncio.create_task(observer.follow(stop_observer))
    try:
        if options.closed_loop:
            progress.say(
                f"streaming at {options.rate:.0f} events/s; labels arrive ~{options.label_delay_mean:.0f} "
                f"events late ({options.label_missing_share:.0%} never); the concept changes at event "
                f"{options.drift_index}; the stream goes on until a retrained version is promoted"
            )
            stream_stats = await stream_with_labels(
                settings,
                observer,
                seed=DEMO_SEED,
                minimum=options.events,
                drift_at=options.drift_index,
                after_promotion=options.after_promotion,
                maximum=options.max_index,
                rate=options.rate,
                invalid_share=options.invalid_share,
                label_delay_mean=options.label_delay_mean,
                label_missing_share=options.label_missing_share,
                closed_loop=True,
                invalid_value=invalid_value,
                invalid_kinds=INVALID_KINDS,
                progress=progress,
            )
            by_kind: Counter[str] = Counter(stream_stats.by_kind)
            produced = Produced(
                stream_stats.produced,
                by_kind["valid"],
                by_kind,
                stream_stats.started,
                stream_stats.finished,
            )
        else:
            produced = await produce_events(
                settings, options.events, options.invalid_share, progress
            )
        progress.say(
            f"produced {produced.total} events in {produced.finished - produced.started:.1f}s "
            f"({produced.total - produced.valid_expected} deliberately invalid)"
        )
        acc = await account(settings, produced, progress, options.timeout_s, procs)
        if options.closed_loop:
            await _settle(observer)
    finally:
        stop_observer.set()
        await following
    dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
    settled = len(acc.valid) + len(acc.rejected)
    unscored = acc.valid - set(acc.scored)
    wrong = {
        kind: n
        for kind, n in produced.by_kind.items()
        if kind != "valid" and acc.rejected_by_reason[EXPECTED_REASON[kind]] < n
    }
    elapsed = max(acc.last_prediction_ts - produced.started, 1e-9)
    lat = np.array(acc.latencies_ms) if acc.latencies_ms else np.zeros(1)
    report: dict[str, Any] = {
        "accounted": settled == produced.total and not unscored and not dead and not wrong,
        "produced": produced.total,
        "produced_by_kind": dict(produced.by_kind),
        "valid": len(acc.valid),
        "rejected": len(acc.rejected),
        "rejected_by_reason": dict(acc.rejected_by_reason),
        "scored": len(acc.scored),
        "unscored": len(unscored),
        "duplicates": dict(acc.duplicates),
        "model_versions": dict(Counter(acc.scored.values())),
        "throughput_events_per_s": round(produced.total / elapsed, 1),
        "scoring_latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
        },
        "services_died": dead,
        "holdout_metrics": result.metrics,
        "topic_prefix": settings.topic_prefix,
        "kafka_bootstrap": settings.kafka_bootstrap,
    }
    if options.closed_loop:
        told = story(observer, options.drift_index, produced.total)
        report["story"] = told
        report["loop_closed"] = observer.promoted_version is not None
        picture = Picture(
            title=f"scoremesh demo: {settings.model_name}, drift injected at event {options.drift_index}",
            series=observer.rolling(),
            markers=markers(observer, options.drift_index),
            signals=[
                {
                    "index": observer.index_of(a["first_seen"]),
                    "signal": a["alert_key"],
                    "severity": a["severity"],
                }
                for a in observer.alerts
                if a["state"] == "firing"
            ],
            notes=told["deployment_history"],
        )
        path = Path(options.output) / "demo.html"
        path.write_text(render(picture))
        report["picture"] = str(path)
    return report


async def _settle(observer: Observer, quiet_s: float = 3.0, limit_s: float = 30.0) -> None:
    """Wait until labelled predictions stop arriving (labels trail the stream)."""
    deadline = time.monotonic() + limit_s
    last = -1
    while time.monotonic() < deadline:
        count = sum(len(v) for v in observer.correct.values())
        if count == last:
            return
        last = count
        await asyncio.sleep(quiet_s)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def _accuracy(part: dict[str, Any] | None) -> str:
    if not part or part["accuracy"] is None:
        return "n/a"
    return f"{part['accuracy']:.3f} ({part['version']}, {part['labels']} labels)"


def _print_story(report: dict[str, Any], told: dict[str, Any]) -> None:
    print("\nthe closed loop")
    print("---------------")
    print(f"drift injected at event   {told['drift_injected_at']}")
    print(f"accuracy before drift     {_accuracy(told['accuracy_before_drift'])}")
    print(f"accuracy after drift      {_accuracy(told['accuracy_after_drift'])}")
    if told.get("accuracy_after_promotion"):
        print(f"accuracy after promotion  {_accuracy(told['accuracy_after_promotion'])}")
    if told.get("old_champion_on_same_events"):
        print(f"  (old champion, same events: {_accuracy(told['old_champion_on_same_events'])})")
    det = told.get("detection")
    print(
        "drift detected            "
        + (
            f"at event {det['index']}, {det['delay_events']} events after the change ({det['alert_key']})"
            if det
            else "not detected"
        )
    )
    for r in told["retrain_requests"]:
        print(f"retrain requested         at event {r['seen_at_index']}: {r['reason'][:80]}")
        print(
            f"                          training window: events {r['window'][0]}-{r['window'][1]}"
        )
    for r in told["retrain_results"]:
        line = f"retrain {r['status']:<17} {r['detail'][:80]}"
        if r["candidate_accuracy"] is not None:
            line += (
                f"; recent window accuracy {r['candidate_accuracy']:.3f} vs champion "
                f"{r['champion_accuracy']:.3f}"
            )
        print(line)
    print("deployment history:")
    for line in told["deployment_history"]:
        print(f"  {line[:150]}")
    if report.get("picture"):
        print(f"picture: {report['picture']}")
    if not report.get("loop_closed"):
        print("the loop did NOT close: no retrained version was promoted (see the service logs)")


def print_report(report: dict[str, Any], out: Path) -> None:
    print()
    print("scoremesh demo report")
    print("=====================")
    print(f"produced   {report['produced']:>8}")
    print(f"valid      {report['valid']:>8}")
    print(f"rejected   {report['rejected']:>8}")
    for reason, n in sorted(report["rejected_by_reason"].items()):
        print(f"  {reason:<20} {n:>6}")
    print(
        f"scored     {report['scored']:>8}   by "
        + ", ".join(f"{v} ({n})" for v, n in report["model_versions"].items())
    )
    print(
        f"throughput {report['throughput_events_per_s']:>8} events/s (produce to last prediction)"
    )
    print(
        f"scoring latency p50 {report['scoring_latency_ms']['p50']} ms, "
        f"p99 {report['scoring_latency_ms']['p99']} ms (consume to prediction)"
    )
    if report["duplicates"]:
        print(f"duplicates (at-least-once, deduplicated above): {report['duplicates']}")
    if report["services_died"]:
        print(f"services that died: {report['services_died']} (see {out / 'logs'})")
    told = report.get("story")
    if told:
        _print_story(report, told)
    verdict = (
        "every event accounted for" if report["accounted"] else "NOT every event accounted for"
    )
    print(f"\n{verdict}: produced = valid + rejected, valid = scored")
    print("\nwhere to look next:")
    print(f"  {out / 'report.json'}     this report as JSON")
    print(f"  {out / 'logs'}/           structured JSON logs of each service")
    print("  README.md, Quick start    the same loop by hand, one command at a time")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
