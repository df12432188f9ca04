"""10,000+ generated hostile requests through the query API (in-process, ASGI): never a
500, and every request that is wrong is refused with a 4xx application/problem+json that
says why."""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from services.common.settings import Settings
from services.query.problems import PROBLEM_JSON, TYPE_PREFIX
from services.trainer.datasets import credit_events
from tests.query.conftest import TOKEN, api, wait_ready, with_champion

pytestmark = pytest.mark.fault

N = 10_000
MiB = 1024 * 1024


class Case:
    __slots__ = ("bad", "body", "headers", "kind", "method", "path")

    def __init__(
        self,
        kind: str,
        body: bytes | None = None,
        bad: bool = True,
        method: str = "POST",
        path: str = "/v1/predict",
        headers: dict[str, str | bytes] | None = None,
    ) -> None:
        self.kind, self.body, self.bad = kind, body, bad
        self.method, self.path = method, path
        self.headers: dict[str, str | bytes] = {
            "content-type": "application/json",
            **(headers or {}),
        }


ODD_VALUES: list[Any] = [
    "1.5",
    "",
    "x" * 5_000,
    [],
    [1, 2],
    {},
    {"a": 1},
    True,
    10**30,
    -(2**63),
    2**64,
    1e308,
    -0.0,
    "\u0000",
    "\ud7ff\ue000",
]


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


def generate(rng: random.Random, i: int, base: dict[str, Any]) -> Case:
    event = {**base, "event_id": f"fz-{i}", "features": dict(base["features"])}
    feature = rng.choice(list(event["features"]))
    kind = i % 24
    if kind == 0:  # wrong type for a feature
        value = rng.choice(ODD_VALUES)
        event["features"][feature] = value
        # numbers may be fine for some features (flag-only ranges); other types never are
        bad = isinstance(value, str | list | dict | bool)
        return Case("feature_type", json.dumps(event).encode(), bad=bad)  # orjson: 64 bits
    if kind == 1:  # NaN / Infinity, which JSON has no words for
        word = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e999", b"-1e999"])
        event["features"][feature] = 12345.678
        return Case("nan_inf", orjson.dumps(event).replace(b"12345.678", word, 1))
    if kind == 2:  # huge strings in every place a string goes
        where = rng.choice(["event_id", "entity_id", "event_time", "feature", "attribute"])
        big = "z" * rng.randint(1_000, 600_000)
        if where == "feature":
            event["features"][feature] = big
        elif where == "attribute":
            event["attributes"] = {"blob": big}
        else:
            event[where] = big
        # an attribute may be long as long as the event stays under the size limit
        return Case(
            "huge_string", orjson.dumps(event), bad=where != "attribute" or len(big) >= 64 * 1024
        )
    if kind == 3:  # deep nesting
        depth = rng.choice([100, 1_000, 5_000, 50_000])
        where = rng.randrange(3)
        if where == 0:
            return Case("deep_nesting", nested(depth))
        if where == 1:
            return Case("deep_nesting", b'{"a":' * depth + b"1" + b"}" * depth)
        # an unknown feature passes with a flag, unless it is too deep to parse
        body = orjson.dumps(event).replace(
            b'"features":{', b'"features":{"d":' + nested(depth) + b",", 1
        )
        return Case("deep_nesting", body, bad=depth > 1_000)
    if kind == 4:  # invalid UTF-8
        data = bytearray(orjson.dumps(event))
        for _ in range(rng.randint(1, 4)):
            data.insert(rng.randrange(len(data)), rng.choice([0xFF, 0xC0, 0xED, 0x80, 0xFE]))
        return Case("invalid_utf8", bytes(data))
    if kind == 5:  # truncated JSON
        data = orjson.dumps(event if rng.random() < 0.5 else {"events": [event, event]})
        return Case("truncated", data[: rng.randrange(0, len(data) - 1)])
    if kind == 6:  # wrong content type, with a body that is fine or not
        ctype = rng.choice(
            [
                "text/plain",
                "application/xml",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/octet-stream",
                "",
                "application/json; charset=latin-1",
            ]
        )
        body = rng.choice([orjson.dumps(event), b"a=1&b=2", b"<event/>", rng.randbytes(64)])
        # the API reads the body as JSON whatever the header says: a good body may pass
        return Case(
            "content_type", body, bad=body != orjson.dumps(event), headers={"content-type": ctype}
        )
    if kind == 7:  # oversized
        size = rng.choice([MiB + 1, 2 * MiB, 5 * MiB])
        return Case("oversized", b'{"event_id":"' + b"a" * size + b'"}')
    if kind == 8:  # not an object at the top
        return Case(
            "top_level",
            rng.choice([b"1", b'"x"', b"null", b"true", b"[]", b"[{}]", b"", b" ", b"{}"]),
        )
    if kind == 9:  # an envelope field missing
        event.pop(rng.choice(["event_id", "entity_id", "event_time", "features"]))
        return Case("missing_field", orjson.dumps(event))
    if kind == 10:  # envelope fields of the wrong type
        field = rng.choice(["event_id", "entity_id", "event_time", "features", "attributes"])
        value = rng.choice([None, 17, 1.5, [], {"x": 1}, True, "", "not a time"])
        event[field] = value
        fine = {
            "event_id": isinstance(value, str) and value,
            "entity_id": isinstance(value, str) and value,
            "event_time": type(value) in (int, float),  # epoch ms; a fraction is cut off
            "features": False,
            "attributes": value in (None, [], ""),  # empty means none
        }[field]
        return Case("envelope_type", orjson.dumps(event), bad=not fine)
    if kind == 11:  # batches of the wrong shape
        events = rng.choice(
            [
                None,
                "x",
                {},
                [],
                [1, 2],
                [event, "x"],
                [event] * 300,
                [{"events": [event]}],
            ]
        )
        return Case("batch_shape", orjson.dumps({"events": events}))
    if kind == 12:  # out of range / unknown category
        event["features"]["age"] = rng.choice([-5, 10**12, 2**63 - 1, 1000])
        return Case("out_of_range", orjson.dumps(event))
    if kind == 13:  # random bytes
        return Case("random_bytes", rng.randbytes(rng.randint(0, 2_000)))
    if kind == 14:  # a unicode mess that is valid UTF-8
        event["event_id"] = (
            "".join(chr(rng.randint(1, 0x10FFFF)) for _ in range(20))
            .encode("utf-8", "surrogatepass")
            .decode("utf-8", "replace")
        )
        event["features"][feature] = "\u202e\u0000\ufeff"
        return Case("unicode", orjson.dumps(event))
    if kind == 15:  # lookups with hostile ids
        ident = rng.choice(
            [
                "x" * rng.randint(100, 10_000),
                "%00",
                "..%2F..%2Fetc",
                "\u00e9\u202e",
                "a b",
                "%ff%fe",
            ]
        )
        path = rng.choice(["/v1/predictions/{}", "/v1/entities/{}/predictions"]).format(
            quote(ident, safe="%")
        )
        return Case("lookup_id", None, bad=False, method="GET", path=path)
    if kind == 16:  # query parameters of the wrong kind
        value = quote(
            rng.choice(["-1", "0", "abc", "1e9", "99999999999999999999", "", "NaN", "1.5"])
        )
        path = rng.choice(
            [
                f"/v1/entities/e-1/predictions?limit={value}",
                f"/v1/models/credit/history?limit={value}",
                f"/v1/alerts?model={value}%20%3B",
                f"/v1/monitoring/credit?version={'v' * 100}",
            ]
        )
        return Case("query_params", None, method="GET", path=path)
    if kind == 17:  # mutating routes: bad bodies with and without the token
        headers = {"authorization": f"Bearer {TOKEN}"} if rng.random() < 0.7 else {}
        body = rng.choice(
            [
                b"{",
                b"[]",
                orjson.dumps({"version": 17, "stage": "champion"}),
                orjson.dumps({"version": "1.0.0", "stage": "emperor"}),
                orjson.dumps({"version": "x" * 10_000}),
                orjson.dumps({"percent": math.pi * 1e6}),
                b'{"version":"1.0.0","stage":"canary","percent":NaN}',
                rng.randbytes(100),
            ]
        )
        path = rng.choice(
            ["/v1/models/credit/promote", "/v1/models/credit/rollback", "/v1/models/nope!/promote"]
        )
        return Case("mutation_body", body, path=path, headers=headers)
    if kind == 18:  # methods a route does not have
        method = rng.choice(["PUT", "DELETE", "PATCH"])
        path = rng.choice(
            ["/v1/predict", "/v1/models", "/v1/alerts", "/healthz", "/v1/predictions/e-1"]
        )
        return Case("method", orjson.dumps(event), method=method, path=path)
    if kind == 19:  # paths that are not there
        path = rng.choice(
            ["/v2/predict", "/v1/predict/extra", "/v1/models/credit/versions", "/%2e%2e/x"]
        )
        return Case("unknown_path", None, method=rng.choice(["GET", "POST"]), path=path)
    if kind == 20:  # duplicate keys and odd JSON that parses
        body = orjson.dumps(event).replace(b"{", b'{"event_id":1,', 1)
        return Case("duplicate_keys", body, bad=False)
    if kind == 21:  # hostile headers on a fine request
        headers = {
            "x-request-id": rng.choice(["x" * 5_000, "\t", b"id\xc3\xa9\xff"]),
            "content-length-x": "abc",
        }
        return Case("headers", orjson.dumps(event), bad=False, headers=headers)
    if kind == 22:  # too many features / unknown feature names
        event["features"].update({f"extra{j}": j for j in range(rng.choice([1, 100, 5_000]))})
        return Case("extra_features", orjson.dumps(event), bad=False)
    # fine events, so the fuzz also runs through scoring
    return Case("valid", orjson.dumps(event), bad=False)


def unpublished() -> float:
    """Answered predictions that did not reach Kafka or Redis (process-wide counters)."""
    dropped = sum(
        REGISTRY.get_sample_value("scoremesh_api_published_dropped_total", {"reason": r}) or 0.0
        for r in ("encode_error", "too_large", "kafka_error", "backpressure")
    )
    skipped = REGISTRY.get_sample_value(
        "scoremesh_query_store_writes_total", {"outcome": "skipped"}
    )
    return dropped + (skipped or 0.0)


def is_problem(response: httpx.Response) -> bool:
    if response.headers.get("content-type") != PROBLEM_JSON:
        return False
    body = response.json()
    return (
        isinstance(body, dict)
        and str(body.get("type", "")).startswith(TYPE_PREFIX)
        and body.get("status") == response.status_code
        and bool(body.get("title"))
        and bool(body.get("detail"))
    )


async def test_hostile_requests_get_4xx_problems_never_500(
    settings: Settings, trained_model: Any
) -> None:
    s = settings.replace(api_token=SecretStr(TOKEN))
    await with_champion(s, trained_model.onnx)
    rng = random.Random(20261125)
    bases = [e for e, _ in credit_events(300, seed=3)]
    cases = [generate(rng, i, bases[i % len(bases)]) for i in range(N)]
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    unpublished_before = unpublished()
    async with api(s) as client:
        await wait_ready(client)
        for case in cases:
            response = await client.request(
                case.method, case.path, content=case.body, headers=case.headers
            )
            status = response.status_code
            statuses[(case.kind, status)] += 1
            if status >= 500:
                failures.append(
                    f"{case.kind} {case.method} {case.path[:80]} -> {status}: {response.text[:300]}"
                )
            elif status >= 400 and not is_problem(response):
                failures.append(
                    f"{case.kind} -> {status} without a problem body: {response.text[:200]}"
                )
            elif case.bad and status < 400:
                failures.append(f"{case.kind} accepted ({status}): {(case.body or b'')[-300:]!r}")
    lost = unpublished() - unpublished_before  # leaving the lifespan drained the sink
    took = time.monotonic() - started
    assert not failures, f"{len(failures)} of {N}:\n" + "\n".join(failures[:20])
    by_status = Counter()
    for (_, status), n in statuses.items():
        by_status[status] += n
    assert sum(by_status.values()) == N
    # every 200 is a prediction that can be published (a long beyond 64 bits once passed
    # the checks with a flag, was answered 200 and could never be encoded for Kafka)
    assert lost == 0, f"{lost:.0f} answered predictions were not published"
    print(
        f"\nFAULT-TABLE | HTTP fuzz, {N} hostile requests (24 kinds) in {took:.0f}s | "
        f"5xx 0 | statuses {dict(sorted(by_status.items()))}"
    )
