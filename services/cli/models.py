"""`scoremesh models ...`: the registry from the command line.

A command's object is positional: a model (``credit``) or one of its versions
(``credit@1.1.0``); where it may be left out it is the configured default model. Where the
model only qualifies what a command does (register, bootstrap, list), it is ``-m/--model``.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from services.cli.context import (
    ModelOption,
    UsageProblem,
    check_model,
    examples,
    load_settings,
    model_or_default,
    parse_ref,
    resolve,
    run_async,
)
from services.cli.output import Output, OutputOption, emit, progress, table
from services.cli.target import announce_kafka
from services.common.errors import UserError

if TYPE_CHECKING:
    from scoremesh.contract.records import DeploymentEvent, ModelCommand
    from services.common.registry_view import RegistryState
    from services.common.settings import Settings

app = typer.Typer(
    help="The model registry: register, validate, promote, roll back and watch versions.",
    no_args_is_help=True,
    epilog=examples(
        "scoremesh models list",
        "scoremesh models promote credit@1.1.0 --to canary --percent 10",
        "scoremesh models status credit --wait --timeout 60",
    ),
)
spec_app = typer.Typer(help="Feature specs: infer a first one from data.", no_args_is_help=True)
app.add_typer(
    spec_app,
    name="spec",
    epilog=examples("scoremesh models spec init --data train.csv --label label"),
)


class CommandRefused(UserError):
    """The registry (or a readiness gate) refused; exit code 1 with its reason."""


class Stage(StrEnum):
    shadow = "shadow"
    canary = "canary"
    champion = "champion"
    retired = "retired"


# --- shared arguments ----------------------------------------------------------------------

ModelArgument = Annotated[
    str | None,
    typer.Argument(
        help="The model, e.g. credit; the same as -m credit (default: SCOREMESH_MODEL_NAME).",
        metavar="[MODEL]",
        show_default=False,
    ),
]
VersionArgument = Annotated[
    str,
    typer.Argument(
        help="The version: NAME@VERSION (credit@1.1.0), or VERSION (1.1.0) of the -m model.",
        metavar="NAME@VERSION",
    ),
]
ReasonOption = Annotated[str, typer.Option(help="Why, for the deployment log.")]
DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Say what the registry would do with the command, as it stands now; send nothing.",
    ),
]
FileArgument = Annotated[
    Path,
    typer.Argument(
        help="model.onnx (or a scikit-learn pickle with --trust-pickle).", metavar="FILE"
    ),
]
SpecOption = Annotated[
    Path, typer.Option(help="The feature spec JSON (rules, classes, readiness gates).")
]
TrustPickleOption = Annotated[
    bool, typer.Option("--trust-pickle", help="Accept a pickle from your own disk (converted).")
]


# --- reading the registry -------------------------------------------------------------------


async def _fold(settings: Settings) -> RegistryState:
    from services.common.registry_view import RegistryView

    view = RegistryView(settings)
    await view.start()
    await view.stop()
    return view.state


def _when(ms: int) -> str:
    """Epoch milliseconds as people read them (UTC, to the second)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ready(settings: Settings) -> Settings:
    settings.require_bootstrap()
    return settings


@app.command(
    "list",
    epilog=examples("scoremesh models list", "scoremesh models list -m fraud -o json"),
)
def list_versions(model: ModelOption = None, output: OutputOption = Output.table) -> None:
    """Every version of every model (or of -m MODEL) and its stage."""
    if model:
        check_model(model)
    settings = _ready(load_settings())
    state = run_async(_fold(settings))
    rows: list[dict[str, Any]] = [
        {
            "model": v.name,
            "version": v.version,
            "stage": v.stage,
            "enabled": v.enabled,
            "generation": v.generation,
            "sha256": v.artifact_sha256[:12],
        }
        for m in state.models()
        if model in (None, m)
        for v in state.of_model(m)
    ]
    shown = [
        {**r, "stage": r["stage"] + ("" if r["enabled"] else " (off)"), "gen": r["generation"]}
        for r in rows
    ]
    emit(
        rows,
        output,
        lambda: table(
            shown,
            ("model", "version", "stage", "gen", "sha256"),
            empty=f"no versions of {model}"
            if model
            else "no models registered; try: scoremesh models bootstrap",
        ),
    )


@app.command(
    epilog=examples(
        "scoremesh models show credit",
        "scoremesh models show credit@1.0.0 -o json | jq .metadata.holdout_metrics",
    )
)
def show(
    target: Annotated[
        str | None,
        typer.Argument(
            help="A model (its champion), NAME@VERSION, or VERSION of the -m model (default: "
            "the default model's champion).",
            metavar="NAME[@VERSION]",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    output: OutputOption = Output.table,
) -> None:
    """One version: stage, artifact, metrics, feature spec and metadata."""
    settings = load_settings()
    ref = resolve(target, model, settings, where="NAME[@VERSION]")
    _ready(settings)
    state = run_async(_fold(settings))
    chosen = state.versions.get(ref.key) if ref.version else state.champion(ref.name)
    if chosen is None:
        known = ", ".join(v.key for v in state.of_model(ref.name)) or "none"
        what = "no such version" if ref.version else "no champion of"
        raise CommandRefused(f"{what} {ref.key!r} (known: {known})")
    data = chosen.to_json()
    emit(data, output, lambda: _show_version(data))


def _show_version(data: dict[str, Any]) -> None:
    meta = data.get("metadata") or {}
    spec = data.get("feature_spec") or {}
    rows = [
        ("version", f"{data['name']}@{data['version']}"),
        ("stage", data["stage"] + ("" if data.get("enabled", True) else " (switched off)")),
        ("canary percent", data.get("canary_percent") or "-"),
        ("generation", data["generation"]),
        ("registered", _when(data["registered_at"]) if data.get("registered_at") else "-"),
        ("updated", _when(data["updated_at"]) if data.get("updated_at") else "-"),
        ("artifact", f"{data['artifact_uri']} ({data['artifact_size']} bytes)"),
        ("sha256", data["artifact_sha256"]),
        ("features", ", ".join(f["name"] for f in spec.get("features", []))),
        ("classes", ", ".join(str(c) for c in spec.get("classes", []))),
        (
            "holdout metrics",
            ", ".join(f"{k} {v:.3f}" for k, v in (meta.get("holdout_metrics") or {}).items())
            or "-",
        ),
        ("recipe", (meta.get("recipe") or {}).get("entry_point") or "-"),
        ("monitoring gaps", "; ".join(meta.get("monitoring_gaps") or []) or "-"),
    ]
    table([{"field": k, "value": v} for k, v in rows], ("field", "value"), max_width=120)
    print("the whole record: -o json")


@app.command(
    epilog=examples("scoremesh models history credit", "scoremesh models history fraud -o json")
)
def history(
    target: ModelArgument = None, model: ModelOption = None, output: OutputOption = Output.table
) -> None:
    """The deployment log of a model: when, who, what (versions and stages) and why."""
    from services.common.commands import read_history

    settings = load_settings()
    name = resolve(target, model, settings, version=False, where="MODEL").name
    _ready(settings)
    events = run_async(read_history(settings, name))
    emit(
        events,
        output,
        lambda: table(history_rows(events), HISTORY_COLUMNS, f"no history for {name!r}", 100),
    )


HISTORY_COLUMNS = ("time (utc)", "actor", "action", "version", "change", "reason")


def history_rows(events: list[DeploymentEvent]) -> list[dict[str, Any]]:
    """The deployment log for people: when, who, what (versions and stages) and why."""
    rows = []
    for e in events:
        if e["outcome"] != "applied":
            change = f"refused: {e['detail']}"
        elif e["action"] == "register":
            change = "registered"
        else:
            change = f"{e.get('from_stage')} -> {e.get('to_stage')}"
            previous = e.get("previous_champion")
            if previous and previous != e.get("version"):
                change += f" (previous champion {previous})"
        rows.append(
            {
                "time (utc)": _when(e["at"]),
                "actor": e["actor"],
                "action": e["action"],
                "version": e.get("version") or "-",
                "change": change,
                "reason": e["reason"] or "-",
            }
        )
    return rows


# --- models status: which version each serving replica has loaded --------------------------


@app.command(
    epilog=examples(
        "scoremesh models status credit",
        "scoremesh models promote credit@1.1.0 --to champion && "
        "scoremesh models status credit --wait --timeout 60",
        "scoremesh models status fraud -o json",
    )
)
def status(
    target: ModelArgument = None,
    model: ModelOption = None,
    wait: Annotated[
        bool,
        typer.Option(
            help="Wait until every live replica serves the registry's champion (like "
            "kubectl rollout status)."
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds --wait waits before reporting failure.")
    ] = 60.0,
    output: OutputOption = Output.table,
) -> None:
    """Which version each scorer replica actually serves, from their heartbeats.

    Exit 0 when every live replica that serves the model has loaded its champion; 1 when
    one has not (with --wait: still not after --timeout), or when none serves the model."""
    settings = load_settings()
    name = resolve(target, model, settings, version=False, where="MODEL").name
    _ready(settings)
    report = run_async(_rollout(settings, name, wait, timeout))
    emit(report, output, lambda: _print_rollout(report))
    if not report["rolled_out"]:
        raise typer.Exit(1)


async def _rollout_report(settings: Settings, model: str) -> dict[str, Any]:
    import time

    from services.common.serving.status import live_replicas, read_serving_status

    state = await _fold(settings)
    statuses = await read_serving_status(settings)
    now = int(time.time() * 1000)
    return rollout_report(model, state, live_replicas(statuses, now))


def rollout_report(model: str, state: RegistryState, replicas: list[Any]) -> dict[str, Any]:
    """Which replicas serve ``model`` and what they have loaded, against the registry."""
    champion = state.champion(model)
    challengers = [v.key for v in state.active(model) if v.stage != "champion"]
    rows = []
    for replica in replicas:
        if replica.models and model not in replica.models:
            continue  # a replica split off to other models (SCOREMESH_MODELS)
        loaded = {k: s for k, s in replica.serving.items() if k.split("@")[0] == model}
        serving = next((k for k, s in loaded.items() if s == "champion"), None)
        rows.append(
            {
                "instance": replica.instance,
                "service": replica.service,
                "group": replica.group,
                "serving": serving,
                "challengers": sorted(k for k, s in loaded.items() if s != "champion"),
                "failure": replica.failures.get(model)
                or next(
                    (v for k, v in replica.failures.items() if k.startswith(model + "@")), None
                ),
                "heartbeat_age_s": round(replica.age_ms / 1000, 1),
                "up_to_date": champion is not None and serving == champion.key,
            }
        )
    stale = [r["instance"] for r in rows if not r["up_to_date"]]
    rolled_out = champion is not None and bool(rows) and not stale
    if champion is None:
        summary = f"{model} has no champion in the registry"
    elif not rows:
        summary = f"no live scorer serves {model}: champion {champion.key} is loaded nowhere"
    elif stale:
        summary = f"{len(rows) - len(stale)} of {len(rows)} replica(s) serve {champion.key}"
    else:
        summary = f"all {len(rows)} replica(s) serve {champion.key}"
    return {
        "model": model,
        "champion": champion.key if champion else None,
        "challengers": challengers,
        "replicas": rows,
        "rolled_out": rolled_out,
        "summary": summary,
    }


async def _rollout(settings: Settings, model: str, wait: bool, wait_s: float) -> dict[str, Any]:
    import asyncio
    import time

    deadline = time.monotonic() + wait_s
    report = await _rollout_report(settings, model)
    if not wait:
        return report
    with progress(f"waiting for {model}'s champion on every replica") as bar:
        while not report["rolled_out"] and time.monotonic() < deadline:
            bar.step(report["summary"])
            await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            report = await _rollout_report(settings, model)
    if not report["rolled_out"]:
        report["summary"] += f" after {wait_s:g}s"
    return report


def _print_rollout(report: dict[str, Any]) -> None:
    champion = report["champion"] or "none"
    print(f"model {report['model']}: champion {champion}")
    rows = [
        {
            **r,
            "serving": r["serving"] or "-",
            "challengers": ", ".join(r["challengers"]) or "-",
            "state": "up to date" if r["up_to_date"] else (r["failure"] or "not loaded"),
            "heartbeat": f"{r['heartbeat_age_s']}s ago",
        }
        for r in report["replicas"]
    ]
    table(rows, ("instance", "serving", "challengers", "state", "heartbeat"), empty="")
    print(("" if report["rolled_out"] else "not rolled out: ") + report["summary"])


# --- changing the registry -------------------------------------------------------------------


def _send(settings: Settings, cmd: ModelCommand, dry_run: bool, output: Output) -> None:
    """Send a registry command and print the answer, or with ``dry_run`` what the registry
    would answer now (its own decision function on the folded registry)."""
    from services.common.commands import command, describe

    if dry_run:
        event = run_async(_would(settings, cmd))
        line = ("would: " if event["outcome"] == "applied" else "would be ") + describe(event)
        emit({**event, "dry_run": True}, output, [line])
        if event["outcome"] != "applied":
            raise typer.Exit(1)
        return
    announce_kafka(settings)
    event = run_async(command(settings, cmd))
    emit(event, output, [describe(event)])
    if event["outcome"] != "applied":
        raise CommandRefused(describe(event))


async def _would(settings: Settings, cmd: ModelCommand) -> DeploymentEvent:
    import time

    from services.registry.logic import RegistryBook, decide
    from services.registry.service import fold_book

    book = await fold_book(settings, RegistryBook())
    return decide(book, cmd, int(time.time() * 1000)).event


@app.command(
    epilog=examples(
        "scoremesh models promote credit@1.1.0 --to shadow",
        "scoremesh models promote credit@1.1.0 --to canary --percent 10",
        'scoremesh models promote credit@1.1.0 --to champion --reason "better on live labels"',
        "scoremesh models promote credit@1.1.0 --to champion --dry-run",
    )
)
def promote(
    version: VersionArgument,
    to: Annotated[Stage, typer.Option("--to", help="The stage to move the version to.")],
    model: ModelOption = None,
    percent: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=100.0, help="Canary share of entities, (0, 100].", show_default=False
        ),
    ] = None,
    reason: ReasonOption = "",
    dry_run: DryRunOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Move a version to a stage (promoting a champion demotes the previous one)."""
    from services.common.commands import new_command

    settings = load_settings()
    ref = resolve(version, model, settings, version=True, where="NAME@VERSION")
    _ready(settings)
    options = {"percent": str(percent)} if percent is not None else {}
    cmd = new_command(
        ref.name,
        "promote",
        "cli",
        version=ref.version,
        target_stage=to.value,
        options=options,
        reason=reason,
    )
    _send(settings, cmd, dry_run, output)


@app.command(
    epilog=examples(
        'scoremesh models rollback credit --reason "drill"',
        "scoremesh models rollback credit@1.1.0",
        "scoremesh models rollback credit --dry-run",
    )
)
def rollback(
    target: Annotated[
        str | None,
        typer.Argument(
            help="A model: restore its previous champion; or NAME@VERSION: take that "
            "shadow or canary version out (default: the default model).",
            metavar="NAME[@VERSION]",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    reason: ReasonOption = "",
    dry_run: DryRunOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Restore the previous champion, or roll back a challenger."""
    from services.common.commands import new_command

    settings = load_settings()
    ref = resolve(target, model, settings, where="NAME[@VERSION]")
    _ready(settings)
    cmd = new_command(ref.name, "rollback", "cli", version=ref.version, reason=reason)
    _send(settings, cmd, dry_run, output)


@app.command(
    epilog=examples(
        "scoremesh models retire credit@1.0.1",
        "scoremesh models retire credit@1.0.1 --dry-run",
    )
)
def retire(
    version: VersionArgument,
    model: ModelOption = None,
    reason: ReasonOption = "",
    dry_run: DryRunOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Take a version out of service."""
    from services.common.commands import new_command

    settings = load_settings()
    ref = resolve(version, model, settings, version=True, where="NAME@VERSION")
    _ready(settings)
    cmd = new_command(ref.name, "retire", "cli", version=ref.version, reason=reason)
    _send(settings, cmd, dry_run, output)


@app.command(
    epilog=examples(
        "scoremesh models flag credit@1.1.0 --off",
        "scoremesh models flag credit@1.1.0 --on --reason 'fixed upstream'",
    )
)
def flag(
    version: VersionArgument,
    enabled: Annotated[
        bool,
        typer.Option(
            "--on/--off", help="Switch the challenger's variant on or off.", show_default=False
        ),
    ],
    model: ModelOption = None,
    reason: ReasonOption = "",
    output: OutputOption = Output.table,
) -> None:
    """Switch a challenger variant off or on, instantly."""
    from services.common.commands import new_command

    settings = load_settings()
    ref = resolve(version, model, settings, version=True, where="NAME@VERSION")
    _ready(settings)
    cmd = new_command(
        ref.name,
        "flag",
        "cli",
        version=ref.version,
        options={"enabled": str(enabled).lower()},
        reason=reason,
    )
    _send(settings, cmd, False, output)


@app.command(epilog=examples("scoremesh models bootstrap", "scoremesh models bootstrap -o json"))
def bootstrap(model: ModelOption = None, output: OutputOption = Output.table) -> None:
    """Train a first model on synthetic loan applications and make it champion (once)."""
    from services.trainer.bootstrap import bootstrap as run_bootstrap

    settings = _ready(load_settings())
    if model:
        settings = settings.replace(model_name=check_model(model))
    announce_kafka(settings)
    with progress(f"training and publishing {settings.model_name}@1.0.0"):
        result = run_async(run_bootstrap(settings))
    emit(
        {"created": result.created, "version": result.version, "metrics": result.metrics},
        output,
        [result.message],
    )


# --- validate, register ------------------------------------------------------------------------

DataOption = Annotated[
    Path | None,
    typer.Option(
        help="Held-out labelled data the model never trained on: JSON lines or CSV with a "
        "'label' column.",
        show_default=False,
    ),
]


def _inputs(
    file: Path, spec_path: Path, data: Path | None, trust_pickle: bool
) -> tuple[Any, bytes, list[dict[str, Any]] | None, list[str] | None]:
    from services.common.registration import load_labelled_data, load_model_bytes, load_spec

    spec = load_spec(spec_path)
    onnx = load_model_bytes(file, spec, trust_pickle=trust_pickle)
    rows, labels = load_labelled_data(data, spec) if data else (None, None)
    return spec, onnx, rows, labels


def readiness_lines(report: dict[str, Any], failures: list[str]) -> list[str]:
    lines = [f"artifact: {report.get('artifact_bytes', 0)} bytes"]
    for size, figures in report.get("latency", {}).items():
        lines.append(
            f"latency batch {size:>5}: p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms"
            f" (model compute p99 {figures.get('cpu_p99_ms', float('nan')):.3f} ms), "
            f"{figures['per_row_us']:.2f} µs/row"
        )
    if report.get("metrics"):
        lines.append("metrics: " + ", ".join(f"{k} {v:.3f}" for k, v in report["metrics"].items()))
    if report.get("folds"):
        lines.append(
            f"{report['folds']['k']}-fold stratified min: "
            + ", ".join(f"{k} {v:.3f}" for k, v in report["folds"]["min"].items())
        )
    if report.get("class_balance"):
        lines.append(
            "class balance: "
            + ", ".join(f"{k} {v:.1%}" for k, v in report["class_balance"].items())
        )
    edge = report.get("edge_cases", {})
    if edge:
        lines.append(
            f"null / out-of-range cases: {edge['cases']}, invalid outputs: {len(edge['invalid_outputs'])}"
        )
    lines.append("gates: passed" if not failures else "gates FAILED:")
    lines += [f"  - {f}" for f in failures]
    return lines


@app.command(
    epilog=examples(
        "scoremesh models validate model.onnx --spec spec.json --data holdout.csv",
        "scoremesh models validate model.onnx --spec spec.json -o json",
    )
)
def validate(
    file: FileArgument,
    spec: SpecOption,
    data: DataOption = None,
    trust_pickle: TrustPickleOption = False,
    output: OutputOption = Output.table,
) -> None:
    """A production-readiness report (latency, metrics, edge cases, gates); exit 1 when a
    gate fails. Needs no broker."""
    from services.common.readiness import validate_model

    with progress("validating (latency, metrics, edge cases)"):
        spec_obj, onnx, rows, labels = _inputs(file, spec, data, trust_pickle)
        result = validate_model(onnx, spec_obj, rows, labels)
    emit(result.report, output, readiness_lines(result.report, result.failures))
    if not result.passed:
        raise CommandRefused("readiness gates not met: " + "; ".join(result.failures))


@app.command(
    epilog=examples(
        "scoremesh models register model.onnx --spec spec.json --data holdout.csv "
        "--version 2.0.0 --stage shadow",
        "scoremesh models register fraud.onnx -m fraud --spec fraud-spec.json --version 1.0.0 "
        "--stage champion",
        "scoremesh models register model.onnx --spec spec.json --recipe train:recipe "
        "--version 2.1.0",
    )
)
def register(
    file: FileArgument,
    spec: SpecOption,
    version: Annotated[
        str,
        typer.Option(
            help="The new version, MAJOR.MINOR.PATCH (or NAME@VERSION, then -m may be left out).",
        ),
    ],
    model: ModelOption = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Held-out labelled data (JSON lines or CSV with a 'label' column); its "
            "metrics, class balance and feature/score distributions become the version's "
            "monitoring baseline.",
            show_default=False,
        ),
    ] = None,
    trust_pickle: TrustPickleOption = False,
    metadata: Annotated[
        Path | None,
        typer.Option(help="Extra metadata JSON (limitations, owners, ...).", show_default=False),
    ] = None,
    stage: Annotated[
        Stage | None,
        typer.Option(help="Promote to this stage right after registering.", show_default=False),
    ] = None,
    reason: ReasonOption = "",
    recipe: Annotated[
        str | None,
        typer.Option(
            help="How to retrain it: package.module:function (your code, fit(x, y, spec) -> "
            "estimator) or a pipeline JSON file; trial-run now.",
            show_default=False,
        ),
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Readiness report, then upload the artifact and register the version (nothing is
    sent when a gate fails)."""
    from services.common.commands import describe
    from services.common.model_version import VersionMetadata
    from services.common.registration import OperationError, register_version

    ref = parse_ref(version, where="--version") if "@" in version else None
    if ref is not None and model and model != ref.name:
        raise UsageProblem(f"--version {version} names model {ref.name}, but -m says {model}")
    number = ref.version if ref is not None else version
    settings = _ready(load_settings())
    name = ref.name if ref is not None else model_or_default(model, settings)
    meta = VersionMetadata()
    if metadata:
        try:
            meta = VersionMetadata.model_validate_json(metadata.read_bytes())
        except (OSError, ValueError) as exc:
            raise OperationError(f"{metadata}: not valid metadata JSON: {exc}") from None
    recipe_obj = None
    if recipe:
        import os

        from services.common.recipes import recipe_from_argument

        # Like uvicorn's --app-dir: a recipe module in the current directory is found.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        recipe_obj = recipe_from_argument(recipe)
    announce_kafka(settings)
    with progress(f"registering {name}@{number}") as bar:
        spec_obj, onnx, rows, labels = _inputs(file, spec, data, trust_pickle)
        result = run_async(
            register_version(
                settings,
                name,
                number or "",
                onnx,
                spec_obj,
                metadata=meta,
                rows=rows,
                labels=labels,
                actor="cli",
                reason=reason,
                stage=stage.value if stage else None,
                recipe=recipe_obj,
                on_step=lambda what: bar.step(f"{name}@{number}: {what}"),
                on_upload=bar.to,
            )
        )
    lines = readiness_lines(result.readiness.report, result.readiness.failures)
    if result.recipe_trial is not None:
        trial = result.recipe_trial
        lines.append(
            f"recipe trial: fitted on {trial['rows']} rows ({trial['data']}) in "
            f"{trial['fit_s']:.2f}s, converted ({trial['onnx_bytes']} bytes: "
            f"{', '.join(trial['operators'])}), scored in onnxruntime"
        )
    lines += [f"without: {gap}" for gap in result.gaps]
    if not result.readiness.passed:
        emit({"readiness": result.readiness.report, "outcome": result.outcome}, output, lines)
        raise CommandRefused("not registered: readiness gates not met")
    outcome = result.outcome
    lines.append(describe(outcome))
    if result.promotion is not None:
        lines.append(describe(result.promotion))
    emit(
        {
            "outcome": outcome,
            "promotion": result.promotion,
            "readiness": result.readiness.report,
            "recipe_trial": result.recipe_trial,
            "monitoring_gaps": list(result.gaps),
        },
        output,
        lines,
    )
    for event in (outcome, result.promotion):
        if event is not None and event["outcome"] != "applied":
            raise CommandRefused(describe(event))


# --- retrain -----------------------------------------------------------------------------------


@app.command(
    epilog=examples(
        "scoremesh models retrain credit --wait",
        'scoremesh models retrain fraud --window-days 14 --reason "new fraud pattern"',
        "scoremesh models retrain credit --accept-recipe-code --wait",
    )
)
def retrain(
    target: Annotated[
        str | None,
        typer.Argument(
            help="The model to retrain, the same as -m; its champion is the starting point "
            "(default: SCOREMESH_MODEL_NAME).",
            metavar="[MODEL]",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    reason: ReasonOption = "",
    wait: Annotated[
        bool,
        typer.Option(
            help="Wait for the trainer's outcome; exit 1 unless a version was registered."
        ),
    ] = False,
    window_days: Annotated[
        float | None,
        typer.Option(
            help="Event-time span of the training data (default: the retrain policy's window_s).",
            show_default=False,
        ),
    ] = None,
    window_end: Annotated[
        str | None,
        typer.Option(help="ISO-8601 end of that span (default: now).", show_default=False),
    ] = None,
    timeout: Annotated[float, typer.Option(min=1.0, help="Seconds --wait waits.")] = 600.0,
    accept_recipe_code: Annotated[
        bool,
        typer.Option(
            "--accept-recipe-code",
            help="You vouch for the recipe's code as it is now, although its hash changed since "
            "the champion was trained: the trainer runs it and records the new hash.",
        ),
    ] = False,
    output: OutputOption = Output.table,
) -> None:
    """Ask the trainer for a new version trained on recent labelled events."""
    import time

    from services.cli.stream import parse_time
    from services.common.retraining import (
        RetrainTimeout,
        manual_request,
        publish_request,
        wait_for_result,
    )

    if window_days is not None and window_days <= 0:
        raise UsageProblem(f"--window-days must be positive, got {window_days:g}")
    settings = load_settings()
    name = resolve(target, model, settings, version=False, where="MODEL").name
    _ready(settings)
    now = int(time.time() * 1000)
    end = parse_time(window_end, "--window-end") or now
    window_s = window_days * 86400 if window_days else settings.retrain.policy.window_s
    request = manual_request(name, "cli", reason, end, window_s, now)
    if accept_recipe_code:
        from services.trainer.job import ACCEPT_CODE

        request["evidence"] = {**request["evidence"], ACCEPT_CODE: "true"}
    announce_kafka(settings)
    run_async(publish_request(settings, request))
    first = (
        f"retrain requested: {request['request_id']} ({name}, events from "
        f"{_when(request['window_start'])} to {_when(request['window_end'])})"
    )
    if not wait:
        follow = (
            "its outcome: scoremesh tail retrain.results --from-beginning "
            f"--filter request_id={request['request_id']}"
        )
        emit(request, output, [first, follow])
        return
    print(first, file=sys.stderr)  # now, not after the wait; stdout gets the outcome
    with progress(f"waiting for the trainer ({name})") as bar:

        def on_progress(result: dict[str, Any]) -> None:
            if result["status"] == "started":
                text = f"trainer {result['trainer']} started it (attempt {result['attempt']})"
                bar.step(text)
                if not sys.stderr.isatty():
                    print(text, file=sys.stderr)

        try:
            result = run_async(
                wait_for_result(settings, request["request_id"], timeout, on_progress=on_progress)
            )
        except RetrainTimeout as exc:
            raise CommandRefused(str(exc)) from None
    lines = [f"{result['status']}: {result['detail']}"]
    if result["metrics"]:
        lines.append(
            "on the most recent events: "
            + ", ".join(
                f"{k} {v:.3f} (champion {result['champion_metrics'].get(k, float('nan')):.3f})"
                for k, v in sorted(result["metrics"].items())
            )
        )
    emit({"request": request, "result": result}, output, lines)
    if result["status"] != "succeeded":
        raise CommandRefused(f"retrain {result['status']}: {result['detail']}")


# --- spec init ---------------------------------------------------------------------------------


@spec_app.command(
    "init",
    epilog=examples(
        "scoremesh models spec init --data train.csv --label label",
        "scoremesh models spec init --data train.jsonl --label churned --out churn-spec.json",
    ),
)
def spec_init(
    data: Annotated[Path, typer.Option(help="CSV with a header, or JSON lines.")],
    label: Annotated[str, typer.Option(help="The label column.")],
    out: Annotated[Path, typer.Option(help="Where the spec is written.")] = Path("spec.json"),
    margin: Annotated[float, typer.Option(min=0.0, help="Ranges are widened by this share.")] = 0.1,
    max_categories: Annotated[
        int,
        typer.Option(
            min=1, help="Whole-number columns with at most this many values become categories."
        ),
    ] = 12,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
    output: OutputOption = Output.table,
) -> None:
    """Infer names, types, ranges, categories, nullability and classes from data, and write
    a spec to check and edit."""
    import orjson

    from services.common.spec_inference import spec_from_file

    if out.exists() and not force:
        raise CommandRefused(f"{out} exists; edit it, or pass --force to replace it")
    inferred = spec_from_file(data, label, margin, max_categories)
    out.write_text(inferred.spec.model_dump_json(indent=2, exclude_defaults=True) + "\n")
    spec = inferred.spec
    lines = [
        f"wrote {out}: {len(spec.features)} features, classes {spec.classes} "
        f"(positive {spec.positive!r}) from {inferred.rows} rows of {data.name}",
        *[f"  {rule.name}: {_describe_rule(rule)}" for rule in spec.features],
        "check, then edit:",
        *[f"  - {note}" for note in inferred.notes],
        "schema: schemas/featurespec.schema.json; next: scoremesh models validate "
        f"MODEL.onnx --spec {out} --data HOLDOUT",
    ]
    emit(
        {"spec": orjson.loads(spec.model_dump_json()), "notes": inferred.notes, "out": str(out)},
        output,
        lines,
    )


def _describe_rule(rule: Any) -> str:
    parts = [rule.dtype]
    if rule.categories:
        parts.append(f"{len(rule.categories)} categories")
    elif rule.min is not None or rule.max is not None:
        parts.append(f"[{rule.min:g}, {rule.max:g}]")
    if rule.nullable:
        parts.append(f"nullable (impute {rule.impute:g})")
    return ", ".join(parts)
