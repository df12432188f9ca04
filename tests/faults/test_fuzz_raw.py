"""10,000 generated hostile inputs through events.raw: no crash, every one accounted for."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import orjson
import pytest

from scoremesh.contract.codec import codec
from services.common.settings import Settings
from services.registry.service import RegistryService
from services.trainer.datasets import credit_events
from services.validator.service import ValidatorService
from tests.conftest import Running
from tests.helpers import consume_until, produce, register_model

pytestmark = pytest.mark.fault

N = 10_000


def nested(depth: int) -> bytes:
    return b'{"x":' * depth + b"1" + b"}" * depth


def hostile(rng: random.Random, i: int, base: dict[str, Any]) -> bytes:
    event = {**base, "event_id": f"fz-{i}", "features": dict(base["features"])}
    kind = i % 14
    f = rng.choice(list(event["features"]))
    if kind == 0:
        return rng.randbytes(rng.randint(0, 300))
    if kind == 1:
        event["features"][f] = rng.choice(["1.5", [], {}, True, "x" * rng.randint(1, 5000)])
        return orjson.dumps(event)
    if kind == 2:
        event["features"][f] = rng.choice([math.nan, math.inf, -math.inf])
        return (
            codec("Event").encode(event)
            if rng.random() < 0.5
            else orjson.dumps(event, option=orjson.OPT_SERIALIZE_NUMPY).replace(b"null", b"NaN", 1)
        )
    if kind == 3:
        event["attributes"] = {"blob": "y" * rng.randint(60_000, 200_000)}
        return orjson.dumps(event)
    if kind == 4:
        if rng.random() < 0.5:
            return b"[" * 3000 + b"]" * 3000
        deep = b'"features":{"deep":' + nested(rng.randint(50, 2000)) + b","
        return orjson.dumps(event).replace(b'"features":{', deep, 1)
    if kind == 5:
        return orjson.dumps(event).replace(b'"fz-', b'"\xff\xfe-', 1)
    if kind == 6:
        data = bytearray(codec("Event").encode(event))
        data[2 + rng.randrange(8)] ^= 0xFF
        return bytes(data)
    if kind == 7:
        data = codec("Event").encode(event)
        return data[: rng.randrange(2, len(data))]
    if kind == 8:
        event.pop(rng.choice(["event_id", "entity_id", "event_time", "features"]))
        return orjson.dumps(event)
    if kind == 9:
        event["features"][f] = None
        return orjson.dumps(event)
    if kind == 10:
        event["event_id"] = rng.choice(["", "a\nb", "z" * 1000, 17])
        return orjson.dumps(event)
    if kind == 11:
        event["features"]["age"] = rng.choice([-5, 10**12, 2**63 - 1, 101])
        return orjson.dumps(event)
    return codec("Event").encode(event) if kind == 12 else orjson.dumps(event)


async def test_fuzzed_raw_events_never_crash_the_validator(
    settings: Settings, trained_model: Any
) -> None:
    rng = random.Random(1234)
    bases = [e for e, _ in credit_events(200, seed=9)]
    values = [(b"fuzz", hostile(rng, i, bases[i % len(bases)])) for i in range(N)]
    async with Running(RegistryService(settings)):
        assert (await register_model(settings, trained_model.onnx, "1.0.0"))["outcome"] == "applied"
        runner = Running(ValidatorService(settings))
        async with runner:
            await produce(settings, "events.raw", values, max_request_size=4 * 1024 * 1024)

            def settled(valid: list[Any], rejected: list[Any]) -> int:
                return len({v["event_id"] for v in valid}) + len(
                    {(r["source_partition"], r["source_offset"]) for r in rejected}
                )

            valid = await consume_until(settings, "events.valid", lambda r: False, timeout_s=1)
            rejected: list[Any] = []
            for _ in range(60):
                valid = await consume_until(
                    settings, "events.valid", lambda r: False, timeout_s=0.5
                )
                rejected = await consume_until(
                    settings, "events.rejected", lambda r: False, timeout_s=0.5
                )
                if settled(valid, rejected) >= N:
                    break
                await asyncio.sleep(1)
            assert runner.task is not None and not runner.task.done(), "the validator died"
    assert settled(valid, rejected) == N
    assert all(r["reasons"] and r["reasons"][0]["code"] for r in rejected)
    assert {v["event_id"] for v in valid} <= {f"fz-{i}" for i in range(N)}
    codes = {r["reasons"][0]["code"] for r in rejected}
    assert {
        "undecodable",
        "unknown_schema",
        "truncated",
        "too_large",
        "wrong_type",
        "invalid_envelope",
    } <= codes
    print(
        f"\nfuzz: {N} sent, {len(valid)} valid, {len(rejected)} rejected, reasons {sorted(codes)}"
    )
