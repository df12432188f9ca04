"""Latency gates judge the model's own compute, so that a busy machine cannot refuse it."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from scoremesh.contract.featurespec import LatencyGate
from services.common.readiness import validate_model
from services.trainer.datasets import CREDIT_SPEC


def spec_with(*gates: LatencyGate) -> Any:
    return CREDIT_SPEC.model_copy(
        update={"gates": CREDIT_SPEC.gates.model_copy(update={"latency": list(gates)})}
    )


def test_a_model_slower_than_its_gate_is_refused_with_both_figures(trained_model: Any) -> None:
    result = validate_model(trained_model.onnx, spec_with(LatencyGate(batch_size=256, p99_ms=1e-6)))
    assert not result.passed
    (failure,) = [f for f in result.failures if "latency" in f]
    assert "at batch 256" in failure and "model compute" in failure and "wall-clock" in failure
    figures = result.report["latency"]["256"]
    assert 0 < figures["cpu_p50_ms"] <= figures["cpu_p99_ms"]


def test_a_gate_for_an_unlisted_batch_size_is_measured_and_reported(trained_model: Any) -> None:
    result = validate_model(trained_model.onnx, spec_with(LatencyGate(batch_size=3, p99_ms=1e3)))
    assert result.passed, result.failures
    assert result.report["latency"]["3"]["cpu_p99_ms"] > 0


def test_wall_clock_stalls_do_not_fail_the_gate(
    trained_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every call "takes" a whole second of wall-clock time, as on a machine busy elsewhere.
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    result = validate_model(trained_model.onnx, spec_with(LatencyGate(batch_size=1, p99_ms=50.0)))
    assert result.passed, result.failures
    assert result.report["latency"]["1"]["p99_ms"] >= 1000
