"""docker-compose.yml, validated against the Compose Specification JSON schema.

The schema is the copy of compose-spec's `compose-spec.json` that the `check-jsonschema`
package vendors (check_jsonschema/builtin_schemas/vendor/compose-spec.json), so the test
runs offline; the file is read as data, not through check-jsonschema's CLI.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import jsonschema
import pytest

from tests.deploy.manifests import ROOT, SERVICES, app_image, compose, service_port

PINNED_TAG = re.compile(r"^v?\d+\.\d+\.\d+(-[\w.]+)?$")


def compose_schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(vendored.read_text())
    return schema


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    schema = compose_schema()
    assert schema.get("title") == "Compose Specification"
    # the vendored schema names draft-07 (without the trailing '#')
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(compose())
    ]
    assert not errors, "\n".join(errors)


def test_the_compose_schema_rejects_a_misspelt_key() -> None:
    broken = compose()
    broken["services"]["scorer"]["healthcheck"]["intervall"] = "1s"
    assert list(jsonschema.Draft7Validator(compose_schema()).iter_errors(broken))


def test_every_image_is_pinned_to_an_exact_version() -> None:
    for name, service in compose()["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and PINNED_TAG.match(tag), f"{name}: {image} is not an exact version"


def test_every_service_runs_from_the_one_image() -> None:
    services = compose()["services"]
    for name in SERVICES:
        service = services[name]
        assert service["image"] == app_image(), name
        assert service["build"]["context"] == "."
        assert service["command"] == ["run", name]
        assert service["user"] == "10001:10001"
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "/tmp" in service["tmpfs"]


def test_kafka_runs_in_kraft_mode_from_the_official_image() -> None:
    kafka = compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from the catalog"


@pytest.mark.parametrize("name", ["kafka", "redis", "prometheus", "grafana", *SERVICES])
def test_long_running_services_have_a_healthcheck(name: str) -> None:
    check = compose()["services"][name]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    if name in SERVICES:
        port_var = "SCOREMESH_API_PORT" if name == "query" else "SCOREMESH_METRICS_PORT"
        assert any(port_var in part and "/healthz" in part for part in check["test"]), name
        env = compose()["services"][name]["environment"]
        assert env[port_var] == str(service_port(name))


def test_services_wait_for_healthy_dependencies_and_the_topics() -> None:
    services = compose()["services"]
    for name in SERVICES:
        assert services[name]["depends_on"] == {
            "kafka": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
            "topics": {"condition": "service_completed_successfully"},
        }, name
    assert services["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}


def test_topics_job_runs_the_generated_script() -> None:
    topics = compose()["services"]["topics"]
    assert topics["image"] == compose()["services"]["kafka"]["image"]
    assert topics.get("restart") == "no"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in topics["volumes"]}
    script = topics["entrypoint"][-1]
    assert mounts[script] == "./deploy/compose/create-topics.sh"
    assert (ROOT / "deploy" / "compose" / "create-topics.sh").is_file()


def test_every_bind_mount_exists() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"


def test_query_publishes_its_api_and_passes_the_token_through() -> None:
    query = compose()["services"]["query"]
    assert query["ports"] == ["127.0.0.1:8080:8080"]
    # a bare key: taken from the caller's shell when set, else absent (routes disabled)
    assert query["environment"]["SCOREMESH_API_TOKEN"] is None


def test_stateful_services_keep_state_on_named_volumes() -> None:
    services = compose()["services"]
    for name in ("label-join", "monitor", "retrain-trigger"):
        assert f"{name}-state:/var/lib/scoremesh" in services[name]["volumes"], name
        assert f"{name}-state" in compose()["volumes"]


def test_prometheus_loads_the_alert_rules() -> None:
    volumes = compose()["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


def test_the_monitor_reads_its_paging_endpoints_from_secrets() -> None:
    doc = compose()
    monitor = doc["services"]["monitor"]
    env = monitor["environment"]
    for name, secret in (
        ("SCOREMESH_MONITOR_SLACK_WEBHOOK_URL", "slack_webhook_url"),
        ("SCOREMESH_MONITOR_PAGERDUTY_ROUTING_KEY", "pagerduty_routing_key"),
        ("SCOREMESH_MONITOR_WEBHOOK_URL", "alert_webhook_url"),
    ):
        assert env[name] == f"file:/run/secrets/{secret}"
        assert secret in monitor["secrets"]
        assert doc["secrets"][secret]["environment"].startswith("SCOREMESH_ALERT_")
    assert env["SCOREMESH_KAFKA_BOOTSTRAP"] == "kafka:9092"  # the shared settings too
