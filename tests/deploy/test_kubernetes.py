"""The k8s manifests, as `kubectl kustomize` renders base and each overlay.

Kubernetes kinds are validated against the official JSON schemas of Kubernetes
KUBERNETES_VERSION bundled in the `kubernetes-validate` package (strict: unknown fields
fail); Strimzi kinds against tests/deploy/schemas/strimzi-v1beta2 (see its README).
The rest asserts the deployment rules: probes, limits, security context, grace period,
autoscaling, partition bounds, secrets and network policies.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from referencing import Registry, Resource

from scoremesh.contract.catalog import catalog
from tests.deploy.manifests import (
    AUTOSCALED,
    KUBERNETES_VERSION,
    OVERLAYS,
    PRIMARY_INPUT,
    REDIS_CLIENTS,
    SCHEMAS,
    SERVICES,
    TARGETS,
    app_image,
    load_json,
    of_kind,
    render,
    service_port,
    settings_configmap,
    workloads,
)

Doc = dict[str, Any]
STRIMZI_KINDS = {
    "Kafka": "kafka.json",
    "KafkaNodePool": "kafkanodepool.json",
    "KafkaTopic": "kafkatopic.json",
    "KafkaUser": "kafkauser.json",
}


@cache
def strimzi_validator(kind: str) -> jsonschema.protocols.Validator:
    folder = SCHEMAS / "strimzi-v1beta2"
    resources = [
        (schema["$id"], Resource.from_contents(schema))
        for schema in (load_json(path) for path in sorted(folder.glob("*.json")))
    ]
    schema = load_json(folder / STRIMZI_KINDS[kind])
    return jsonschema.Draft202012Validator(schema, registry=Registry().with_resources(resources))


def describe(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def container(doc: Doc) -> Doc:
    containers: list[Doc] = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{describe(doc)}: one container per pod"
    return containers[0]


def env_of(doc: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container(doc).get("env", [])}


def services_in(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    by_name = {d["metadata"]["name"]: d for d in workloads(docs)}
    missing = set(SERVICES) - set(by_name)
    assert not missing, f"no workload for {sorted(missing)}"
    return {name: by_name[name] for name in SERVICES}


# --- schemas -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_resource_is_valid_against_its_schema(target: str) -> None:
    errors = []
    for doc in render(target):
        if doc["apiVersion"].startswith("kafka.strimzi.io/"):
            assert doc["kind"] in STRIMZI_KINDS, f"no schema for {describe(doc)}"
            for err in strimzi_validator(doc["kind"]).iter_errors(doc):
                path = ".".join(str(p) for p in err.absolute_path)
                errors.append(f"{describe(doc)}: {path}: {err.message}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            errors.append(f"{describe(doc)}: {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            errors.append(f"{describe(doc)}: {err.message}")
    assert not errors, "\n".join(errors)


def test_the_schemas_reject_a_broken_resource() -> None:
    """The validators are live: a misspelt field and a wrong enum both fail."""
    deployment = dict(of_kind(render("base"), "Deployment")["scorer"])
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    user = of_kind(render("base"), "KafkaUser")["scoremesh-scorer"]
    broken = {**user, "spec": {**user["spec"], "authentication": {"type": "scram-sha-256"}}}
    assert list(strimzi_validator("KafkaUser").iter_errors(broken))


# --- overlays ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_puts_everything_in_its_namespace(overlay: str) -> None:
    docs = render(overlay)
    namespaces = of_kind(docs, "Namespace")
    assert len(namespaces) == 1
    (name,) = namespaces
    assert name.startswith("scoremesh")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == name, describe(doc)
    assert (
        len({name for overlay in OVERLAYS for name in of_kind(render(overlay), "Namespace")}) == 3
    )


def test_dev_runs_one_replica_of_everything_without_autoscaling() -> None:
    docs = render("dev")
    assert not of_kind(docs, "HorizontalPodAutoscaler")
    for doc in workloads(docs):
        assert doc["spec"].get("replicas") == 1, describe(doc)
    (pool,) = of_kind(docs, "KafkaNodePool").values()
    assert pool["spec"]["replicas"] == 1
    (kafka,) = of_kind(docs, "Kafka").values()
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == 1
    assert config["min.insync.replicas"] == 1
    assert config["offsets.topic.replication.factor"] == 1
    for topic in of_kind(docs, "KafkaTopic").values():
        assert topic["spec"]["replicas"] == 1, describe(topic)
        assert topic["spec"]["config"]["min.insync.replicas"] == "1", describe(topic)


@pytest.mark.parametrize("target", ["staging", "prod"])
def test_staging_and_prod_topics_are_the_catalog(target: str) -> None:
    topics = of_kind(render(target), "KafkaTopic")
    assert set(topics) == set(catalog())
    for name, spec in catalog().items():
        topic = topics[name]["spec"]
        assert topic["topicName"] == name
        assert topic["partitions"] == spec.partitions
        assert topic["replicas"] == spec.replication_factor == 3
        assert topic["config"] == spec.configs
        assert topic["config"]["min.insync.replicas"] == "2"
    (pool,) = of_kind(render(target), "KafkaNodePool").values()
    assert pool["spec"]["replicas"] >= 3, "replication 3 needs three brokers"


def test_prod_runs_more_than_staging() -> None:
    def capacity(target: str) -> int:
        docs = render(target)
        replicas = sum(int(d["spec"].get("replicas", 0)) for d in workloads(docs))
        hpas = of_kind(docs, "HorizontalPodAutoscaler")
        return replicas + sum(int(h["spec"]["minReplicas"]) for h in hpas.values())

    assert capacity("dev") < capacity("staging") < capacity("prod")


@pytest.mark.parametrize("target", TARGETS)
def test_replicas_never_exceed_the_partitions_they_consume(target: str) -> None:
    docs = render(target)
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    for service, doc in services_in(docs).items():
        most = hpas[service]["spec"]["maxReplicas"] if service in hpas else doc["spec"]["replicas"]
        topic = PRIMARY_INPUT[service]
        if topic is None and service != "query":
            assert most == 1, f"{target}: {service} must run exactly one replica"
        elif topic is not None:
            bound = catalog()[topic].partitions
            assert most <= bound, f"{target}: {service} up to {most} > {topic}'s {bound}"


def test_prod_gives_each_label_join_replica_the_core_its_sizing_assumes() -> None:
    """scripts/bench_label_join.py decides whether the join keeps up with a scorer process by
    timing --scale-out 3 processes with a core each: prod's replicas, each promised a core."""
    (join,) = [d for d in workloads(render("prod")) if d["metadata"]["name"] == "label-join"]
    assert join["spec"]["replicas"] == 3
    (container,) = join["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"] in ("1", 1, "1000m")


# --- workloads ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_service_runs_from_the_pinned_image_with_its_command(target: str) -> None:
    for service, doc in services_in(render(target)).items():
        assert doc["kind"] == SERVICES[service], service
        c = container(doc)
        assert c["image"] == app_image(), service
        assert c["args"] == ["run", service]
        assert [p["containerPort"] for p in c["ports"]] == [service_port(service)]


@pytest.mark.parametrize("target", TARGETS)
def test_no_image_floats(target: str) -> None:
    for doc in workloads(render(target)):
        image = container(doc)["image"]
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{describe(doc)}: {image} is not pinned"
        assert re.fullmatch(r"\d+\.\d+\.\d+(-[\w.]+)?(@sha256:[0-9a-f]{64})?", tag), image


@pytest.mark.parametrize("target", TARGETS)
def test_pods_are_locked_down(target: str) -> None:
    docs = render(target)
    accounts = of_kind(docs, "ServiceAccount")
    for doc in workloads(docs):
        pod = doc["spec"]["template"]["spec"]
        what = describe(doc)
        assert pod["automountServiceAccountToken"] is False, what
        account = accounts[pod["serviceAccountName"]]
        assert account["automountServiceAccountToken"] is False, what
        assert pod["securityContext"]["runAsNonRoot"] is True, what
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, what
        c = container(doc)
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, what
        assert sc["readOnlyRootFilesystem"] is True, what
        assert sc["runAsNonRoot"] is True, what
        assert sc["capabilities"] == {"drop": ["ALL"]}, what
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, what
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{what}: {bound}"


@pytest.mark.parametrize("target", TARGETS)
def test_services_have_probes_writable_dirs_and_time_to_stop(target: str) -> None:
    docs = render(target)
    settings = settings_configmap(docs)
    deadline = float(settings["SCOREMESH_SHUTDOWN_DEADLINE_S"])
    writable_dirs = {
        "/tmp",
        settings["SCOREMESH_HOME"],
        settings["SCOREMESH_ARTIFACT_DIR"],
    }
    for service, doc in services_in(docs).items():
        c = container(doc)
        pod = doc["spec"]["template"]["spec"]
        port = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe, path in (
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
            ("startupProbe", "/healthz"),
        ):
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{service} {probe}"
            assert port[get["port"]] == service_port(service), f"{service} {probe}"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for wanted in writable_dirs:
            owner = max((m for m in mounts if wanted.startswith(m)), key=len, default=None)
            assert owner is not None, f"{service}: {wanted} is on the read-only root"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], service
        home = mounts[settings["SCOREMESH_HOME"]]
        if doc["kind"] == "StatefulSet":
            assert home in claims, f"{service} keeps its state on a persistent volume"
        else:
            assert "emptyDir" in volumes[home], service
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= deadline + pre_stop + 5, (
            f"{service}: {grace}s grace < SCOREMESH_SHUTDOWN_DEADLINE_S {deadline:g}s "
            f"+ preStop {pre_stop}s + 5s margin"
        )


@pytest.mark.parametrize("target", TARGETS)
def test_each_service_has_account_service_and_disruption_budget(target: str) -> None:
    docs = render(target)
    k8s_services = of_kind(docs, "Service")
    budgets = of_kind(docs, "PodDisruptionBudget")
    for service, doc in services_in(docs).items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["template"]["spec"]["serviceAccountName"] == service
        svc = k8s_services[service]["spec"]
        assert svc["selector"].items() <= labels.items(), service
        assert [p["port"] for p in svc["ports"]] == [service_port(service)]
        if doc["kind"] == "StatefulSet":
            assert doc["spec"]["serviceName"] == service
            assert svc.get("clusterIP") == "None", f"{service}: headless for its StatefulSet"
        pdb = budgets[service]["spec"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items(), service
        assert pdb.get("maxUnavailable") == 1, f"{service}: a budget that never blocks a drain"


@pytest.mark.parametrize("target", TARGETS)
def test_scrape_annotations_point_at_the_metrics_port(target: str) -> None:
    for service, doc in services_in(render(target)).items():
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", service
        assert annotations["prometheus.io/port"] == str(service_port(service)), service
        assert annotations["prometheus.io/path"] == "/metrics", service


@pytest.mark.parametrize("target", ["base", "staging", "prod"])
def test_scorer_and_query_scale_on_cpu(target: str) -> None:
    docs = render(target)
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == set(AUTOSCALED)
    for name, hpa in hpas.items():
        spec = hpa["spec"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        (metric,) = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
        # the HPA owns the replica count; a fixed one in the Deployment would fight it
        assert "replicas" not in of_kind(docs, "Deployment")[name]["spec"]


# --- Kafka access ------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_each_service_logs_in_as_its_own_kafka_user(target: str) -> None:
    docs = render(target)
    users = of_kind(docs, "KafkaUser")
    settings = settings_configmap(docs)
    assert settings["SCOREMESH_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert settings["SCOREMESH_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert settings["SCOREMESH_KAFKA_BOOTSTRAP"].endswith(":9093")
    for service, doc in services_in(docs).items():
        env = env_of(doc)
        user = env["SCOREMESH_KAFKA_SASL_USERNAME"]["value"]
        assert user in users, f"{service}: no KafkaUser {user}"
        assert users[user]["spec"]["authentication"]["type"] == "scram-sha-512"
        assert users[user]["metadata"]["labels"]["strimzi.io/cluster"] == "scoremesh"
        # the User Operator writes the password to a Secret named after the user
        ref = env["SCOREMESH_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": user, "key": "password"}, f"{service}: required, not optional"
        if service == "query":
            token = env["SCOREMESH_API_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert token["optional"] is True, "no token means mutating routes are disabled"
        else:
            assert "SCOREMESH_API_TOKEN" not in env, service
        ca = settings["SCOREMESH_KAFKA_SSL_CAFILE"]
        mounts = {m["mountPath"]: m["name"] for m in container(doc)["volumeMounts"]}
        ca_volume = mounts[ca.rsplit("/", 1)[0]]
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        assert volumes[ca_volume]["secret"]["secretName"] == "scoremesh-cluster-ca-cert"


def _grants(user: Doc) -> list[tuple[str, str, str, set[str]]]:
    return [
        (
            acl["resource"]["type"],
            acl["resource"]["name"],
            acl["resource"]["patternType"],
            set(acl["operations"]),
        )
        for acl in user["spec"]["authorization"]["acls"]
    ]


def _can(user: Doc, operation: str, topic: str) -> bool:
    for kind, name, pattern, operations in _grants(user):
        matches = topic == name if pattern == "literal" else topic.startswith(name)
        if kind == "topic" and matches and operation in operations:
            return True
    return False


def test_acls_name_only_catalog_topics_and_scoremesh_groups() -> None:
    for user in of_kind(render("base"), "KafkaUser").values():
        for kind, name, pattern, operations in _grants(user):
            assert kind in ("topic", "group"), name
            if kind == "group":
                assert name.startswith("scoremesh-") and pattern == "prefix", name
                own = name == user["metadata"]["name"]
                assert operations == ({"Read", "Describe"} if own else {"Describe"}), name
            elif pattern == "literal":
                assert name in catalog(), f"{user['metadata']['name']}: {name} not in catalog"
                assert "Describe" in operations
            else:
                assert name.endswith("."), f"state-topic prefix {name!r}"
            assert not operations & {"All", "Alter", "AlterConfigs", "Delete", "ClusterAction"}


def test_every_catalog_topic_has_a_writer_and_the_ingress_topics_have_a_reader() -> None:
    users = of_kind(render("base"), "KafkaUser").values()
    for topic in catalog():
        writers = [u["metadata"]["name"] for u in users if _can(u, "Write", topic)]
        if topic in ("events.raw", "labels"):
            assert not writers, f"{topic} is written by producers outside the mesh"
            assert any(_can(u, "Read", topic) for u in users), topic
        else:
            assert writers, f"no service may write {topic}"
    registry_writers = [u for u in users if _can(u, "Write", "models.registry")]
    assert [u["metadata"]["name"] for u in registry_writers] == ["scoremesh-registry"]
    alert_writers = [u for u in users if _can(u, "Write", "alerts")]
    assert [u["metadata"]["name"] for u in alert_writers] == ["scoremesh-monitor"]


# --- network -----------------------------------------------------------------------------


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", "only In is used here"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_deny_by_default_and_allow_only_what_is_needed(target: str) -> None:
    docs = render(target)
    policies = list(of_kind(docs, "NetworkPolicy").values())
    default_deny = [
        p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
    ]
    assert default_deny and "Ingress" in default_deny[0]["spec"]["policyTypes"]
    for service, doc in services_in(docs).items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        applying = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        egress = [
            rule
            for p in applying
            if "Egress" in p["spec"]["policyTypes"]
            for rule in p["spec"].get("egress", [])
        ]
        assert egress, f"{service}: egress is not restricted"
        ports = {port["port"] for rule in egress for port in rule["ports"]}
        wanted = {9092, 9093, 53} | ({6379} if service in REDIS_CLIENTS else set())
        assert ports == wanted, f"{service}: egress to {sorted(ports)}"
        ingress = [
            rule
            for p in applying
            if "Ingress" in p["spec"]["policyTypes"]
            for rule in p["spec"].get("ingress", [])
        ]
        scrape = [
            rule
            for rule in ingress
            if any("namespaceSelector" in peer for peer in rule.get("from", []))
        ]
        assert any(
            service_port(service) in {p["port"] for p in rule["ports"]} for rule in scrape
        ), f"{service}: Prometheus cannot scrape it"
        open_to_all = [rule for rule in ingress if not rule.get("from")]
        if service == "query":
            assert [p["port"] for rule in open_to_all for p in rule["ports"]] == [8080]
        else:
            assert not open_to_all, f"{service}: ingress from anywhere"


@pytest.mark.parametrize("target", TARGETS)
def test_the_monitor_reads_its_paging_endpoints_from_an_optional_secret(target: str) -> None:
    (monitor,) = [w for w in workloads(render(target)) if w["metadata"]["name"] == "monitor"]
    env = {e["name"]: e for e in monitor["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name in (
        "SCOREMESH_MONITOR_SLACK_WEBHOOK_URL",
        "SCOREMESH_MONITOR_PAGERDUTY_ROUTING_KEY",
        "SCOREMESH_MONITOR_WEBHOOK_URL",
    ):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "scoremesh-alerting" and ref["optional"] is True
