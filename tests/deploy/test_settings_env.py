"""Every SCOREMESH_* variable the deployment sets is a field of the one Settings model,
and the values each service gets there are ones Settings accepts."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import ENV_PREFIX, Settings, default_home, env_names
from tests.deploy.manifests import (
    ROOT,
    SERVICES,
    TARGETS,
    compose,
    render,
    settings_configmap,
    workloads,
)

FIELDS = env_names()

PROCESS_LEVEL = {"SCOREMESH_HOME"}
"""Read by services.common.settings.default_home() before the model exists (where the
dev-stack file and default directories live), so not a field; checked below."""


def _compose_env() -> dict[str, dict[str, Any]]:
    return {
        name: dict(service.get("environment") or {})
        for name, service in compose()["services"].items()
    }


def _k8s_env(target: str) -> dict[str, dict[str, Any]]:
    """Per workload: the settings ConfigMap plus the container's own env (secrets as None)."""
    docs = render(target)
    shared = settings_configmap(docs)
    env: dict[str, dict[str, Any]] = {}
    for doc in workloads(docs):
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        own = {e["name"]: e.get("value") for e in container.get("env", [])}
        uses_settings = any(
            ref.get("configMapRef", {}).get("name", "").startswith("scoremesh-settings")
            for ref in container.get("envFrom", [])
        )
        env[doc["metadata"]["name"]] = {**(shared if uses_settings else {}), **own}
    return env


def _dockerfile_env() -> set[str]:
    return set(re.findall(r"\b(SCOREMESH_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text()))


def _script_env() -> set[str]:
    text = (ROOT / "deploy" / "compose" / "create-topics.sh").read_text()
    return set(re.findall(r"\$\{(SCOREMESH_[A-Z0-9_]+)", text))


def _all_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {
        "Dockerfile": _dockerfile_env(),
        "deploy/compose/create-topics.sh": _script_env(),
        "k8s/base/settings.env": {
            line.split("=", 1)[0]
            for line in (ROOT / "k8s" / "base" / "settings.env").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        },
    }
    for name, env in _compose_env().items():
        names[f"docker-compose.yml {name}"] = set(env)
    for target in TARGETS:
        for name, env in _k8s_env(target).items():
            names[f"k8s {target} {name}"] = set(env)
    return names


def test_every_scoremesh_variable_is_a_settings_field() -> None:
    unknown = {
        where: sorted(n for n in names if n.startswith(ENV_PREFIX) and n not in FIELDS)
        for where, names in _all_names().items()
    }
    unknown = {where: names for where, names in unknown.items() if set(names) - PROCESS_LEVEL}
    assert not unknown, f"not in services/common/settings.py Settings: {unknown}"


def test_process_level_variables_are_really_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SCOREMESH_HOME", str(tmp_path))
    assert default_home() == tmp_path


def _settings_from(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SCOREMESH_IGNORE_DEV_STACK", "1")
    for name, value in env.items():
        if value is not None:  # secrets and pass-through variables: absent here
            monkeypatch.setenv(name, str(value))
    return Settings()


@pytest.mark.parametrize("target", TARGETS)
def test_k8s_settings_parse_for_every_service(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    envs = _k8s_env(target)
    for service in SERVICES:
        with monkeypatch.context() as m:
            settings = _settings_from(envs[service], m)
        assert settings.kafka_bootstrap, service
        assert settings.kafka_security_protocol == "SASL_SSL"
        assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
        assert settings.kafka_sasl_username == f"scoremesh-{service}"
        assert settings.kafka_ssl_cafile is not None
        assert settings.redis_url == "redis://redis:6379/0"
        assert str(settings.artifact_dir).startswith("/var/lib/scoremesh")
        assert settings.kafka_idempotence is True


def test_compose_settings_parse_for_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    envs = _compose_env()
    for service in SERVICES:
        with monkeypatch.context() as m:
            settings = _settings_from(envs[service], m)
        assert settings.kafka_bootstrap == "kafka:9092", service
        assert settings.redis_url == "redis://redis:6379/0", service
        assert settings.kafka_security_protocol == "PLAINTEXT"
        assert settings.kafka_idempotence is True, "Apache Kafka supports idempotence"


@pytest.mark.parametrize("target", ["compose", *TARGETS])
def test_the_label_join_keeps_its_disk_store_on_its_persistent_volume(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scoremesh run label-join` uses the disk store; its data_dir must be on the volume
    that outlives the container, or every restart rebuilds the state from the changelog."""
    if target == "compose":
        service = compose()["services"]["label-join"]
        env = _compose_env()["label-join"]
        persistent = [v.split(":")[1] for v in service["volumes"] if not v.startswith(".")]
    else:
        docs = render(target)
        env = _k8s_env(target)["label-join"]
        (sts,) = [d for d in workloads(docs) if d["metadata"]["name"] == "label-join"]
        assert sts["kind"] == "StatefulSet"
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        persistent = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
    with monkeypatch.context() as m:
        settings = _settings_from(env, m)
    assert settings.label_join.store == "disk"
    data_dir = str(settings.label_join.data_dir)
    assert any(data_dir.startswith(mount.rstrip("/") + "/") for mount in persistent), (
        f"{target}: label-join data_dir {data_dir} is not on a persistent volume {persistent}"
    )
