"""`scoremesh`: one CLI for running services, the dev stack, the demo and models.

Exit codes: 0 ok, 1 failure, 2 usage error. Errors are one line saying what to do.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError
from pydantic_settings import SettingsError

from services.common.errors import UserError
from services.common.settings import ConfigError, Settings, default_home

# `scoremesh run <name>`: every service is one class with start/run/stop (lifecycle.Service).
SERVICES = {
    "registry": "services.registry.service:RegistryService",
    "validator": "services.validator.service:ValidatorService",
    "scorer": "services.scorer.service:ScorerService",
    "trainer": "services.trainer.service:TrainerService",
    "retrain-trigger": "services.retrain.service:RetrainTriggerService",
    "monitor": "services.monitor.service:MonitorService",
    "label-join": "services.label_join.service:LabelJoinService",
    "query": "services.query.service:QueryService",
}

EPILOG = """examples:
  scoremesh dev up                 start the embedded broker and Redis
  scoremesh demo                   the whole loop on the embedded stack, with a report
  scoremesh run scorer             run one service (settings from SCOREMESH_* variables)
  scoremesh models bootstrap       train and publish a first champion
  scoremesh models list            what the registry holds

exit codes: 0 ok, 1 failure, 2 usage error"""


class UsageError(Exception):
    pass


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "SCOREMESH_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise ConfigError(f"{name}: {first['msg']}") from None
    except SettingsError as exc:  # e.g. a policy variable that is not valid JSON
        raise ConfigError(
            f"{exc}; complex settings take JSON, e.g. "
            """SCOREMESH_RETRAIN_POLICY='{"min_new_labels": 200}'"""
        ) from None


def _print(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        human()


def cmd_run(args: argparse.Namespace) -> int:
    from services.common.lifecycle import run_service

    settings = _settings()
    settings.require_bootstrap()
    module_name, _, class_name = SERVICES[args.service].partition(":")
    service_class = getattr(importlib.import_module(module_name), class_name)
    return run_service(args.service, lambda: service_class(settings), settings)


def cmd_dev(args: argparse.Namespace) -> int:
    from services.common.devstack import DevStack

    settings = _settings()
    stack = DevStack(default_home(), settings)
    if args.action == "up":
        state, started = stack.up()
        data = {
            "kafka_bootstrap": state.kafka_bootstrap,
            "redis_url": state.redis_url,
            "started": state.started,
            "already_running": not started,
        }

        def human() -> None:
            print("dev stack already running" if not started else "dev stack up")
            print(
                f"  Kafka  {state.kafka_bootstrap}   (tansu, in memory)"
                if "broker" in state.started
                else f"  Kafka  {state.kafka_bootstrap}"
            )
            print(f"  Redis  {state.redis_url}")
            print("services started now find it on their own; other clients use:")
            print(f"  export SCOREMESH_KAFKA_BOOTSTRAP={state.kafka_bootstrap}")
            print(f"  export SCOREMESH_REDIS_URL={state.redis_url}")
            print("stop it with: scoremesh dev down")

        _print(data, args.json, human)
        return 0
    if args.action == "down":
        left = stack.services()
        stopped = stack.down()
        _print(
            {"stopped": stopped, "services_still_running": [r.to_json() for r in left]},
            args.json,
            lambda: print("stopped: " + ", ".join(stopped) if stopped else "nothing was running"),
        )
        if left:
            print(
                "still running against it (they keep retrying; stop them with kill PID): "
                + ", ".join(f"{r.service} (pid {r.pid})" for r in left),
                file=sys.stderr,
            )
        return 0
    running = stack.running()
    if running is None:
        _print({"running": False}, args.json, lambda: print("dev stack not running"))
        return 1
    from services.common.devstack import readiness

    services = [(record, readiness(record)) for record in stack.services()]
    _print(
        {
            "running": True,
            **running.to_json(),
            "services": [{**r.to_json(), "readiness": ready} for r, ready in services],
        },
        args.json,
        lambda: _print_status(running, services),
    )
    return 0


def _print_status(running: Any, services: list[tuple[Any, str]]) -> None:
    from services.common.tables import format_table

    print(f"running: Kafka {running.kafka_bootstrap}, Redis {running.redis_url}")
    if not services:
        print("no services running on it yet (start one with: scoremesh run registry &)")
        return
    rows = [
        {
            "service": r.service + (f" (API :{r.api_port})" if r.api_port else ""),
            "pid": r.pid,
            "health and metrics": r.metrics_url,
            "ready": ready,
        }
        for r, ready in services
    ]
    print(format_table(rows, ("service", "pid", "health and metrics", "ready"), width=100))


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo.runner import DemoOptions, run_demo

    return run_demo(
        _settings(),
        DemoOptions(
            events=args.events,
            invalid_share=args.invalid,
            keep_stack=args.keep,
            output=args.output,
            closed_loop=args.closed_loop,
            drift_at=args.drift_at,
            rate=args.rate,
        ),
    )


def cmd_models(args: argparse.Namespace) -> int:
    from services.cli import models as cli_models

    return cli_models.run(args, _settings())


def cmd_monitor(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from services.common.tables import format_table
    from services.monitor.status import ALERT_COLUMNS, DRIFT_COLUMNS, monitor_status

    settings.require_bootstrap()
    status = asyncio.run(monitor_status(settings, alerts_from=args.alerts_from))
    if args.json:
        sys.stdout.write(orjson.dumps(status.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"open alerts ({status.alerts_source}): {len(status.alerts)}")
    if status.alerts:
        print(format_table(status.alerts, ALERT_COLUMNS))
    print(f"\ndrift state: {len(status.drift)} signal(s)")
    if status.drift:
        print(format_table(status.drift, DRIFT_COLUMNS))
    for note in status.notes:
        print(f"note: {note}")
    return 0


def _with_settings(
    handler: Callable[[argparse.Namespace, Settings], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return handler(args, _settings())

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scoremesh",
        description="Run ML models in production as Kafka stream processors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one service", epilog="example: scoremesh run validator")
    run.add_argument("service", choices=SERVICES)
    run.set_defaults(func=cmd_run)

    dev = sub.add_parser(
        "dev",
        help="the embedded broker and Redis",
        epilog="example: scoremesh dev up && scoremesh dev status",
    )
    dev.add_argument("action", choices=("up", "down", "status"))
    dev.add_argument("--json", action="store_true", help="machine-readable output")
    dev.set_defaults(func=cmd_dev)

    demo = sub.add_parser(
        "demo",
        help="run the whole loop on the embedded stack",
        epilog="example: scoremesh demo --events 5000",
    )
    demo.add_argument("--events", type=_positive_int, default=20_000)
    demo.add_argument("--invalid", type=_share, default=0.03, help="share of invalid events")
    demo.add_argument("--keep", action="store_true", help="leave the dev stack running")
    demo.add_argument("--output", default="demo-output", help="where logs and the report go")
    demo.add_argument(
        "--no-retrain-loop",
        dest="closed_loop",
        action="store_false",
        help="only the hot path: registry, validator, scorer",
    )
    demo.add_argument("--drift-at", type=_positive_int, help="event where the concept changes")
    demo.add_argument("--rate", type=float, default=800.0, help="events per second")
    demo.set_defaults(func=cmd_demo)

    from services.cli import models as cli_models
    from services.cli import sample as cli_sample
    from services.cli import stream as cli_stream

    cli_models.add_parsers(sub)
    sub.choices["models"].set_defaults(func=cmd_models)
    cli_stream.add_parsers(sub)
    cli_sample.add_parser(sub)
    sub.choices["sample"].set_defaults(func=cli_sample.cmd_sample)
    monitor = sub.add_parser(
        "monitor",
        help="drift state and open alerts",
        epilog="example: scoremesh monitor status --json",
    )
    msub = monitor.add_subparsers(dest="action", required=True)
    status = msub.add_parser("status", help="current drift state and open alerts as tables")
    status.add_argument(
        "--from",
        dest="alerts_from",
        choices=("topic", "redis"),
        default="topic",
        help="fold open alerts from the alerts topic (default) or read Redis",
    )
    status.add_argument("--json", action="store_true")
    monitor.set_defaults(func=_with_settings(cmd_monitor))
    for name, handler in (
        ("events", cli_stream.cmd_events),
        ("labels", cli_stream.cmd_labels),
        ("tail", cli_stream.cmd_tail),
        ("dlq", cli_stream.cmd_dlq),
        ("forget", cli_stream.cmd_forget),
    ):
        sub.choices[name].set_defaults(func=_with_settings(handler))
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    # aiokafka logs what it retries or raises at ERROR; the error we raise says it once, with
    # the cause and the fix (services do the same in logs.configure_logging).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"scoremesh: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"scoremesh: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"scoremesh: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line for people; the traceback helps nobody at a prompt
        from aiokafka.errors import KafkaError

        from services.common.devstack import DevStackError
        from services.common.kafka import KafkaUnavailable

        if isinstance(exc, DevStackError | KafkaUnavailable):
            print(f"scoremesh: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, KafkaError):  # e.g. a topic that does not exist
            print(f"scoremesh: Kafka: {exc}", file=sys.stderr)
            return 1
        raise
