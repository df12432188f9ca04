"""Every command in README.md, docs/tutorial.md, docs/operations.md and docs/multi-model.md,
run as written.

One bash session, as a person at a terminal would type them: the ``sh`` blocks in order
(README, then the tutorial in the shell the README leaves), a line a command, background
services started with ``&`` and stopped with ``kill`` exactly as the docs do it. A
``python`` block headed ``# NAME.py`` is saved as that file where the shell is, as the
reader would. Nothing is set for the session but a home of its own (its own dev stack), a
Redis key prefix and a free API port, which the docs' commands read like any setting.

The test holds its own list of the documented commands (``SH``), of the ones it does not
run and why (``NOT_RUN``), and of the commands named in prose (``PROSE``: synopses with
placeholders, checked against the CLI's parser). When a doc's command appears,
disappears or changes, the comparison fails and shows the difference: change the docs
and these lists together.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/tutorial.md", "docs/operations.md", "docs/multi-model.md")

# --- what the docs say, as this test knows it -----------------------------------------

SH: dict[str, list[str]] = {
    "README.md": [
        "make demo",
        "make test",
        ". .venv/bin/activate",
        "mkdir -p try && cd try",
        "scoremesh dev up",
        "scoremesh run registry >registry.log 2>&1 &",
        "scoremesh run validator >validator.log 2>&1 &",
        "scoremesh run scorer >scorer.log 2>&1 &",
        "scoremesh run label-join >label-join.log 2>&1 &",
        "scoremesh run trainer >trainer.log 2>&1 &",
        "scoremesh models bootstrap",
        "scoremesh dev status",
        "scoremesh models list",
        "scoremesh models show credit -o json | jq -c "
        "'{version, stage, holdout: .metadata.holdout_metrics}'",
        "scoremesh sample --count 3000 --concept 2",
        "scoremesh events send events.jsonl",
        "scoremesh tail predictions --from-beginning --max 3 | jq -c "
        "'{event_id, model_version, variant, decision}'",
        "scoremesh tail events.rejected --from-beginning --max 1 | jq -c '{event_id, reasons}'",
        "scoremesh labels send labels.csv",
        'scoremesh models retrain credit --wait --reason "labels say the world changed"',
        "scoremesh models promote credit@1.1.0 --to canary --percent 10",
        'scoremesh models promote credit@1.1.0 --to champion --reason "better on the new labels"',
        "scoremesh models status credit --wait --timeout 60",
        'scoremesh models rollback credit --reason "drill"',
        "scoremesh models history credit",
        "scoremesh dlq replay --reason out_of_range --dry-run",
        "scoremesh forget cust-1",
        "scoremesh run query >query.log 2>&1 &",
        "curl -s --retry 30 --retry-connrefused --retry-delay 1 "
        "localhost:${SCOREMESH_API_PORT:-8080}/readyz | jq -c .ready",
        "curl -s localhost:${SCOREMESH_API_PORT:-8080}/v1/models/credit | jq -c "
        "'{champion, challengers: [.challengers[].version]}'",
        "kill $(jobs -p) && wait",
        """grep -h '"service stopped"' *.log | jq -c '{service, exit_code}'""",
        "scoremesh dev down",
    ],
    "docs/tutorial.md": [
        "scoremesh dev up",
        "scoremesh run registry >registry.log 2>&1 &",
        "scoremesh run validator >validator.log 2>&1 &",
        "scoremesh run scorer >scorer.log 2>&1 &",
        "scoremesh models bootstrap",
        "file make_data.py",
        "python make_data.py",
        "scoremesh models spec init --data train.csv --label label --out spec.json",
        "file train.py",
        "python train.py",
        "scoremesh models validate model.onnx --spec spec.json --data holdout.csv",
        "scoremesh models register model.onnx --spec spec.json --data holdout.csv "
        '--recipe train:recipe --version 2.0.0 --stage shadow --reason "random forest"',
        "scoremesh models list",
        "scoremesh events send events.jsonl",
        "scoremesh tail predictions --from-beginning --max 3 --filter variant=shadow "
        "--idle-timeout 30",
        "scoremesh models promote credit@2.0.0 --to canary --percent 20",
        'scoremesh models promote credit@2.0.0 --to champion --reason "better on live labels"',
        "scoremesh models history credit",
        'scoremesh models rollback credit --reason "tutorial drill"',
        "scoremesh models show credit",
        "kill $(jobs -p) && wait",
        "scoremesh dev down",
    ],
    "docs/operations.md": [],
    "docs/multi-model.md": [
        "scoremesh dev up",
        "scoremesh run registry >registry.log 2>&1 &",
        "scoremesh run validator >validator.log 2>&1 &",
        "SCOREMESH_MODELS=credit scoremesh run scorer >scorer-credit.log 2>&1 &",
        "SCOREMESH_MODELS=churn scoremesh run scorer >scorer-churn.log 2>&1 &",
        "scoremesh models bootstrap",
        "file churn.py",
        "python churn.py data",
        "scoremesh models spec init --data churn-train.csv --label label --out churn-spec.json",
        "python churn.py train",
        "scoremesh models register churn.onnx -m churn --spec churn-spec.json "
        "--data churn-holdout.csv --version 1.0.0 --stage champion",
        "scoremesh models list",
        "scoremesh sample --count 300 --invalid 0 --events credit-events.jsonl "
        "--labels credit-labels.csv",
        "scoremesh events send credit-events.jsonl",
        "scoremesh events send churn-events.jsonl -m churn",
        "scoremesh tail predictions --from-beginning --filter model=churn --max 3 "
        "--idle-timeout 30 | jq -c '{event_id, model, model_version, score}'",
        "scoremesh tail predictions --from-beginning --filter model=credit --max 3 "
        "--idle-timeout 30 | jq -c '{event_id, model, model_version, decision}'",
        "scoremesh models status churn --wait --timeout 60",
        "scoremesh models status credit -o json | jq -c "
        "'{champion, rolled_out, serving: [.replicas[].serving]}'",
        "kill $(jobs -p) && wait",
        "scoremesh dev down",
    ],
}

NOT_RUN: dict[str, str] = {
    "make demo": "CI runs it (`.ci/run` is a clean clone; make demo is measured there and "
    "by hand), and it builds the venv this test runs in",
    "make test": "it is the run this test is part of",
    "python example (README)": "the client library's producer and consumer examples: "
    "tests/client/test_documented_python.py runs them as written",
}

# Commands named in prose. "synopsis": has placeholders or is a fragment; its command path
# (the words before the first argument) must exist in the CLI. "ran": the same command is
# run above. Anything else: why it is not run.
RAN, SYNOPSIS = "ran", "synopsis"
PROSE: dict[str, str] = {
    "scoremesh demo --no-retrain-loop": "a second demo: `make demo` runs the full one in CI",
    "scoremesh run <service>": SYNOPSIS,
    "make demo": NOT_RUN["make demo"],
    "scoremesh dev up": RAN,
    "scoremesh dev status": RAN,
    "scoremesh labels send labels.csv": RAN,
    "scoremesh run label-join": RAN,
    "scoremesh run monitor": SYNOPSIS,
    "scoremesh monitor status": SYNOPSIS,
    "scoremesh run retrain-trigger": SYNOPSIS,
    "scoremesh run trainer": RAN,
    "scoremesh models retrain credit --wait": RAN,
    "scoremesh models register model.pkl --trust-pickle ...": SYNOPSIS,
    "scoremesh models bootstrap": RAN,
    "scoremesh models history NAME": SYNOPSIS,
    "scoremesh tail events.rejected --filter stage=validation": SYNOPSIS,
    "scoremesh dlq replay --reason CODE": SYNOPSIS,
    "pytest -m fault": "part of `make test`",
    "make test": "it is the run this test is part of",
    "make audit": "CI runs it after `make test`",
    "scoremesh dlq replay [--reason CODE] [--since ISO-TIME] [--dry-run]": SYNOPSIS,
    "scoremesh forget ENTITY_ID": SYNOPSIS,
    "scoremesh models register --trust-pickle": SYNOPSIS,
    "scoremesh --install-completion": SYNOPSIS,
    "scoremesh COMMAND --help": SYNOPSIS,
    "scoremesh tail TOPIC": SYNOPSIS,
    "scoremesh tail alerts": SYNOPSIS,  # operations.md's runbooks name these commands
    "scoremesh models retrain": SYNOPSIS,
    "scoremesh models rollback": SYNOPSIS,
    "scoremesh models history": SYNOPSIS,
    "scoremesh topics create": SYNOPSIS,
    "scoremesh models status NAME": SYNOPSIS,
    "make install": "builds the virtualenv this test runs in",
    "scoremesh events send -m churn": SYNOPSIS,
    "scoremesh models status churn": RAN,
    "scoremesh models promote churn@1.1.0 --to champion": SYNOPSIS,
    "scoremesh dlq replay -m churn --reason model_unavailable": SYNOPSIS,
}

# --- reading the docs -------------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
COMMENT = re.compile(r"\s+#\s.*$")  # a comment, as bash reads one in these lines
HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")
MENTION = re.compile(r"`((?:scoremesh|make|pytest) [^`]+)`")


@dataclass(frozen=True)
class Step:
    doc: str
    command: str  # as compared with SH: without the comment; "file NAME" for a file
    text: str  # what runs: the line(s) as written, or the file's content


def sh_commands(block: str) -> Iterator[tuple[str, str]]:
    """(command without its comment, text as written) for each command of a block."""
    lines = iter(block.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text = line
        while text.endswith("\\"):
            text += "\n" + next(lines)
        heredoc = HEREDOC.search(text)
        if heredoc:
            for body in lines:
                text += "\n" + body
                if body.strip() == heredoc.group(1):
                    break
        yield (
            COMMENT.sub("", text.splitlines()[0]).strip()
            + "".join("\n" + rest for rest in text.splitlines()[1:]),
            text,
        )


def steps(doc: str) -> list[Step]:
    out: list[Step] = []
    for lang, body in FENCE.findall((ROOT / doc).read_text()):
        if lang == "sh":
            out += [Step(doc, command, text) for command, text in sh_commands(body)]
        elif lang == "python":
            header = body.splitlines()[0]
            if re.fullmatch(r"# [\w.-]+\.py", header):
                out.append(Step(doc, f"file {header[2:]}", body))
    return out


def prose_mentions(doc: str) -> list[str]:
    text = FENCE.sub("", (ROOT / doc).read_text())
    return MENTION.findall(text)


def snippets_not_run() -> list[str]:
    """Python blocks that are not files to save: the README's consumer example."""
    found = []
    for doc in DOCS:
        for lang, body in FENCE.findall((ROOT / doc).read_text()):
            if lang == "python" and not re.fullmatch(r"# [\w.-]+\.py", body.splitlines()[0]):
                found.append(f"python example ({doc.split('/')[-1].removesuffix('.md')})")
    return found


# --- the doc lists are this test's lists -------------------------------------------------


def test_the_documented_commands_are_the_ones_this_test_handles() -> None:
    for doc in DOCS:
        assert [s.command for s in steps(doc)] == SH[doc], (
            f"{doc} changed: update SH[{doc!r}] in this test (and run it)"
        )
    mentions = [m for doc in DOCS for m in prose_mentions(doc)]
    assert sorted(set(mentions)) == sorted(PROSE), "commands in prose changed: update PROSE"
    assert snippets_not_run() == ["python example (README)"] * 2
    every_run = {c for commands in SH.values() for c in commands}
    for mention, handling in PROSE.items():
        if handling == RAN:
            assert any(c == mention or c.startswith(mention + " ") for c in every_run), mention


@pytest.mark.parametrize(
    "mention", [m for m, handling in PROSE.items() if handling == SYNOPSIS and "scoremesh" in m]
)
def test_synopses_in_prose_name_real_commands(
    mention: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli.main import main

    words = mention.split()[1:]
    path: list[str] = []
    for word in words:  # the command path: up to the first option, placeholder or file
        if word.startswith(("-", "<", "[")) or word.isupper() or "." in word:
            break
        path.append(word)
    code = main([*path, "--help"])
    shown = capsys.readouterr().out
    assert code == 0, f"{mention}: `scoremesh {' '.join(path)}` is not a command"
    assert "Usage: scoremesh" in shown
    options = [w.strip("[]") for w in words if w.strip("[]").startswith("--")]
    assert all(option in shown for option in options), (mention, shown)


# --- running them ------------------------------------------------------------------------


@dataclass
class Ran:
    command: str
    stdout: str
    stderr: str
    log: Path | None = None  # a background service's log file


class Shell:
    """A bash reading commands from a pipe: jobs, cd, `. activate` and variables persist
    between commands as at a terminal. Each command's output goes to files of its own."""

    def __init__(self, cwd: Path, env: dict[str, str], out: Path) -> None:
        self.out = out
        self.count = 0
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=(out / "shell.log").open("wb"),
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def run(self, text: str, timeout_s: float = 300) -> tuple[int, str, str, Path]:
        self.count += 1
        n = self.count
        stdout, stderr, rc = (self.out / f"{n}.{kind}" for kind in ("out", "err", "rc"))
        assert self.proc.stdin is not None
        self.proc.stdin.write(
            f"{{ {text}\n}} >{stdout} 2>{stderr}; echo $? >{rc}.tmp; mv {rc}.tmp {rc}\n"
        )
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while not rc.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the shell exited running {text!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not finish in {timeout_s:.0f}s")
            time.sleep(0.1)
        return int(rc.read_text()), stdout.read_text(), stderr.read_text(), stdout

    def cwd(self) -> Path:
        _, out, _, _ = self.run("pwd")
        return Path(out.strip())

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and what is left of its jobs
        self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def cluster_line(ran: Ran) -> None:
    assert re.match(r"cluster: Kafka 127\.0\.0\.1:\d+ from the dev stack \(", ran.stderr)


# What each command must have answered (beyond exit code 0), by doc and command.
Check = Callable[[Ran], None]


def contains(*texts: str) -> Check:
    def check(ran: Ran) -> None:
        for text in texts:
            assert text in ran.stdout, f"{ran.command}: {text!r} not in\n{ran.stdout}"

    return check


def json_lines(n: int, **fields: str) -> Check:
    def check(ran: Ran) -> None:
        records = [json.loads(line) for line in lines(ran.stdout)]
        assert len(records) == n, ran.stdout
        for record in records:
            for key, value in fields.items():
                assert record[key] == value, record

    return check


def history(*expected: str) -> Check:
    def check(ran: Ran) -> None:
        header, *rows = lines(ran.stdout)
        assert header.split()[:4] == ["TIME", "(UTC)", "ACTOR", "ACTION"], header
        for text in expected:
            assert any(re.search(text, row) for row in rows), (text, ran.stdout)

    return check


def the(doc: str, prefix: str) -> str:
    """The one command of ``doc`` that starts with ``prefix``."""
    (found,) = [c for c in SH[doc] if c.startswith(prefix)]
    return found


def stopped_cleanly(*services: str) -> Check:
    def check(ran: Ran) -> None:
        records = [json.loads(line) for line in lines(ran.stdout)]
        assert sorted(r["service"] for r in records) == sorted(services), ran.stdout
        assert {r["exit_code"] for r in records} == {0}, ran.stdout

    return check


def mutates(inner: Check) -> Check:
    def check(ran: Ran) -> None:
        cluster_line(ran)
        inner(ran)

    return check


CHECKS: dict[tuple[str, str], Check] = {
    ("README.md", "scoremesh models bootstrap"): mutates(
        contains("credit@1.0.0 trained, validated and promoted to champion")
    ),
    ("README.md", "scoremesh dev status"): contains("running: Kafka 127.0.0.1:", "registry"),
    ("README.md", "scoremesh models list"): lambda r: (
        re.search(r"credit\s+1\.0\.0\s+champion", r.stdout) or pytest.fail(r.stdout)
    ),
    ("README.md", the("README.md", "scoremesh models show credit")): lambda r: (
        json.loads(r.stdout)["holdout"]["accuracy"] > 0.85 or pytest.fail(r.stdout)
    ),
    ("README.md", "scoremesh sample --count 3000 --concept 2"): contains(
        "wrote 3000 events to events.jsonl"
    ),
    ("README.md", "scoremesh events send events.jsonl"): mutates(contains("sent 3000, failed 0")),
    ("README.md", the("README.md", "scoremesh tail predictions")): json_lines(
        3, model_version="1.0.0", variant="champion"
    ),
    ("README.md", the("README.md", "scoremesh tail events.rejected")): lambda r: (
        json.loads(r.stdout)["reasons"][0]["code"] or pytest.fail(r.stdout)
    ),
    ("README.md", "scoremesh labels send labels.csv"): mutates(contains("bad 0")),
    ("README.md", the("README.md", "scoremesh models retrain")): mutates(
        contains("succeeded: registered credit@1.1.0 in shadow", "champion")
    ),
    ("README.md", the("README.md", "scoremesh models promote credit@1.1.0 --to canary")): mutates(
        contains("promote: credit@1.1.0 shadow -> canary")
    ),
    ("README.md", the("README.md", "scoremesh models promote credit@1.1.0 --to champion")): mutates(
        contains("credit@1.1.0 canary -> champion (previous champion 1.0.0)")
    ),
    ("README.md", the("README.md", "scoremesh models rollback")): mutates(
        contains("rollback: credit@1.0.0 retired -> champion (previous champion 1.1.0)")
    ),
    ("README.md", "scoremesh models history credit"): history(
        r"bootstrap\s+register\s+1\.0\.0\s+registered",
        r"trainer\S*\s+promote\s+1\.1\.0\s+registered -> shadow\s+retrain .*labels say the world",
        r"cli\s+promote\s+1\.1\.0\s+canary -> champion .*better on the new labels$",
        r"cli\s+rollback\s+1\.0\.0\s+retired -> champion .*drill$",
    ),
    ("README.md", "scoremesh dlq replay --reason out_of_range --dry-run"): contains(
        "would replay", "out_of_range"
    ),
    ("README.md", "scoremesh forget cust-1"): contains("removed", "cust-1"),
    ("README.md", the("README.md", "curl -s --retry")): contains("true"),
    ("README.md", the("README.md", "curl -s localhost")): contains(
        '{"champion":"1.0.0","challengers":[]}'
    ),
    ("README.md", the("README.md", "grep -h")): stopped_cleanly(
        "label-join", "query", "registry", "scorer", "trainer", "validator"
    ),
    ("README.md", "scoremesh dev down"): contains("stopped: broker"),
    (
        "docs/tutorial.md",
        "scoremesh models validate model.onnx --spec spec.json --data holdout.csv",
    ): (contains("gates: passed")),
    ("docs/tutorial.md", the("docs/tutorial.md", "scoremesh models register")): mutates(
        contains("registered credit@2.0.0", "promote: credit@2.0.0 registered -> shadow")
    ),
    ("docs/tutorial.md", the("docs/tutorial.md", "scoremesh tail predictions")): json_lines(
        3, variant="shadow", model_version="2.0.0"
    ),
    ("docs/tutorial.md", "scoremesh models history credit"): history(
        r"cli\s+promote\s+2\.0\.0\s+canary -> champion \(previous champion 1\.0\.0\)\s+better on"
    ),
    ("docs/tutorial.md", "scoremesh models show credit"): lambda r: (
        (
            re.search(r"version\s+credit@1\.0\.0", r.stdout)
            and re.search(r"stage\s+champion", r.stdout)
        )
        or pytest.fail(r.stdout)
    ),
    ("README.md", "scoremesh models status credit --wait --timeout 60"): contains(
        "serve credit@1.1.0"
    ),
    ("docs/multi-model.md", the("docs/multi-model.md", "scoremesh models register")): mutates(
        contains("registered churn@1.0.0", "promote: churn@1.0.0 registered -> champion")
    ),
    ("docs/multi-model.md", "scoremesh models list"): lambda r: (
        (
            re.search(r"churn\s+1\.0\.0\s+champion", r.stdout)
            and re.search(r"credit\s+1\.0\.0\s+champion", r.stdout)
        )
        or pytest.fail(r.stdout)
    ),
    ("docs/multi-model.md", "scoremesh events send churn-events.jsonl -m churn"): mutates(
        contains("sent 100, failed 0")
    ),
    (
        "docs/multi-model.md",
        the(
            "docs/multi-model.md",
            "scoremesh tail predictions --from-beginning --filter model=churn",
        ),
    ): json_lines(3, model="churn", model_version="1.0.0"),
    (
        "docs/multi-model.md",
        the(
            "docs/multi-model.md",
            "scoremesh tail predictions --from-beginning --filter model=credit",
        ),
    ): json_lines(3, model="credit", model_version="1.0.0"),
    ("docs/multi-model.md", "scoremesh models status churn --wait --timeout 60"): contains(
        "all 1 replica(s) serve churn@1.0.0"
    ),
    ("docs/multi-model.md", the("docs/multi-model.md", "scoremesh models status credit")): contains(
        '{"champion":"credit@1.0.0","rolled_out":true,"serving":["credit@1.0.0"]}'
    ),
}


@pytest.fixture
def session(tmp_path: Path) -> Iterator[tuple[Shell, dict[str, str]]]:
    """A shell in a fresh directory next to the virtualenv, as in a fresh clone."""
    missing = [tool for tool in ("bash", "jq", "curl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the documented commands use {', '.join(missing)}: install it")
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))  # the venv `make` built, like a clone's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCOREMESH_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    env.update(
        SCOREMESH_HOME=str(tmp_path / "home"),  # its own dev stack, never the developer's
        SCOREMESH_REDIS_KEY_PREFIX=f"docs-{uuid.uuid4().hex[:8]}:",  # if Redis is shared
        SCOREMESH_API_PORT=str(free_port()),  # 8080 may be taken on a shared machine
    )
    out = tmp_path / "out"
    out.mkdir()
    shell = Shell(work, env, out)
    try:
        yield shell, env
    finally:
        shell.close()
        subprocess.run(  # whatever the docs started and a failure left running
            [sys.executable, "-m", "services.cli", "dev", "down"],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )


def test_the_documented_commands_run_as_written(session: tuple[Shell, dict[str, str]]) -> None:
    shell, _ = session
    background: list[Ran] = []
    timings: list[tuple[str, float]] = []
    for doc in DOCS:
        for step in steps(doc):
            if step.command in NOT_RUN:
                continue
            if step.command.startswith("file "):
                (shell.cwd() / step.command.split()[1]).write_text(step.text)
                continue
            if step.command.endswith("&"):  # a service, its output where the docs send it
                target = re.search(r">\s*(\S+)", step.command)
                assert target, f"{step.command}: a background service without a log file"
                background.append(Ran(step.command, "", "", shell.cwd() / target.group(1)))
            started = time.monotonic()
            rc, stdout, stderr, _ = shell.run(step.text)
            timings.append((f"{doc}: {step.command}", time.monotonic() - started))
            ran = Ran(step.command, stdout, stderr)
            assert rc == 0, f"{doc}: {step.command} exited {rc}\n{stdout[-3000:]}\n{stderr[-3000:]}"
            check = CHECKS.get((doc, step.command))
            if check is not None:
                check(ran)
    print("\n".join(f"{t:6.1f}s  {c}" for c, t in sorted(timings, key=lambda x: -x[1])[:10]))
    assert len(background) == 13  # six in the README, three in the tutorial, four for two models
    for service in background:  # the tutorial's logs replace the README's of the same name
        assert service.log is not None
        log = service.log.read_text()
        assert "Traceback" not in log, f"{service.command}:\n{log[-3000:]}"
        stopped = [json.loads(x) for x in log.splitlines() if '"service stopped"' in x]
        assert [s["exit_code"] for s in stopped] == [0], f"{service.command}:\n{log[-3000:]}"


def test_the_tutorials_python_needs_no_project_internals() -> None:
    """A user's own code imports the light client, never the services' internals."""
    text = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the tutorial has its Python files"
    for block in blocks:
        assert not re.search(r"^\s*(from|import) services\b", block, re.M), block.splitlines()[0]
