"""Generated deployment files follow schemas/topics.yaml: a stale copy fails here.

Covers k8s/base/kafka-topics.yaml, k8s/base/kafka-users.yaml and the compose topic job's
deploy/compose/create-topics.sh (scripts/gen_deploy.py and its --check).
"""

from __future__ import annotations

import itertools
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from scoremesh.contract.catalog import catalog
from tests.deploy.manifests import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import gen_deploy


def test_committed_copies_are_what_the_generator_writes() -> None:
    stale = [str(p.relative_to(ROOT)) for p in gen_deploy.stale()]
    assert not stale, f"stale: {stale}; run: python scripts/gen_deploy.py"


def test_check_mode_passes_now_and_fails_on_a_stale_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gen_deploy.main(["--check"]) == 0
    stale_copy = tmp_path / "kafka-topics.yaml"
    stale_copy.write_text(gen_deploy.render_topics().replace("partitions: 6", "partitions: 5"))
    real = gen_deploy.outputs()
    monkeypatch.setattr(
        gen_deploy,
        "outputs",
        lambda: {**real, stale_copy: real[gen_deploy.TOPICS_FILE]},
    )
    monkeypatch.setattr(gen_deploy, "ROOT", tmp_path)
    assert gen_deploy.main(["--check"]) == 1
    assert "stale: kafka-topics.yaml" in capsys.readouterr().out
    assert stale_copy.read_text() != real[gen_deploy.TOPICS_FILE], "--check writes nothing"


def test_output_is_deterministic() -> None:
    assert gen_deploy.outputs() == gen_deploy.outputs()


def test_kafka_topics_are_exactly_the_catalog() -> None:
    docs = [d for d in yaml.safe_load_all(gen_deploy.TOPICS_FILE.read_text()) if d]
    assert [d["metadata"]["name"] for d in docs] == list(catalog())
    for doc in docs:
        spec = catalog()[doc["metadata"]["name"]]
        assert doc["metadata"]["labels"]["strimzi.io/cluster"] == gen_deploy.KAFKA_CLUSTER
        assert doc["spec"] == {
            "topicName": spec.name,
            "partitions": spec.partitions,
            "replicas": spec.replication_factor,
            "config": spec.configs,
        }


def test_compose_topic_job_creates_exactly_the_catalog() -> None:
    created = {}
    for line in gen_deploy.COMPOSE_TOPICS_FILE.read_text().splitlines():
        if line.startswith("create "):
            words = shlex.split(line)
            args = dict(zip(words[2::2], words[3::2], strict=True))
            configs = dict(
                w.split("=", 1) for flag, w in itertools.pairwise(words) if flag == "--config"
            )
            created[words[1]] = (int(args["--partitions"]), configs)
    assert list(created) == list(catalog())
    for name, spec in catalog().items():
        partitions, configs = created[name]
        assert partitions == spec.partitions, name
        assert configs == {**spec.configs, "min.insync.replicas": "1"}, name
    text = gen_deploy.COMPOSE_TOPICS_FILE.read_text()
    assert "--if-not-exists" in text, "the job must be re-runnable"
    assert "--replication-factor 1" in text


def test_access_table_uses_only_catalog_topics() -> None:
    for service, access in gen_deploy.SERVICE_ACCESS.items():
        unknown = set(access.reads + access.writes) - set(catalog())
        assert not unknown, f"{service}: {sorted(unknown)}"


def test_users_grant_exactly_the_access_table() -> None:
    docs = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all(gen_deploy.USERS_FILE.read_text()) if d
    }
    assert set(docs) == {gen_deploy.kafka_user_name(s) for s in gen_deploy.SERVICE_ACCESS}
    for service, access in gen_deploy.SERVICE_ACCESS.items():
        acls = docs[gen_deploy.kafka_user_name(service)]["spec"]["authorization"]["acls"]
        literal = {
            a["resource"]["name"]: set(a["operations"])
            for a in acls
            if a["resource"]["type"] == "topic" and a["resource"]["patternType"] == "literal"
        }
        assert {t for t, ops in literal.items() if "Read" in ops} == set(access.reads), service
        assert {t for t, ops in literal.items() if "Write" in ops} == set(access.writes), service
