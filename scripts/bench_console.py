"""Console benchmark: how long the console's pages take with 100 versions and 10,000 alerts.

On the embedded stack (tansu + Redis, started here, in a private SCOREMESH_HOME):

1. one credit model is trained; 100 versions of it are registered through an in-process
   registry (one champion, shadows, a canary, retired ones), so deployments.log holds
   their whole history;
2. 10,000 alerts are written through the monitor's own Redis writer (9,000 firing,
   1,000 resolved), and monitoring.stats gets a full chart history: 10 versions x 4
   segments x 240 tumbling windows, and 240 drift evaluations of 10 versions;
3. ``scoremesh run query`` serves, as it ships; once its history has caught up, each page
   is fetched over HTTP in ``--rounds`` paired rounds, each right after its baseline: the
   JSON API route that reads the same data (``/v1/models/credit`` for model pages,
   ``/v1/alerts`` for alert pages), so machine noise hits both alike.

Reported per page: median, p95 and max wall time of a whole response, its size, and the
ratio of medians to its baseline. The target: every page under 1 s.

    python scripts/bench_console.py [--rounds 15] [--output bench-results/console.json]
"""

# ruff: noqa: E402 - SCOREMESH_HOME must be set before anything from services is imported

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BENCH_HOME = Path(tempfile.mkdtemp(prefix="scoremesh-bench-console-"))
os.environ["SCOREMESH_HOME"] = str(BENCH_HOME)

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.settings import Settings

VERSIONS = 100
ALERTS = 10_000
RESOLVED = 1_000
CHARTED_VERSIONS = 10
SEGMENTS = ("all", "channel=web", "channel=branch", "channel=partner")
WINDOWS = 240
TARGET_S = 1.0
TOKEN = "bench-console-token"

PAGES: dict[str, tuple[str, str]] = {
    # name: (console path, baseline path)
    "overview": ("/console", "/v1/models"),
    "model": ("/console/models/credit", "/v1/models/credit"),
    "model_signed_in": ("/console/models/credit", "/v1/models/credit"),
    "version": ("/console/models/credit/versions/1.0.0", "/v1/models/credit/versions/1.0.0"),
    "charts_json": ("/console/models/credit/charts.json", "/v1/models/credit"),
    "alerts_firing": ("/console/alerts", "/v1/alerts"),
    "alerts_all_filtered": (
        "/console/alerts?state=all&severity=warning&q=psi",
        "/v1/alerts?state=all",
    ),
}


def say(message: str) -> None:
    print(f"[bench_console] {message}", file=sys.stderr, flush=True)


def semver(i: int) -> str:
    return f"1.{i // 10}.{i % 10}"


async def register_versions(settings: Settings, onnx: bytes, metadata: Any) -> None:
    """100 versions through the registry, one producer for every command."""
    from services.common.artifacts import upload_artifact
    from services.common.commands import new_command, read_history, send_command, wait_for_outcome
    from services.common.kafka import make_producer, start_with_retry
    from services.common.model_version import VersionProposal
    from services.registry.service import RegistryService
    from services.trainer.datasets import CREDIT_SPEC

    registry = RegistryService(settings)
    await registry.start()
    stop = asyncio.Event()
    task = asyncio.create_task(registry.run(stop))
    producer = make_producer(settings)
    await start_with_retry(producer.start, "bench-console", settings)
    try:
        ref = await upload_artifact(producer, settings, onnx)
        commands = []
        for i in range(VERSIONS):
            proposal = VersionProposal(
                version=semver(i),
                artifact_uri=ref.uri,
                artifact_sha256=ref.sha256,
                artifact_size=ref.size,
                feature_spec=CREDIT_SPEC,
                metadata=metadata,
            )
            commands.append(
                new_command("credit", "register", "bench", proposal=proposal.model_dump_json())
            )
        stages = {semver(0): "champion", semver(1): "shadow", semver(2): "canary"}
        stages |= {semver(i): "retired" for i in range(3, 40)}
        for version, stage in stages.items():
            options = {"percent": "10"} if stage == "canary" else {}
            commands.append(
                new_command(
                    "credit",
                    "promote",
                    "bench",
                    version=version,
                    target_stage=stage,
                    options=options,
                    reason="bench",
                )
            )
        for cmd in commands:
            await send_command(settings, cmd, producer=producer)
        await wait_for_outcome(settings, commands[-1]["request_id"], timeout_s=300)
        history = await read_history(settings)
        refused = [e for e in history if e["outcome"] != "applied"]
        if refused:
            raise RuntimeError(f"the registry refused {len(refused)} commands: {refused[0]}")
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(task, 20)
        await registry.stop()


async def fill_alerts_and_stats(settings: Settings) -> int:
    from tests.console.factories import (
        alert_record,
        drift_record,
        performance_record,
        publish_stats,
        write_alerts,
    )

    now = int(time.time() * 1000)
    records = []
    for i in range(ALERTS):
        resolved = i >= ALERTS - RESOLVED  # written last: the monitor's recent list keeps them
        records.append(
            alert_record(
                f"psi.feature_{i}" if i % 3 else f"performance.accuracy.segment_{i}",
                version=semver(i % VERSIONS),
                state="resolved" if resolved else "firing",
                severity=("info", "warning", "critical")[i % 3],
                kind="drift" if i % 3 else "performance",
                at_ms=now - i * 1000,
            )
        )
    await write_alerts(settings, records, recent=RESOLVED)  # the monitor's default cap
    stats = [
        performance_record(semver(v), w, 0.8 + (w % 10) / 100, segment=s, emitted_at=now)
        for v in range(CHARTED_VERSIONS)
        for s in SEGMENTS
        for w in range(WINDOWS)
    ]
    stats += [
        drift_record(semver(v), e, 0.001 * e, emitted_at=now)
        for v in range(CHARTED_VERSIONS)
        for e in range(WINDOWS)
    ]
    for i in range(0, len(stats), 5000):
        await publish_stats(settings, stats[i : i + 5000])
    return len(stats)


def wait_for_history(client: httpx.Client, timeout_s: float = 180.0) -> None:
    """Until the query service's history holds every charted series in full."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get("/console/models/credit/charts.json").json()
        lines = body["data"]["performance"]
        if (
            body["note"] is None
            and len(lines) == CHARTED_VERSIONS
            and all(len(ln["data"]) == WINDOWS for ln in lines)
        ):
            return
        time.sleep(0.5)
    raise RuntimeError("the console's history did not catch up with monitoring.stats")


def timed(
    client: httpx.Client, path: str, cookies: dict[str, str] | None = None
) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.get(path, cookies=cookies)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:500]}")
    return elapsed, len(response.content)


def measure(base_url: str, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        wait_for_history(client)
        login = client.post(
            "/console/login", data={"name": "bench", "token": TOKEN}, follow_redirects=False
        )
        signed = {"scoremesh_console": login.cookies["scoremesh_console"]}
        client.cookies.clear()
        for name, (page, baseline) in PAGES.items():
            cookies = signed if name.endswith("signed_in") else None
            for _ in range(2):  # warm: templates compiled, caches filled
                timed(client, baseline)
                timed(client, page, cookies)
            page_s, base_s, size = [], [], 0
            for _ in range(rounds):
                b, _ = timed(client, baseline)
                p, size = timed(client, page, cookies)
                base_s.append(b)
                page_s.append(p)
            page_s.sort()
            out[name] = {
                "path": page,
                "median_ms": round(statistics.median(page_s) * 1000, 1),
                "p95_ms": round(page_s[int(0.95 * (len(page_s) - 1))] * 1000, 1),
                "max_ms": round(page_s[-1] * 1000, 1),
                "bytes": size,
                "baseline": baseline,
                "baseline_median_ms": round(statistics.median(base_s) * 1000, 1),
                "ratio_to_baseline": round(
                    statistics.median(page_s) / statistics.median(base_s), 2
                ),
            }
            say(f"{name}: median {out[name]['median_ms']} ms, max {out[name]['max_ms']} ms")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uuid

    from services.common.devstack import DevStack
    from services.common.kafka import ensure_topics
    from services.trainer.datasets import CREDIT_SPEC, credit_events
    from services.trainer.pipeline import train
    from tests.query.conftest import api_process

    stack = DevStack(BENCH_HOME, Settings(kafka_bootstrap=None, redis_url=None))
    say("starting the embedded stack ...")
    state, _ = stack.up()
    try:
        tag = uuid.uuid4().hex[:8]
        settings = stack.settings.model_copy(
            update=state.settings_overrides()
            | {
                "topic_prefix": f"bench-console-{tag}.",
                "redis_key_prefix": f"bench-console-{tag}:",
                "artifact_dir": BENCH_HOME / "artifacts",
            }
        )
        asyncio.run(ensure_topics(settings))
        say("training a model ...")
        pairs = list(credit_events(3000, seed=11))
        trained = train(
            CREDIT_SPEC,
            [e["features"] for e, _ in pairs],
            [y for _, y in pairs],
            seed=11,
            cv_folds=3,
            dataset="bench",
        )
        say(f"registering {VERSIONS} versions ...")
        asyncio.run(register_versions(settings, trained.onnx, trained.metadata))
        say(f"writing {ALERTS} alerts and the chart history ...")
        stats = asyncio.run(fill_alerts_and_stats(settings))
        with api_process(
            settings,
            BENCH_HOME / "query.log",
            SCOREMESH_API_TOKEN=TOKEN,
            SCOREMESH_API_ACCESS_LOG="false",
        ) as served:
            say("measuring ...")
            pages = measure(served.base_url, args.rounds)
    finally:
        stack.down()
    slowest = max(p["max_ms"] for p in pages.values())
    return {
        "benchmark": "console",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {
            "versions": VERSIONS,
            "alerts": ALERTS,
            "alerts_firing": ALERTS - RESOLVED,
            "alerts_resolved": RESOLVED,
            "monitoring_stats_records": stats,
            "chart_series": CHARTED_VERSIONS * len(SEGMENTS),
            "points_per_series": WINDOWS,
            "rounds": args.rounds,
        },
        "pages": pages,
        "targets": {
            "page_under_s": TARGET_S,
            "slowest_response_ms": slowest,
            "met": slowest < TARGET_S * 1000,
        },
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results" / "console.json")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (a median of fewer is noise)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    say(f"written to {args.output}")
    print(json.dumps(result["targets"], indent=2))
    return 0 if result["targets"]["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
