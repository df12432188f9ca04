"""CLI start-up benchmark: how long `scoremesh --help` and `scoremesh models list -o json`
take as whole processes, against a bare Python start in the same rounds.

On the embedded stack (tansu + Redis, started here, in a private SCOREMESH_HOME, with the
catalog's topics and an empty registry), each round runs, in turn: the baseline
(``python -c "import sys"`` with the same interpreter), ``scoremesh --help`` and
``scoremesh models list -o json`` (which reads settings, connects to the broker and folds
models.registry). Reported per command: median, min and max wall time and CPU time (user +
system of the child), and the ratio of its median to the baseline's. The target:
``--help`` under 0.5 s.

    python scripts/bench_cli.py [--rounds 9] [--output bench-results/cli.json]
"""

# ruff: noqa: E402 - SCOREMESH_HOME must be set before anything from services is imported

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BENCH_HOME = Path(tempfile.mkdtemp(prefix="scoremesh-bench-cli-"))
os.environ["SCOREMESH_HOME"] = str(BENCH_HOME)

import argparse
import asyncio
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCOREMESH = str(Path(sys.executable).with_name("scoremesh"))
TARGET_HELP_S = 0.5


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def summary(walls: list[float], cpus: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(walls), 3),
        "min_s": round(min(walls), 3),
        "max_s": round(max(walls), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.common.devstack import DevStack
    from services.common.kafka import ensure_topics
    from services.common.settings import Settings

    stack = DevStack(BENCH_HOME, Settings(kafka_bootstrap=None, redis_url=None))
    say("starting the embedded stack ...")
    state, _ = stack.up()
    try:
        settings = stack.settings.model_copy(update=state.settings_overrides())
        asyncio.run(ensure_topics(settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
        env["SCOREMESH_HOME"] = str(BENCH_HOME)
        commands = {
            "python_baseline": [sys.executable, "-c", "import sys"],
            "help": [SCOREMESH, "--help"],
            "models_list_json": [SCOREMESH, "models", "list", "-o", "json"],
        }
        for argv in commands.values():  # warm-up: page cache, .pyc files
            timed(argv, env)
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        for round_ in range(args.rounds):
            for name, argv in commands.items():
                wall, cpu = timed(argv, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
            say(f"round {round_ + 1}: " + ", ".join(f"{n} {w[-1]:.3f}s" for n, w in walls.items()))
    finally:
        stack.down()
    results = {name: summary(walls[name], cpus[name]) for name in commands}
    base = results["python_baseline"]["median_s"]
    for name in ("help", "models_list_json"):
        results[name]["ratio_to_baseline"] = round(results[name]["median_s"] / base, 2)
    return {
        "benchmark": "cli-startup",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rounds": args.rounds,
        "commands": {
            name: " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv))
            for name, argv in commands.items()
        },
        "results": results,
        "targets": {
            "help_under_s": TARGET_HELP_S,
            "help_median_s": results["help"]["median_s"],
            "met": results["help"]["median_s"] < TARGET_HELP_S,
        },
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results" / "cli.json")
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
    print(json.dumps(result["results"], indent=2))
    return 0 if result["targets"]["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
