"""`scoremesh`: one CLI for running services, the dev stack, the demo, topics and models.

Built on Typer (commands, help, completion) and rich (tables, progress):
docs/adr/0018-cli.md. Exit codes: 0 ok, 1 failure, 2 usage error. Errors are one line
saying what was wrong and what to do.

Start-up time matters at a prompt and in scripts: the command modules import only Typer and
the standard library at the top; settings, Kafka clients, onnxruntime, scikit-learn and
River are imported inside the commands that use them (a test checks `scoremesh --help`).
"""

from __future__ import annotations

import importlib
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer

from services.cli import deprecated
from services.cli.context import UsageProblem, examples, load_settings, positive, set_flags
from services.cli.output import Output, OutputOption, emit, table

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


app = typer.Typer(
    name="scoremesh",
    help="Run ML models in production as Kafka stream processors.\n\n"
    "Exit codes: 0 ok, 1 failure, 2 usage error. A version is NAME@VERSION (credit@1.1.0); "
    "-m/--model names a model (default: SCOREMESH_MODEL_NAME).",
    epilog=examples(
        "scoremesh dev up                  start the embedded broker and Redis",
        "scoremesh demo                    the whole loop on the embedded stack, with a report",
        "scoremesh run scorer &            run one service (settings from SCOREMESH_*)",
        "scoremesh models bootstrap        train and publish a first champion",
        "scoremesh models list -o json     what the registry holds, for a script",
        "scoremesh --install-completion    tab completion for your shell",
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    bootstrap_server: Annotated[
        str | None,
        typer.Option(
            "--bootstrap-server",
            help="Kafka host:port[,host:port]; wins over SCOREMESH_KAFKA_BOOTSTRAP and the "
            "dev stack.",
            show_default=False,
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="redis://host:port/db; wins over SCOREMESH_REDIS_URL and the dev stack.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Global options, before the command: scoremesh --bootstrap-server kafka:9092 models list"""
    set_flags(kafka_bootstrap=bootstrap_server, redis_url=redis_url)


# --- run ---------------------------------------------------------------------------------


class Service(StrEnum):
    registry = "registry"
    validator = "validator"
    scorer = "scorer"
    trainer = "trainer"
    retrain_trigger = "retrain-trigger"
    monitor = "monitor"
    label_join = "label-join"
    query = "query"


@app.command(
    epilog=examples(
        "scoremesh run validator",
        "scoremesh run scorer >scorer.log 2>&1 &",
        "SCOREMESH_MODELS=fraud scoremesh run scorer",
    )
)
def run(
    service: Annotated[Service, typer.Argument(help="The service to run in this process.")],
) -> None:
    """Run one service in the foreground (JSON logs on stdout; stop it with Ctrl-C or kill)."""
    from services.common.lifecycle import run_service

    settings = load_settings()
    settings.require_bootstrap()
    module_name, _, class_name = SERVICES[service.value].partition(":")
    service_class = getattr(importlib.import_module(module_name), class_name)
    code = run_service(service.value, lambda: service_class(settings), settings)
    if code:
        raise typer.Exit(code)


# --- dev ---------------------------------------------------------------------------------

dev = typer.Typer(
    help="The embedded development stack: a Kafka-compatible broker and Redis.",
    no_args_is_help=True,
)
app.add_typer(dev, name="dev", epilog=examples("scoremesh dev up && scoremesh dev status"))


@dev.command(epilog=examples("scoremesh dev up", "scoremesh dev up -o json"))
def up(output: OutputOption = Output.table) -> None:
    """Start the embedded broker and Redis (idempotent; services started later find them)."""
    from services.common.devstack import DevStack
    from services.common.settings import default_home

    state, started = DevStack(default_home(), load_settings()).up()
    data = {
        "kafka_bootstrap": state.kafka_bootstrap,
        "redis_url": state.redis_url,
        "started": state.started,
        "already_running": not started,
    }
    kafka = f"  Kafka  {state.kafka_bootstrap}"
    emit(
        data,
        output,
        [
            "dev stack already running" if not started else "dev stack up",
            kafka + ("   (tansu, in memory)" if "broker" in state.started else ""),
            f"  Redis  {state.redis_url}",
            "services started now find it on their own; other clients use:",
            f"  export SCOREMESH_KAFKA_BOOTSTRAP={state.kafka_bootstrap}",
            f"  export SCOREMESH_REDIS_URL={state.redis_url}",
            "stop it with: scoremesh dev down",
        ],
    )


@dev.command(epilog=examples("scoremesh dev down"))
def down(output: OutputOption = Output.table) -> None:
    """Stop what `scoremesh dev up` started."""
    from services.common.devstack import DevStack
    from services.common.settings import default_home

    stack = DevStack(default_home(), load_settings())
    left = stack.services()
    stopped = stack.down()
    emit(
        {"stopped": stopped, "services_still_running": [r.to_json() for r in left]},
        output,
        ["stopped: " + ", ".join(stopped) if stopped else "nothing was running"],
    )
    if left:
        print(
            "still running against it (they keep retrying; stop them with kill PID): "
            + ", ".join(f"{r.service} (pid {r.pid})" for r in left),
            file=sys.stderr,
        )


@dev.command(epilog=examples("scoremesh dev status", "scoremesh dev status -o json"))
def status(output: OutputOption = Output.table) -> None:
    """The dev stack and the services running on it, with their health; exit 1 when it is
    not running."""
    from services.common.devstack import DevStack, readiness
    from services.common.settings import default_home

    stack = DevStack(default_home(), load_settings())
    running = stack.running()
    if running is None:
        emit({"running": False}, output, ["dev stack not running"])
        raise typer.Exit(1)
    services = [(record, readiness(record)) for record in stack.services()]
    rows = [
        {
            "service": r.service + (f" (API :{r.api_port})" if r.api_port else ""),
            "pid": r.pid,
            "health and metrics": r.metrics_url,
            "ready": ready,
        }
        for r, ready in services
    ]

    def human() -> None:
        print(f"running: Kafka {running.kafka_bootstrap}, Redis {running.redis_url}")
        table(
            rows,
            ("service", "pid", "health and metrics", "ready"),
            empty="no services running on it yet (start one with: scoremesh run registry &)",
        )

    emit(
        {
            "running": True,
            **running.to_json(),
            "services": [{**r.to_json(), "readiness": ready} for r, ready in services],
        },
        output,
        human,
    )


# --- demo --------------------------------------------------------------------------------


@app.command(
    epilog=examples(
        "scoremesh demo",
        "scoremesh demo --events 5000 --no-retrain-loop",
        "scoremesh demo --drift-at 8000 --keep",
    )
)
def demo(
    events: Annotated[int, typer.Option(callback=positive, help="Events to send.")] = 20_000,
    invalid: Annotated[
        float, typer.Option(min=0.0, max=0.999, help="Share of invalid events, in [0, 1).")
    ] = 0.03,
    keep: Annotated[bool, typer.Option(help="Leave the dev stack running afterwards.")] = False,
    output_dir: Annotated[
        str, typer.Option("--output", help="Where the logs and the report go.")
    ] = "demo-output",
    retrain_loop: Annotated[
        bool,
        typer.Option(
            "--retrain-loop/--no-retrain-loop",
            help="The whole loop, or only the hot path: registry, validator, scorer.",
        ),
    ] = True,
    drift_at: Annotated[
        int | None,
        typer.Option(
            callback=positive, help="The event where the concept changes.", show_default=False
        ),
    ] = None,
    rate: Annotated[float, typer.Option(min=1.0, help="Events per second.")] = 800.0,
    max_events: Annotated[
        int | None,
        typer.Option(
            callback=positive,
            help="Events to send at most while the loop waits for a promotion "
            "(default: 3 x --events).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """The whole loop on the embedded stack, with progress, a report and a picture."""
    from services.demo.runner import DemoOptions, run_demo

    code = run_demo(
        load_settings(),
        DemoOptions(
            events=events,
            invalid_share=invalid,
            keep_stack=keep,
            output=output_dir,
            closed_loop=retrain_loop,
            drift_at=drift_at,
            rate=rate,
            max_events=max_events,
        ),
    )
    if code:
        raise typer.Exit(code)


# --- monitor -----------------------------------------------------------------------------

monitor = typer.Typer(help="Drift state and open alerts.", no_args_is_help=True)
app.add_typer(monitor, name="monitor", epilog=examples("scoremesh monitor status"))


class AlertsFrom(StrEnum):
    topic = "topic"
    redis = "redis"


@monitor.command(
    "status",
    epilog=examples(
        "scoremesh monitor status",
        "scoremesh monitor status -m fraud -o json",
        "scoremesh monitor status --from redis",
    ),
)
def monitor_status(
    model: Annotated[
        str | None,
        typer.Option(
            "-m", "--model", help="Only this model's alerts and drift (default: every model)."
        ),
    ] = None,
    alerts_from: Annotated[
        AlertsFrom,
        typer.Option(
            "--from", help="Fold open alerts from the alerts topic, or read them from Redis."
        ),
    ] = AlertsFrom.topic,
    output: OutputOption = Output.table,
) -> None:
    """Per model version: counts, label coverage and delay, error rate; per variant and
    segment: the model's metrics and its worst feature bin; drift state and open alerts,
    as tables."""
    import asyncio

    from services.cli.context import check_model
    from services.monitor.status import (
        ALERT_COLUMNS,
        DRIFT_COLUMNS,
        SEGMENT_COLUMNS,
        VERSION_COLUMNS,
        monitor_status,
    )

    if model:
        check_model(model)
    settings = load_settings()
    settings.require_bootstrap()
    found = asyncio.run(monitor_status(settings, alerts_from=alerts_from.value))
    data = found.as_json()
    if model:
        for key in ("alerts", "drift", "versions", "segments"):
            data[key] = [row for row in data[key] if row.get("model") == model]

    def human() -> None:
        print(f"versions: {len(data['versions'])} (whole stream, per segment)")
        if data["versions"]:
            table(data["versions"], VERSION_COLUMNS)
        print(f"\nperformance: {len(data['segments'])} (label join, per variant and segment)")
        if data["segments"]:
            table(data["segments"], SEGMENT_COLUMNS)
        print(f"\nopen alerts ({found.alerts_source}): {len(data['alerts'])}")
        if data["alerts"]:
            table(data["alerts"], ALERT_COLUMNS)
        print(f"\ndrift state: {len(data['drift'])} signal(s)")
        if data["drift"]:
            table(data["drift"], DRIFT_COLUMNS)
        for note in found.notes:
            print(f"note: {note}")

    emit(data, output, human)


# --- the other command groups --------------------------------------------------------------


def _register_groups() -> None:
    from services.cli import models, sample, stream, topics

    app.add_typer(models.app, name="models")
    app.add_typer(topics.app, name="topics")
    stream.register(app)
    sample.register(app)


_register_groups()


# --- entry point -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The console script: exit code 0 ok, 1 failure, 2 usage error."""
    import logging

    # aiokafka logs what it retries or raises at ERROR; the error we raise says it once,
    # with the cause and the fix (services do the same in logs.configure_logging).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    args = deprecated.rewrite(list(sys.argv[1:] if argv is None else argv))
    set_flags()
    try:
        app(args=args, prog_name="scoremesh")
    except SystemExit as exc:
        return _exit_code(exc.code)
    except UsageProblem as exc:
        print(f"scoremesh: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head` closed the pipe: a normal way to stop reading
        return 0
    except Exception as exc:  # one line for people; the traceback helps nobody at a prompt
        message = _known_error(exc)
        if message is None:
            raise
        print(f"scoremesh: {message}", file=sys.stderr)
        return 1
    return 0


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _known_error(exc: Exception) -> str | None:
    """The one-line message of an error a user can cause, or None for a bug."""
    from services.common.errors import UserError
    from services.common.settings import ConfigError

    if isinstance(exc, UserError | ConfigError):
        return str(exc)
    from aiokafka.errors import KafkaError

    from services.common.devstack import DevStackError
    from services.common.kafka import KafkaUnavailable

    if isinstance(exc, DevStackError | KafkaUnavailable):
        return str(exc)
    if isinstance(exc, KafkaError):  # e.g. a topic that does not exist
        return f"Kafka: {exc}"
    return None
