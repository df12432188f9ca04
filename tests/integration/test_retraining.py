"""The trainer on the real broker: a drifted concept becomes a better version in shadow; a
crash mid-run leaves no half-registered version and the run resumes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from scoremesh.contract.codec import codec
from services.common.registry_view import RegistryView
from services.common.retraining import manual_request, publish_request, wait_for_result
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.trainer.datasets import credit_events
from services.trainer.service import TrainerService
from tests.conftest import Running
from tests.helpers import ServiceProcess, consume_until, produce, register_model

pytestmark = pytest.mark.integration


async def drifted_examples(settings: Settings, n: int) -> tuple[int, int]:
    """Labelled examples of a changed concept (Agrawal function 2 instead of 0)."""
    pairs = list(credit_events(n, seed=90, classification_function=2, id_prefix="ex"))
    records = [{**e, "label": y, "label_time": e["event_time"] + 60_000} for e, y in pairs]
    await produce(
        settings,
        "training.examples",
        [(r["event_id"].encode(), codec("TrainingExample").encode(r)) for r in records],
    )
    return records[0]["event_time"], records[-1]["event_time"]


async def versions(settings: Settings) -> dict[str, str]:
    view = RegistryView(settings)
    await view.start()
    await view.stop()
    return {v.version: v.stage for v in view.state.of_model("credit")}


async def test_retrain_on_drifted_data_registers_a_better_version_in_shadow(
    settings: Settings, trained_model: Any
) -> None:
    start, end = await drifted_examples(settings, 3000)
    async with Running(RegistryService(settings)):
        assert (
            await register_model(
                settings, trained_model.onnx, "1.0.0", metadata=trained_model.metadata
            )
        )["outcome"] == "applied"
        async with Running(TrainerService(settings)):
            request = manual_request(
                "credit", "test", "drift", end, (end - start) / 1000 + 1, int(time.time() * 1000)
            )
            await publish_request(settings, request)
            result = await wait_for_result(settings, request["request_id"], timeout_s=180)
        assert result["status"] == "succeeded", result["detail"]
        assert result["version"] == "1.1.0" and result["parent_version"] == "1.0.0"
        assert result["metrics"]["accuracy"] > result["champion_metrics"]["accuracy"] + 0.1
        assert result["examples"] == 3000
        assert (await versions(settings)) == {"1.0.0": "champion", "1.1.0": "shadow"}
        view = RegistryView(settings)
        await view.start()
        await view.stop()
        retrained = view.state.versions["credit@1.1.0"].metadata
        assert retrained.recipe == trained_model.metadata.recipe, "the same recipe, same hash"
        assert retrained.onnx_operators == trained_model.metadata.onnx_operators
        # Requests are idempotent: the same request again changes nothing.
        async with Running(TrainerService(settings)):
            await publish_request(settings, request)
            await asyncio.sleep(3)
        results = await consume_until(settings, "retrain.results", lambda r: False, timeout_s=1)
        assert [r["status"] for r in results if r["request_id"] == request["request_id"]] == [
            "started",
            "succeeded",
        ]


async def test_too_little_data_is_a_clear_rejection(settings: Settings, trained_model: Any) -> None:
    _, end = await drifted_examples(settings, 100)
    async with Running(RegistryService(settings)):
        assert (
            await register_model(
                settings, trained_model.onnx, "1.0.0", metadata=trained_model.metadata
            )
        )["outcome"] == "applied"
        async with Running(TrainerService(settings)):
            request = manual_request("credit", "test", "", end, 3600, int(time.time() * 1000))
            await publish_request(settings, request)
            result = await wait_for_result(settings, request["request_id"], timeout_s=120)
    assert result["status"] == "rejected" and "only 100 labelled examples" in result["detail"]
    assert (await versions(settings)) == {"1.0.0": "champion"}


async def test_a_trainer_killed_mid_run_leaves_no_half_registered_version(
    settings: Settings, trained_model: Any, tmp_path: Path
) -> None:
    start, end = await drifted_examples(settings, 6000)
    async with Running(RegistryService(settings)):
        assert (
            await register_model(
                settings, trained_model.onnx, "1.0.0", metadata=trained_model.metadata
            )
        )["outcome"] == "applied"
        trainer = ServiceProcess("trainer", settings, tmp_path)
        trainer.start()
        try:
            request = manual_request(
                "credit",
                "test",
                "crash drill",
                end,
                (end - start) / 1000 + 1,
                int(time.time() * 1000),
            )
            await publish_request(settings, request)
            started = await wait_for_result(
                settings, request["request_id"], timeout_s=60, terminal=False
            )
            assert started["status"] == "started"
            # Kill at once: a whole run (read 6000 examples, train, export, upload, register)
            # takes only ~1.5 s on a fast machine, so a fixed wait here could outlast it.
            # Seeing "started" already took a consumer's start-up and a poll.
            trainer.kill()
            assert (await versions(settings)) == {"1.0.0": "champion"}, (
                "the run finished before the kill: no mid-run crash was drilled"
                + trainer.log()[-1000:]
            )
            trainer.start()
            result = await wait_for_result(settings, request["request_id"], timeout_s=180)
        finally:
            if trainer.proc.poll() is None:
                trainer.terminate()
    assert result["status"] == "succeeded", result["detail"] + trainer.log()[-2000:]
    assert result["attempt"] == 2
    assert (await versions(settings)) == {"1.0.0": "champion", "1.1.0": "shadow"}


async def retrain_of(settings: Settings, onnx: bytes, metadata: Any) -> dict[str, Any]:
    """Register 1.0.0 with this metadata, ask for a retrain, return its final result."""
    start, end = await drifted_examples(settings, 600)
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, onnx, "1.0.0", metadata=metadata))[
            "outcome"
        ] == "applied"
        async with Running(TrainerService(settings)):
            request = manual_request(
                "credit", "test", "drift", end, (end - start) / 1000 + 1, int(time.time() * 1000)
            )
            await publish_request(settings, request)
            return await wait_for_result(settings, request["request_id"], timeout_s=120)


async def test_a_version_without_a_recipe_needs_a_person_and_gets_no_new_version(
    settings: Settings, trained_model: Any
) -> None:
    no_recipe = trained_model.metadata.model_copy(update={"recipe": None})
    result = await retrain_of(settings, trained_model.onnx, no_recipe)
    assert result["status"] == "needs_person"
    assert "has no training recipe" in result["detail"] and "credit@1.0.0" in result["detail"]
    assert (await versions(settings)) == {"1.0.0": "champion"}


async def test_a_recipe_whose_code_changed_is_refused_with_the_reason(
    settings: Settings, trained_model: Any
) -> None:
    recipe = trained_model.metadata.recipe
    tampered = trained_model.metadata.model_copy(
        update={"recipe": recipe.model_copy(update={"code_sha256": "0" * 64})}
    )
    result = await retrain_of(settings, trained_model.onnx, tampered)
    assert result["status"] == "needs_person"
    assert "the recipe's code changed" in result["detail"] and "000000000000" in result["detail"]
    assert (await versions(settings)) == {"1.0.0": "champion"}
