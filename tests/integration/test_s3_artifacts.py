"""Artifacts in S3-compatible object storage, against a real S3 server (moto's server mode):
named by model, version and sha256, verified on every load, never overwritten; a scorer
hot-loads a version from S3 and refuses a missing or tampered object, the old version
serving on, with a deployment-log entry."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.common.artifacts import ArtifactError, fetch_artifact, sha256_of, store_artifact
from services.common.commands import command, new_command, read_history
from services.common.registration import register_version
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.scorer.service import ScorerService
from services.trainer.datasets import CREDIT_SPEC
from tests.conftest import Running

pytestmark = pytest.mark.integration


def s3_settings(settings: Settings, s3_server: Any, tmp_path: Path, name: str) -> Settings:
    bucket = f"sm-{uuid.uuid4().hex[:12]}"
    return settings.replace(
        **s3_server.settings(bucket, "teams/credit"), artifact_dir=tmp_path / name
    )


async def test_an_artifact_is_stored_by_name_verified_on_load_and_never_overwritten(
    settings: Settings, s3_server: Any, tmp_path: Path
) -> None:
    s3 = s3_settings(settings, s3_server, tmp_path, "cache")
    data = b"\x08" + b"onnx-bytes" * 1000
    ref = await store_artifact(s3, data, "credit", "1.2.0")
    digest = sha256_of(data)
    bucket = s3.artifact_store.split("/")[2]
    assert ref.uri == f"s3://{bucket}/teams/credit/models/credit/1.2.0/{digest}.onnx"
    assert ref.sha256 == digest and ref.size == len(data)
    assert (await fetch_artifact(s3, ref.uri, digest)).read_bytes() == data
    # A reader whose own new artifacts go to the topic still loads what lives in S3.
    reader = s3.model_copy(
        update={"artifact_store": "kafka://models.artifacts", "artifact_dir": tmp_path / "r"}
    )
    assert (await fetch_artifact(reader, ref.uri, digest)).read_bytes() == data
    # Written once: the same bytes again are the same object; other bytes under the name are
    # refused, and nothing was deleted or replaced.
    assert (await store_artifact(s3, data, "credit", "1.2.0")).uri == ref.uri
    key = ref.uri.split("/", 3)[3]
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"short")
    with pytest.raises(ArtifactError, match="never overwrites"):
        await store_artifact(s3, data, "credit", "1.2.0")
    fresh = s3.model_copy(update={"artifact_dir": tmp_path / "other-cache"})
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        await fetch_artifact(fresh, ref.uri, digest)
    with pytest.raises(ArtifactError, match="missing from the store"):
        await fetch_artifact(fresh, ref.uri.replace("1.2.0", "9.9.9"), digest)


def relabelled(onnx: bytes, doc: str) -> bytes:
    """The same model with another doc string: other bytes, so no cache already holds it."""
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(onnx)
    model.doc_string = doc
    return bytes(model.SerializeToString())


async def wait_for(condition: Any, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return False


async def load_failure(settings: Settings, version: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in await read_history(settings, "credit"):
            # The registry takes a champion no reader can load out again: the entry names
            # the version restored and the one that failed (previous_champion).
            if event["action"] == "load_failed" and version in (
                event["version"],
                event.get("previous_champion"),
            ):
                return event
        await asyncio.sleep(0.5)
    history = await read_history(settings, "credit")
    raise AssertionError(f"no load_failed entry for {version}: {history}")


async def test_a_scorer_hot_loads_from_s3_and_refuses_missing_or_tampered_objects(
    settings: Settings, s3_server: Any, tmp_path: Path, trained_model: Any, trained_model_b: Any
) -> None:
    registry_settings = s3_settings(settings, s3_server, tmp_path, "registry-cache")
    scorer_settings = registry_settings.model_copy(update={"artifact_dir": tmp_path / "scorer"})
    bucket = registry_settings.artifact_store.split("/")[2]
    client = s3_server.client()

    async def register(onnx: bytes, version: str, stage: str | None) -> str:
        result = await register_version(
            registry_settings,
            "credit",
            version,
            onnx,
            CREDIT_SPEC,
            metadata=trained_model.metadata,
            stage=stage,
        )
        assert result.outcome["outcome"] == "applied", result.outcome
        if stage:
            assert result.promotion and result.promotion["outcome"] == "applied"
        return str(result.outcome["version"])

    async def promote(version: str) -> None:
        outcome = await command(
            registry_settings,
            new_command("credit", "promote", "test", version=version, target_stage="champion"),
        )
        assert outcome["outcome"] == "applied", outcome

    async with Running(RegistryService(registry_settings)):
        await register(trained_model.onnx, "1.0.0", "champion")
        async with Running(ScorerService(scorer_settings)) as scorer:
            holder = scorer.holder
            assert await wait_for(lambda: holder.current.of("credit") is not None)
            assert holder.current.of("credit").champion.key == "credit@1.0.0"
            # A new version whose artifact lives in S3, hot-loaded while the scorer runs.
            await register(trained_model_b.onnx, "1.1.0", None)
            await promote("1.1.0")
            assert await wait_for(
                lambda: holder.current.of("credit").champion.key == "credit@1.1.0"
            )
            assert (tmp_path / "scorer").glob("*.onnx")

            # An object lost from the bucket after registration: refused, 1.1.0 serves on.
            onnx_c = relabelled(trained_model.onnx, "1.2.0")  # new bytes, never cached
            await register(onnx_c, "1.2.0", None)
            key = f"teams/credit/models/credit/1.2.0/{sha256_of(onnx_c)}.onnx"
            client.delete_object(Bucket=bucket, Key=key)
            await promote("1.2.0")
            missing = await load_failure(registry_settings, "1.2.0")
            assert "missing from the store (NoSuchKey)" in missing["detail"], missing
            assert missing["new_champion"] == "1.1.0" and missing["actor"].startswith("scorer:")
            assert holder.current.of("credit").champion.key == "credit@1.1.0"

            # An object whose bytes were replaced: the checksum refuses it.
            onnx_d = relabelled(trained_model_b.onnx, "1.3.0")
            await register(onnx_d, "1.3.0", None)
            key = f"teams/credit/models/credit/1.3.0/{sha256_of(onnx_d)}.onnx"
            client.put_object(Bucket=bucket, Key=key, Body=trained_model.onnx)
            await promote("1.3.0")
            tampered = await load_failure(registry_settings, "1.3.0")
            assert "checksum mismatch" in tampered["detail"], tampered
            assert holder.current.of("credit").champion.key == "credit@1.1.0"
            assert {"credit@1.2.0", "credit@1.3.0"} <= set(holder.current.failures)
