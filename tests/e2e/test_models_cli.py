"""`scoremesh models ...` against a running registry process, as an operator uses it."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from services.common.devstack import StackState
from services.common.settings import Settings
from services.trainer.datasets import CREDIT_SPEC, credit_events
from tests.helpers import cli_in_process

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(stack: StackState, tmp_path: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCOREMESH_")}
    environ.update(
        {
            f"SCOREMESH_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in stack.settings_overrides().items()
        }
    )
    environ.update(
        SCOREMESH_HOME=str(tmp_path / "home"),
        SCOREMESH_TOPIC_PREFIX=f"cli-{os.getpid()}-{time.monotonic_ns()}.",
        SCOREMESH_ARTIFACT_DIR=str(tmp_path / "artifacts"),
        SCOREMESH_METRICS_PORT="0",
    )
    return environ


@pytest.fixture
def registry(env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    from tests.conftest import ensure_topics_sync

    ensure_topics_sync(env)
    log = (tmp_path / "registry.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "run", "registry"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, (tmp_path / "registry.log").read_text()[-2000:]


def sm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return cli_in_process(env, *args)


@pytest.fixture
def files(tmp_path: Path, trained_model: Any, trained_model_b: Any) -> dict[str, Path]:
    spec = tmp_path / "spec.json"
    spec.write_text(CREDIT_SPEC.model_dump_json(indent=2))
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(trained_model.onnx)
    b.write_bytes(trained_model_b.onnx)
    data = tmp_path / "holdout.jsonl"
    data.write_bytes(
        b"\n".join(orjson.dumps({**e, "label": y}) for e, y in credit_events(1500, seed=77))
    )
    strict = tmp_path / "strict.json"
    strict.write_text(
        CREDIT_SPEC.model_copy(
            update={"gates": CREDIT_SPEC.gates.model_copy(update={"min_metrics": {"f1": 0.999}})}
        ).model_dump_json()
    )
    return {"spec": spec, "a": a, "b": b, "data": data, "strict": strict}


def test_register_promote_rollback_and_history(
    env: dict[str, str], registry: Any, files: dict[str, Path]
) -> None:
    report = sm(
        env,
        "models",
        "validate",
        str(files["a"]),
        "--spec",
        str(files["spec"]),
        "--data",
        str(files["data"]),
        "-o",
        "json",
    )
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["passed"] is True

    failing = sm(
        env,
        "models",
        "validate",
        str(files["a"]),
        "--spec",
        str(files["strict"]),
        "--data",
        str(files["data"]),
    )
    assert (
        failing.returncode == 1
        and "f1 is" in failing.stdout
        and "gate requires >= 0.999" in failing.stdout
    )

    first = sm(
        env,
        "models",
        "register",
        str(files["a"]),
        "--spec",
        str(files["spec"]),
        "--data",
        str(files["data"]),
        "--version",
        "1.0.0",
        "--stage",
        "champion",
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "registered credit@1.0.0" in first.stdout

    again = sm(
        env,
        "models",
        "register",
        str(files["a"]),
        "--spec",
        str(files["spec"]),
        "--version",
        "1.0.0",
    )
    assert again.returncode == 1 and "already exists" in again.stderr

    second = sm(
        env,
        "models",
        "register",
        str(files["b"]),
        "--spec",
        str(files["spec"]),
        "--version",
        "1.1.0",
    )
    assert second.returncode == 0, second.stderr
    dry = sm(env, "models", "promote", "credit@1.1.0", "--to", "champion", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would: promote: credit@1.1.0 registered -> champion")
    assert "cluster:" not in dry.stderr  # a dry run changes nothing
    refused = sm(env, "models", "retire", "credit@9.9.9", "--dry-run", "-o", "json")
    assert refused.returncode == 1 and json.loads(refused.stdout)["outcome"] == "refused"
    canary = sm(env, "models", "promote", "credit@1.1.0", "--to", "canary", "--percent", "20")
    assert canary.returncode == 0, canary.stderr
    assert "promote: credit@1.1.0 registered -> canary" in canary.stdout
    old = sm(env, "models", "promote", "credit", "1.1.0", "--to", "champion", "--reason", "better")
    assert old.returncode == 0 and "previous champion 1.0.0" in old.stdout
    assert "deprecated: 'models promote credit 1.1.0' is now 'models promote credit@1.1.0'" in (
        old.stderr
    )

    listed = json.loads(sm(env, "models", "list", "-o", "json").stdout)
    assert {(r["version"], r["stage"]) for r in listed} == {
        ("1.0.0", "retired"),
        ("1.1.0", "champion"),
    }
    assert yaml.safe_load(sm(env, "models", "list", "-o", "yaml").stdout) == listed
    table = sm(env, "models", "list").stdout.splitlines()
    assert table[0].split() == ["MODEL", "VERSION", "STAGE", "GEN", "SHA256"]
    assert table[1].split()[:3] == ["credit", "1.0.0", "retired"]
    assert json.loads(sm(env, "models", "list", "--json").stdout) == listed  # deprecated
    assert sm(env, "models", "list", "-m", "fraud").stdout.strip() == "no versions of fraud"

    rolled = sm(env, "models", "rollback", "credit", "--reason", "drill")
    assert rolled.returncode == 0 and "1.0.0" in rolled.stdout
    shown = json.loads(sm(env, "models", "show", "credit", "-o", "json").stdout)
    assert shown["version"] == "1.0.0" and shown["stage"] == "champion"
    assert shown["metadata"]["validation"]["passed"] is True
    assert yaml.safe_load(sm(env, "models", "show", "credit@1.1.0", "-o", "yaml").stdout)[
        "stage"
    ] == ("rolled_back")
    human = sm(env, "models", "show").stdout  # the default model's champion
    assert "credit@1.0.0" in human and "champion" in human
    missing = sm(env, "models", "show", "credit@7.0.0")
    assert missing.returncode == 1 and "no such version 'credit@7.0.0'" in missing.stderr

    history = json.loads(sm(env, "models", "history", "credit", "-o", "json").stdout)
    actions = [(e["action"], e["outcome"], e.get("to_stage")) for e in history]
    assert ("promote", "applied", "champion") in actions and (
        "rollback",
        "applied",
        "champion",
    ) in actions
    assert ("register", "refused", None) in actions  # the duplicate is audited too
    assert all(e["actor"] == "cli" for e in history)
    assert yaml.safe_load(sm(env, "models", "history", "-o", "yaml").stdout) == history
    lines = sm(env, "models", "history", "credit").stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "(UTC)", "ACTOR", "ACTION"]
    assert any(re.search(r"cli\s+rollback\s+1\.0\.0\s+.*drill$", line) for line in lines)

    # A rollout is confirmed from the serving replicas' heartbeats (serving.status).
    keys = {k[len("SCOREMESH_") :].lower(): v for k, v in env.items() if k.startswith("SCOREMESH_")}
    settings = Settings(**keys)
    asyncio.run(heartbeat(settings, "scorer/a/1/1", {"credit@1.1.0": "champion"}))
    behind = sm(env, "models", "status", "credit", "-o", "json")
    assert behind.returncode == 1
    report = json.loads(behind.stdout)
    assert report["champion"] == "credit@1.0.0" and not report["rolled_out"]
    assert report["replicas"][0]["serving"] == "credit@1.1.0"
    waited = sm(env, "models", "status", "credit", "--wait", "--timeout", "1")
    assert waited.returncode == 1 and "after 1s" in waited.stdout
    asyncio.run(heartbeat(settings, "scorer/a/1/1", {"credit@1.0.0": "champion"}))
    asyncio.run(heartbeat(settings, "scorer/b/2/1", {}, models=["fraud"]))  # not credit's
    done = sm(env, "models", "status", "credit", "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 1 replica(s) serve credit@1.0.0" in done.stdout
    assert yaml.safe_load(sm(env, "models", "status", "-o", "yaml").stdout)["rolled_out"]
    nobody = sm(env, "models", "status", "fraud")
    assert nobody.returncode == 1 and "fraud has no champion" in nobody.stdout


async def heartbeat(
    settings: Any, instance: str, serving: dict[str, str], models: list[str] | None = None
) -> None:
    from scoremesh.contract.codec import codec
    from scoremesh.contract.records import ServingStatus
    from services.common.kafka import send_one

    now = int(time.time() * 1000)
    record: ServingStatus = {
        "instance": instance,
        "service": "scorer",
        "group": "scoremesh-scorer",
        "models": models or [],
        "serving": serving,
        "failures": {},
        "state": "up",
        "started_at": now,
        "at": now,
        "interval_ms": 10_000,
    }
    value = codec(ServingStatus).encode(record)
    await send_one(
        settings, settings.topic("serving.status"), value, instance.encode(), "test-heartbeat"
    )


def test_pickles_need_explicit_trust(
    env: dict[str, str], tmp_path: Path, files: dict[str, Path]
) -> None:
    from sklearn.linear_model import LogisticRegression

    from scoremesh.contract.featurespec import Vectoriser

    pairs = list(credit_events(500, seed=3))
    x = Vectoriser(CREDIT_SPEC).transform([e["features"] for e, _ in pairs])
    clf = LogisticRegression(max_iter=500).fit(x, [int(y) for _, y in pairs])
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(clf))
    refused = sm(env, "models", "validate", str(path), "--spec", str(files["spec"]))
    assert refused.returncode == 1 and "--trust-pickle" in refused.stderr
    converted = sm(
        env,
        "models",
        "validate",
        str(path),
        "--spec",
        str(files["spec"]),
        "--trust-pickle",
        "-o",
        "json",
    )
    assert json.loads(converted.stdout)["edge_cases"]["cases"] > 0


def test_bad_inputs_get_one_line_errors(
    env: dict[str, str], tmp_path: Path, files: dict[str, Path]
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08garbage")
    bad = sm(env, "models", "validate", str(junk), "--spec", str(files["spec"]))
    assert bad.returncode == 1 and "not a loadable ONNX model" in bad.stdout + bad.stderr
    spec = tmp_path / "bad-spec.json"
    spec.write_text('{"features": [], "classes": ["0", "1"]}')
    out = sm(env, "models", "validate", str(files["a"]), "--spec", str(spec))
    assert (
        out.returncode == 1
        and "features" in out.stderr
        and len(out.stderr.strip().splitlines()) == 1
    )


def test_retrain_publishes_a_request_and_wait_says_when_no_trainer_answers(
    env: dict[str, str],
) -> None:
    from tests.conftest import ensure_topics_sync
    from tests.helpers import consume_until

    ensure_topics_sync(env)
    asked = sm(
        env,
        "models",
        "retrain",
        "credit",
        "--reason",
        "drill",
        "--window-days",
        "2",
        "--accept-recipe-code",
        "-o",
        "json",
    )
    assert asked.returncode == 0, asked.stderr
    request = json.loads(asked.stdout)
    assert request["actor"] == "cli" and request["reason"] == "manual: drill"
    assert request["window_end"] - request["window_start"] == 2 * 86_400_000
    assert request["evidence"] == {"accept_recipe_code": "true"}
    keys = {k[len("SCOREMESH_") :].lower(): v for k, v in env.items() if k.startswith("SCOREMESH_")}
    published = asyncio.run(
        consume_until(
            Settings(**keys),
            "retrain.requests",
            lambda records: any(r["request_id"] == request["request_id"] for r in records),
        )
    )
    assert request in published

    waited = sm(env, "models", "retrain", "credit", "--wait", "--timeout", "2")
    assert waited.returncode == 1
    assert (
        waited.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "is `scoremesh run trainer` running? (the request stays on retrain.requests: a "
            "trainer started later picks it up)"
        )
    )
    bad = sm(env, "models", "retrain", "credit", "--window-end", "yesterday")
    assert bad.returncode == 1 and "--window-end 'yesterday': use ISO-8601" in bad.stderr
