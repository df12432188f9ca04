"""docs/tutorial.md, run as written: every shell command in order, the Python block as a file.

The test owns the long-running pieces (the stack and `scoremesh run ...`); everything else
is executed exactly as the tutorial shows it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.devstack import StackState
from services.common.kafka import ensure_topics
from services.common.settings import Settings
from tests.helpers import ServiceProcess, service_env, wait_for_log

pytestmark = pytest.mark.e2e

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"
OWNED = ("scoremesh dev up", "scoremesh run ")  # the test starts these itself


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", TUTORIAL.read_text(), re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("sh"):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith(OWNED):
                out.append(command.rstrip("&").strip())
    return out


def python_files() -> dict[str, str]:
    """Each Python block, by the file name its first line gives (``# train.py``)."""
    return {block.splitlines()[0].removeprefix("# ").strip(): block for block in blocks("python")}


def test_tutorial_commands_are_what_the_test_runs() -> None:
    assert commands()[0] == "scoremesh models bootstrap"
    assert {"python make_data.py", "python train.py"} <= set(commands())
    assert set(python_files()) == {"make_data.py", "train.py"}
    for block in blocks("python"):
        assert "services" not in block, "the tutorial needs no project internals"


async def test_the_tutorial_works_as_written(stack: StackState, tmp_path: Path) -> None:
    settings = Settings(
        **stack.settings_overrides(),
        topic_prefix=f"tut-{os.getpid()}.",
        redis_key_prefix=f"tut{os.getpid()}:",
        artifact_dir=tmp_path / "artifacts",
    )
    env = service_env(settings)
    env.pop("PYTHONPATH", None)  # the tutorial's code imports only installed packages
    await ensure_topics(settings)
    for name, block in python_files().items():
        (tmp_path / name).write_text(block)
    services = [
        ServiceProcess(name, settings, tmp_path) for name in ("registry", "validator", "scorer")
    ]
    for service in services:
        service.start()
    try:
        for service in services:
            await wait_for_log(service, "service started")
        outputs: dict[str, str] = {}
        for command in commands():
            argv = shlex.split(command)
            argv = (
                [sys.executable, "-m", "services.cli", *argv[1:]]
                if argv[0] == "scoremesh"
                else [sys.executable, *argv[1:]]
            )
            done = subprocess.run(  # noqa: ASYNC221 - the services run in their own processes
                argv,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            outputs[command] = done.stdout
    finally:
        for service in services:
            if service.proc.poll() is None:
                service.terminate()
    validate = next(v for k, v in outputs.items() if k.startswith("scoremesh models validate"))
    assert "gates: passed" in validate
    spec_init = next(v for k, v in outputs.items() if k.startswith("scoremesh models spec init"))
    assert "wrote spec.json: 9 features, classes ['0', '1']" in spec_init
    register = next(v for k, v in outputs.items() if k.startswith("scoremesh models register"))
    assert "registered credit@2.0.0" in register and "registered -> shadow" in register
    assert "recipe trial: fitted on" in register and "TreeEnsembleClassifier" in register
    assert "without:" not in register, "holdout data and a recipe: no check is missing"
    tail = next(v for k, v in outputs.items() if k.startswith("scoremesh tail"))
    assert (
        len(tail.splitlines()) == 3
        and '"variant":"shadow"' in tail
        and '"model_version":"2.0.0"' in tail
    )
    history = outputs["scoremesh models history credit"]
    assert "2.0.0 canary -> champion (previous champion 1.0.0)" in history
    assert '"version": "1.0.0"' in outputs["scoremesh models show credit"]
