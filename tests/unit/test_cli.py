"""The CLI without a broker: start-up imports, help on everything, exit codes, the previous
release's spellings, output formats of the commands that need no cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import deprecated
from services.cli.main import app, main

HEAVY = ("onnxruntime", "sklearn", "river", "aiokafka", "numpy", "services.common.settings")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["tail", "--help"]])
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    """In a fresh interpreter, as the console script starts."""
    code = (
        f"import sys; from services.cli.main import main; rc = main({argv!r}); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]
    assert "Usage: scoremesh" in done.stdout


def commands() -> list[tuple[str, Any]]:
    import typer.main

    found: list[tuple[str, Any]] = []

    def walk(prefix: str, command: Any) -> None:
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(f"{prefix} {name}", sub)
        else:
            found.append((prefix.strip(), command))

    walk("", typer.main.get_command(app))
    return found


def test_every_command_and_argument_has_help_and_examples() -> None:
    listed = commands()
    assert len(listed) >= 28
    for path, command in listed:
        assert command.help, f"scoremesh {path}: no help"
        assert command.epilog and "scoremesh " in command.epilog, f"scoremesh {path}: no example"
        for param in command.params:
            if param.name in ("help",):
                continue
            assert getattr(param, "help", None), f"scoremesh {path}: {param.name} has no help"


def test_every_read_command_has_output_formats() -> None:
    for path, command in commands():
        if path.split()[0] == "run" or path == "demo":
            continue
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"-o", "--output"} <= options, f"scoremesh {path} has no -o"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope"], "No such command"),
        (["models", "list", "--bogus"], "No such option"),
        (["tail"], "Missing argument"),
        (["models", "promote", "credit", "--to", "canary"], "names a model, not a version"),
        (["models", "promote", "credit@1.x", "--to", "canary"], "MAJOR.MINOR.PATCH"),
        (["models", "retire", "Credit@1.0.0"], "a model name is lower-case"),
        (["models", "list", "-m", "no spaces"], "a model name is lower-case"),
        (["models", "list", "-o", "xml"], "'xml' is not one of"),
        (["models", "promote", "credit@1.0.0", "--to", "nowhere"], "'nowhere' is not one of"),
        (["models", "retrain", "--window-days", "0"], "--window-days must be positive"),
        (["sample", "--count", "0"], "--count"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    assert message in err, err


def test_failures_exit_1_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SCOREMESH_HOME", str(tmp_path))  # no dev stack here
    monkeypatch.delenv("SCOREMESH_KAFKA_BOOTSTRAP", raising=False)
    code, _, err = run(["models", "list"], capsys)
    assert code == 1 and err.startswith("scoremesh: no Kafka broker configured"), err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(["events", "send", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 1 and "cannot read" in err
    code, _, err = run(["--bootstrap-server", "", "models", "list"], capsys)
    assert code == 1


def test_a_global_flag_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.cli.context import load_settings, set_flags
    from services.cli.target import origin

    monkeypatch.setenv("SCOREMESH_HOME", str(tmp_path))
    monkeypatch.setenv("SCOREMESH_KAFKA_BOOTSTRAP", "env-host:9092")
    set_flags(kafka_bootstrap="flag-host:9092")
    try:
        settings = load_settings()
        assert settings.kafka_bootstrap == "flag-host:9092"
        assert origin(settings, "kafka_bootstrap") == "from --bootstrap-server"
    finally:
        set_flags()
    assert origin(load_settings(), "kafka_bootstrap") == "from SCOREMESH_KAFKA_BOOTSTRAP"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["models", "list", "--json"], ["models", "list", "-o", "json"]),
        (
            ["models", "promote", "credit", "1.1.0", "--to", "canary", "--percent", "10"],
            ["models", "promote", "credit@1.1.0", "--to", "canary", "--percent", "10"],
        ),
        (
            ["models", "promote", "--reason", "x y", "credit", "1.1.0", "--to", "champion"],
            ["models", "promote", "--reason", "x y", "credit@1.1.0", "--to", "champion"],
        ),
        (["models", "retire", "credit", "1.0.1"], ["models", "retire", "credit@1.0.1"]),
        (
            ["models", "flag", "credit", "1.1.0", "--off"],
            ["models", "flag", "credit@1.1.0", "--off"],
        ),
        (
            ["models", "rollback", "credit", "--version", "1.1.0", "--reason", "r"],
            ["models", "rollback", "credit@1.1.0", "--reason", "r"],
        ),
        (
            ["models", "rollback", "--version", "1.1.0", "credit"],
            ["models", "rollback", "credit@1.1.0"],
        ),
        (
            ["models", "register", "m.onnx", "--name", "fraud", "--version", "1.0.0"],
            ["models", "register", "m.onnx", "-m", "fraud", "--version", "1.0.0"],
        ),
        (
            ["--bootstrap-server", "k:9092", "models", "retire", "credit", "1.0.1", "--json"],
            ["--bootstrap-server", "k:9092", "models", "retire", "credit@1.0.1", "-o", "json"],
        ),
    ],
)
def test_the_previous_spellings_are_rewritten_with_a_notice(
    old: list[str], new: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert deprecated.rewrite(old) == new
    err = capsys.readouterr().err
    assert "deprecated" in err and "the next release" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "promote", "credit@1.1.0", "--to", "canary"],
        ["models", "rollback", "credit"],
        ["models", "history", "credit"],
        ["tail", "predictions", "--filter", "a=b", "--", "--json"],
        ["events", "send", "e.jsonl", "-o", "json"],
    ],
)
def test_todays_spellings_are_left_alone(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert deprecated.rewrite(argv) == argv
    assert capsys.readouterr().err == ""


def test_sample_in_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sample", "--count", "50", "--events", str(tmp_path / "e"), "--labels"]
    code, out, _ = run([*base, str(tmp_path / "l"), "-o", "json"], capsys)
    assert code == 0 and json.loads(out)["count"] == 50
    code, out, _ = run([*base, str(tmp_path / "l"), "-o", "yaml"], capsys)
    assert code == 0 and yaml.safe_load(out)["count"] == 50
    code, out, _ = run([*base, str(tmp_path / "l")], capsys)
    assert code == 0 and out.startswith("wrote 50 events")
    code, out, err = run([*base, str(tmp_path / "l"), "--json"], capsys)
    assert code == 0 and json.loads(out)["count"] == 50 and "deprecated" in err


def test_events_are_read_by_the_one_input_reader() -> None:
    from services.cli.stream import parse_events

    csv_text = (
        "event_id,entity_id,event_time,model,attr.region,age,name\n007,c1,1000,fraud,eu,61,x\n"
    )
    parsed = parse_events(csv_text, "auto", "e.csv")
    ((line, event),) = parsed.events
    assert line == 2 and event["event_id"] == "007" and event["event_time"] == 1000
    assert event["model"] == "fraud" and event["attributes"] == {"region": "eu"}
    assert event["features"] == {"age": 61, "name": "x"}
    short = parse_events("event_id,entity_id,age\ne1,c1\n", "csv")
    assert short.bad == [(2, "1 fewer fields than the header: 2 columns, the header has 3")]
    bad = parse_events('{"event_id": "e", "entity_id": "c", "features": {}, "model": 3}\n', "auto")
    assert bad.bad[0][1].startswith("model must be a string")


@pytest.mark.parametrize(
    ("text", "record", "holds"),
    [
        ("features.age>60", {"features": {"age": 61}}, True),
        ("features.age>60", {"features": {"age": 60}}, False),
        ("features.age>=60", {"features": {"age": 60.0}}, True),
        ("features.age<60", {"features": {"age": "young"}}, False),
        ("features.age>60", {"features": {}}, False),
        ("variant=shadow", {"variant": "shadow"}, True),
        ("variant!=shadow", {"variant": "champion"}, True),
        ("variant!=shadow", {}, True),
        ("enabled=true", {"enabled": True}, True),
        ("model=null", {"model": None}, True),
        ("reasons~out_of_range", {"reasons": [{"code": "out_of_range"}]}, True),
        ("a.b.c=1", {"a": {"b": {"c": 1}}}, True),
    ],
)
def test_tail_filters_on_nested_fields(text: str, record: dict[str, Any], holds: bool) -> None:
    from services.cli.tail import parse_filter

    assert parse_filter(text)(record) is holds


def test_a_bad_tail_filter_says_how_to_write_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["tail", "predictions", "--filter", "age"], capsys)
    assert code == 1 and "write FIELD OP VALUE" in err


@pytest.mark.parametrize(
    ("words", "expected"),
    [("scoremesh models pro", "promote"), ("scoremesh tail pred", "predictions")],
)
def test_shell_completion(words: str, expected: str) -> None:
    env = {
        **os.environ,
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
        "_SCOREMESH_COMPLETE": "complete_bash",
    }
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from services.cli.main import main; sys.exit(main())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout.split()


@pytest.mark.parametrize(
    ("target", "model", "version", "expected"),
    [
        ("credit@1.1.0", None, True, ("credit", "1.1.0")),
        ("1.1.0", "fraud", True, ("fraud", "1.1.0")),
        ("1.1.0", None, True, ("credit", "1.1.0")),  # the default model
        (None, "fraud", False, ("fraud", None)),
        ("fraud", None, False, ("fraud", None)),
        (None, None, None, ("credit", None)),
        ("fraud@2.0.0", "fraud", None, ("fraud", "2.0.0")),
    ],
)
def test_one_rule_names_the_model_and_version_of_every_command(
    target: str | None, model: str | None, version: bool | None, expected: tuple[str, str | None]
) -> None:
    from services.cli.context import resolve
    from services.common.settings import Settings

    ref = resolve(target, model, Settings.model_validate({}), version=version)
    assert (ref.name, ref.version) == expected


@pytest.mark.parametrize(
    ("target", "model", "version", "message"),
    [
        ("credit@1.1.0", "fraud", None, "not of -m 'fraud'"),
        ("credit", None, True, "names a model, not a version"),
        (None, "fraud", True, "name a version"),
        ("credit@1.1.0", None, False, "name a model here"),
        ("Bad!", None, None, "a model name is lower-case"),
    ],
)
def test_a_name_that_cannot_mean_anything_is_a_usage_error(
    target: str | None, model: str | None, version: bool | None, message: str
) -> None:
    from services.cli.context import UsageProblem, resolve
    from services.common.settings import Settings

    with pytest.raises(UsageProblem, match=message):
        resolve(target, model, Settings.model_validate({}), version=version)


@pytest.mark.parametrize(
    "command",
    [
        "history",
        "status",
        "show",
        "rollback",
        "retrain",
        "promote",
        "retire",
        "flag",
        "list",
        "register",
        "bootstrap",
    ],
)
def test_every_model_command_takes_dash_m(command: str) -> None:
    import typer.main

    models: Any = typer.main.get_command(app).commands["models"]  # type: ignore[attr-defined]
    options = {o for p in models.commands[command].params for o in p.opts}
    assert {"-m", "--model"} <= options, command
