"""`scoremesh models ...`: the registry from the command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from scoremesh.contract.records import DeploymentEvent
from services.cli.target import announce_kafka
from services.common.commands import command, describe, new_command, read_history
from services.common.errors import UserError
from services.common.model_version import STAGES, VersionMetadata
from services.common.settings import Settings

STAGE_TARGETS = [s for s in STAGES if s not in ("registered", "rolled_back")]
MUTATING = frozenset({"bootstrap", "register", "promote", "rollback", "retire", "flag", "retrain"})


class CommandRefused(UserError):
    """The registry (or a readiness gate) refused; exit code 1 with its reason."""


def emit(data: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for line in lines:
            print(line)


def add_parsers(sub: Any) -> None:
    models = sub.add_parser(
        "models",
        help="the model registry",
        description="Register, validate, promote and roll back model versions.",
        epilog="example: scoremesh models promote credit 1.1.0 --to canary --percent 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    msub = models.add_subparsers(dest="action", required=True)

    def add(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = msub.add_parser(
            name, help=help_text, epilog=f"example: {example}"
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    add("bootstrap", "train and publish a first champion", "scoremesh models bootstrap")
    add("list", "every version and its stage", "scoremesh models list --json")
    p = add(
        "show",
        "one version (NAME for its champion, or NAME@VERSION)",
        "scoremesh models show credit@1.0.0",
    )
    p.add_argument("target")
    p = add("history", "the deployment log of a model", "scoremesh models history credit")
    p.add_argument("name")
    for name in ("validate", "register"):
        p = add(
            name,
            "production-readiness report" + (" then register" if name == "register" else ""),
            f"scoremesh models {name} model.onnx --spec spec.json --data holdout.jsonl"
            + (" --name credit --version 1.1.0" if name == "register" else ""),
        )
        p.add_argument(
            "file", type=Path, help="model.onnx (or a scikit-learn pickle with --trust-pickle)"
        )
        p.add_argument(
            "--spec", type=Path, required=True, help="feature spec JSON (rules, classes, gates)"
        )
        p.add_argument(
            "--data",
            type=Path,
            help="held-out labelled data the model never trained on: JSON lines or CSV with "
            "a 'label' column"
            + (
                "; its metrics, class balance and feature/score distributions become the "
                "version's monitoring baseline"
                if name == "register"
                else ""
            ),
        )
        p.add_argument(
            "--trust-pickle", action="store_true", help="accept a pickle from your own disk"
        )
        if name == "register":
            p.add_argument("--name", help="model name (default SCOREMESH_MODEL_NAME)")
            p.add_argument("--version", required=True, help="semantic version, e.g. 1.1.0")
            p.add_argument("--metadata", type=Path, help="extra metadata JSON (limitations, ...)")
            p.add_argument("--stage", choices=STAGE_TARGETS, help="promote right after registering")
            p.add_argument("--reason", default="")
            p.add_argument(
                "--recipe",
                help="how to retrain it: package.module:function (your code, fit(x, y, spec) "
                "-> estimator) or a pipeline JSON file (scikit-learn steps); trial-run now",
            )
    spec = msub.add_parser(
        "spec",
        help="feature specs: infer a first one from data",
        epilog="example: scoremesh models spec init --data train.csv --label label",
    )
    spec_sub = spec.add_subparsers(dest="spec_action", required=True)
    p = spec_sub.add_parser(
        "init",
        help="infer names, types, ranges, categories, nullability and classes from data "
        "and write spec.json to edit",
        epilog="example: scoremesh models spec init --data train.csv --label label --out spec.json",
    )
    p.add_argument("--data", type=Path, required=True, help="CSV with a header, or JSON lines")
    p.add_argument("--label", required=True, help="the label column")
    p.add_argument("--out", type=Path, default=Path("spec.json"), help="default spec.json")
    p.add_argument("--margin", type=float, default=0.1, help="ranges widened by this share")
    p.add_argument(
        "--max-categories",
        type=int,
        default=12,
        help="whole-number columns with at most this many values become categories",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add(
        "promote", "move a version to a stage", "scoremesh models promote credit 1.1.0 --to shadow"
    )
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--to", dest="stage", required=True, choices=STAGE_TARGETS)
    p.add_argument("--percent", type=float, help="canary share of entities, (0, 100]")
    p.add_argument("--reason", default="")
    p = add(
        "rollback",
        "restore the previous champion (or roll back a challenger with --version)",
        "scoremesh models rollback credit",
    )
    p.add_argument("name")
    p.add_argument("--version", help="a shadow or canary version to take out")
    p.add_argument("--reason", default="")
    p = add("retire", "take a version out of service", "scoremesh models retire credit 1.0.1")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason", default="")
    p = add(
        "retrain",
        "ask the trainer for a new version trained on recent labelled events",
        "scoremesh models retrain credit --wait",
    )
    p.add_argument("name", help="the model to retrain (its champion is the starting point)")
    p.add_argument("--reason", default="", help="why, for the deployment log")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the trainer's outcome; exit 1 unless a new version was registered",
    )
    p.add_argument(
        "--window-days",
        type=float,
        help="event-time span of the training data (default: the retrain policy's window_s)",
    )
    p.add_argument("--window-end", help="ISO-8601 end of that span (default: now)")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds --wait waits (default 600)"
    )
    p = add(
        "flag",
        "switch a challenger variant off or on instantly",
        "scoremesh models flag credit 1.1.0 --off",
    )
    p.add_argument("name")
    p.add_argument("version")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--on", dest="enabled", action="store_true")
    group.add_argument("--off", dest="enabled", action="store_false")
    p.add_argument("--reason", default="")


async def _fold(settings: Settings) -> Any:
    from services.common.registry_view import RegistryView

    view = RegistryView(settings)
    await view.start()
    await view.stop()
    return view.state


def _answer(event: DeploymentEvent, as_json: bool) -> int:
    emit(event, as_json, [describe(event)])
    if event["outcome"] != "applied":
        raise CommandRefused(describe(event))
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    action = args.action
    if action == "validate":
        return _validate(args, settings)
    if action == "spec":
        return _spec_init(args)
    settings.require_bootstrap()
    if action in MUTATING:
        announce_kafka(settings)
    if action == "bootstrap":
        from services.trainer.bootstrap import bootstrap

        result = asyncio.run(bootstrap(settings))
        emit(
            {"created": result.created, "version": result.version, "metrics": result.metrics},
            args.json,
            [result.message],
        )
        return 0
    if action == "list":
        state = asyncio.run(_fold(settings))
        rows = [
            {
                "model": v.name,
                "version": v.version,
                "stage": v.stage,
                "enabled": v.enabled,
                "generation": v.generation,
                "sha256": v.artifact_sha256[:12],
            }
            for m in state.models()
            for v in state.of_model(m)
        ]
        lines = (
            [f"{'MODEL':<16} {'VERSION':<10} {'STAGE':<12} {'GEN':<5} SHA256"]
            + [
                f"{r['model']:<16} {r['version']:<10} {r['stage'] + ('' if r['enabled'] else ' (off)'):<12} "
                f"{r['generation']:<5} {r['sha256']}"
                for r in rows
            ]
            if rows
            else ["no models registered; try: scoremesh models bootstrap"]
        )
        emit(rows, args.json, lines)
        return 0
    if action == "show":
        name, _, version = args.target.partition("@")
        state = asyncio.run(_fold(settings))
        chosen = state.versions.get(f"{name}@{version}") if version else state.champion(name)
        if chosen is None:
            known = ", ".join(v.key for v in state.of_model(name)) or "none"
            raise CommandRefused(f"no such version {args.target!r} (known: {known})")
        emit(chosen.to_json(), True, [])
        return 0
    if action == "history":
        events = asyncio.run(read_history(settings, args.name))
        lines = history_table(events) if events else [f"no history for {args.name!r}"]
        emit(events, args.json, lines)
        return 0
    if action == "register":
        return _register(args, settings)
    if action == "retrain":
        return _retrain(args, settings)
    actor = "cli"
    if action == "promote":
        options = {"percent": str(args.percent)} if args.percent is not None else {}
        cmd = new_command(
            args.name,
            "promote",
            actor,
            version=args.version,
            target_stage=args.stage,
            options=options,
            reason=args.reason,
        )
    elif action == "rollback":
        cmd = new_command(args.name, "rollback", actor, version=args.version, reason=args.reason)
    elif action == "retire":
        cmd = new_command(args.name, "retire", actor, version=args.version, reason=args.reason)
    elif action == "flag":
        cmd = new_command(
            args.name,
            "flag",
            actor,
            version=args.version,
            options={"enabled": str(args.enabled).lower()},
            reason=args.reason,
        )
    else:
        raise CommandRefused(f"unknown action {action!r}")
    return _answer(asyncio.run(command(settings, cmd)), args.json)


HISTORY_COLUMNS = ("time (utc)", "actor", "action", "version", "change", "reason")


def history_table(events: list[DeploymentEvent]) -> list[str]:
    """The deployment log for people: when, who, what (versions and stages) and why."""
    from services.common.tables import format_table

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
    return format_table(rows, HISTORY_COLUMNS, width=100).splitlines()


def _inputs(
    args: argparse.Namespace,
) -> tuple[Any, bytes, list[dict[str, Any]] | None, list[str] | None]:
    from services.common.registration import load_labelled_data, load_model_bytes, load_spec

    spec = load_spec(args.spec)
    onnx = load_model_bytes(args.file, spec, trust_pickle=args.trust_pickle)
    rows, labels = load_labelled_data(args.data, spec) if args.data else (None, None)
    return spec, onnx, rows, labels


def _print_readiness(report: dict[str, Any], failures: list[str]) -> list[str]:
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


def _validate(args: argparse.Namespace, settings: Settings) -> int:
    from services.common.readiness import validate_model

    spec, onnx, rows, labels = _inputs(args)
    result = validate_model(onnx, spec, rows, labels)
    emit(result.report, args.json, _print_readiness(result.report, result.failures))
    if not result.passed:
        raise CommandRefused("readiness gates not met: " + "; ".join(result.failures))
    return 0


def _register(args: argparse.Namespace, settings: Settings) -> int:
    from services.common.registration import OperationError, register_version

    spec, onnx, rows, labels = _inputs(args)
    metadata = VersionMetadata()
    if args.metadata:
        try:
            metadata = VersionMetadata.model_validate_json(args.metadata.read_bytes())
        except (OSError, ValueError) as exc:
            raise OperationError(f"{args.metadata}: not valid metadata JSON: {exc}") from None
    recipe = None
    if args.recipe:
        import os

        from services.common.recipes import recipe_from_argument

        # Like uvicorn's --app-dir: a recipe module in the current directory is found.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        recipe = recipe_from_argument(args.recipe)
    name = args.name or settings.model_name
    result = asyncio.run(
        register_version(
            settings,
            name,
            args.version,
            onnx,
            spec,
            metadata=metadata,
            rows=rows,
            labels=labels,
            actor="cli",
            reason=args.reason,
            stage=args.stage,
            recipe=recipe,
        )
    )
    lines = _print_readiness(result.readiness.report, result.readiness.failures)
    if result.recipe_trial is not None:
        trial = result.recipe_trial
        lines.append(
            f"recipe trial: fitted on {trial['rows']} rows ({trial['data']}) in "
            f"{trial['fit_s']:.2f}s, converted ({trial['onnx_bytes']} bytes: "
            f"{', '.join(trial['operators'])}), scored in onnxruntime"
        )
    lines += [f"without: {gap}" for gap in result.gaps]
    if not result.readiness.passed:
        emit({"readiness": result.readiness.report, "outcome": result.outcome}, args.json, lines)
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
        args.json,
        lines,
    )
    for event in (outcome, result.promotion):
        if event is not None and event["outcome"] != "applied":
            raise CommandRefused(describe(event))
    return 0


def _retrain(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from services.cli.stream import parse_time
    from services.common.retraining import (
        RetrainTimeout,
        manual_request,
        publish_request,
        wait_for_result,
    )

    now = int(time.time() * 1000)
    end = parse_time(args.window_end, "--window-end") or now
    if args.window_days is not None and args.window_days <= 0:
        raise CommandRefused(f"--window-days must be positive, got {args.window_days}")
    window_s = args.window_days * 86400 if args.window_days else settings.retrain.policy.window_s
    request = manual_request(args.name, "cli", args.reason, end, window_s, now)
    asyncio.run(publish_request(settings, request))
    lines = [
        f"retrain requested: {request['request_id']} ({args.name}, events from "
        f"{_when(request['window_start'])} to {_when(request['window_end'])})"
    ]
    if not args.wait:
        follow = (
            "its outcome: scoremesh tail retrain.results --from-beginning "
            f"--filter request_id={request['request_id']}"
        )
        emit(request, args.json, [*lines, follow])
        return 0
    print(lines[0], file=sys.stderr)  # now, not after the wait; stdout gets the outcome

    def progress(result: dict[str, Any]) -> None:
        if result["status"] == "started":
            print(
                f"trainer {result['trainer']} started it (attempt {result['attempt']})",
                file=sys.stderr,
            )

    try:
        result = asyncio.run(
            wait_for_result(settings, request["request_id"], args.timeout, on_progress=progress)
        )
    except RetrainTimeout as exc:
        raise CommandRefused(str(exc)) from None
    lines.append(f"{result['status']}: {result['detail']}")
    if result["metrics"]:
        lines.append(
            "on the most recent events: "
            + ", ".join(
                f"{k} {v:.3f} (champion {result['champion_metrics'].get(k, float('nan')):.3f})"
                for k, v in sorted(result["metrics"].items())
            )
        )
    emit({"request": request, "result": result}, args.json, lines[1:])
    if result["status"] != "succeeded":
        raise CommandRefused(f"retrain {result['status']}: {result['detail']}")
    return 0


def _spec_init(args: argparse.Namespace) -> int:
    from services.common.spec_inference import spec_from_file

    if args.out.exists() and not args.force:
        raise CommandRefused(f"{args.out} exists; edit it, or pass --force to replace it")
    inferred = spec_from_file(args.data, args.label, args.margin, args.max_categories)
    args.out.write_text(inferred.spec.model_dump_json(indent=2, exclude_defaults=True) + "\n")
    spec = inferred.spec
    lines = [
        f"wrote {args.out}: {len(spec.features)} features, classes {spec.classes} "
        f"(positive {spec.positive!r}) from {inferred.rows} rows of {args.data.name}",
        *[f"  {rule.name}: {_describe_rule(rule)}" for rule in spec.features],
        "check, then edit:",
        *[f"  - {note}" for note in inferred.notes],
        "schema: schemas/featurespec.schema.json; next: scoremesh models validate "
        f"MODEL.onnx --spec {args.out} --data HOLDOUT",
    ]
    emit(
        {
            "spec": orjson.loads(spec.model_dump_json()),
            "notes": inferred.notes,
            "out": str(args.out),
        },
        args.json,
        lines,
    )
    return 0


def _describe_rule(rule: Any) -> str:
    parts = [rule.dtype]
    if rule.categories:
        parts.append(f"{len(rule.categories)} categories")
    elif rule.min is not None or rule.max is not None:
        parts.append(f"[{rule.min:g}, {rule.max:g}]")
    if rule.nullable:
        parts.append(f"nullable (impute {rule.impute:g})")
    return ", ".join(parts)


def _when(ms: int) -> str:
    """Epoch milliseconds as people read them (UTC, to the second)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
