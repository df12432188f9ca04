"""The Redis query store: the latest predictions per event and per entity.

One EVALSHA per batch writes every prediction: ``<p>pred:<model>:<event_id>`` is a hash
with a field per variant (write-if-newer by event time, TTL), ``<p>entity:<entity_id>`` a
sorted set of ``<model>:<event_id>`` by event time, capped (event ids are unique per
model; model names never contain ``:``). Redis is a cache for lookups, never the system
of record: a failed write is counted and logged, and scoring to Kafka goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scoremesh.contract.records import Prediction
from services.common.metrics import REDIS_WRITES
from services.common.redis_client import answers, connect
from services.common.settings import Settings

log = logging.getLogger(__name__)

# ARGV: prefix, ttl, cap, a JSON array of [model:event_id, entity_id, variant, event_time]
# per prediction, then each prediction's JSON body (stored as sent: no float re-formatting).
# Few, large arguments keep the client's command packing cheap.
_WRITE_BATCH = """
local prefix, ttl, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local meta = cjson.decode(ARGV[4])
local written = 0
for n, m in ipairs(meta) do
  local event_key, entity_id, variant, event_time = m[1], m[2], m[3], tonumber(m[4])
  local body = ARGV[4 + n]
  local pkey = prefix .. 'pred:' .. event_key
  local held = redis.call('HGET', pkey, 't:' .. variant)
  if (not held) or tonumber(held) <= event_time then
    redis.call('HSET', pkey, variant, body, 't:' .. variant, event_time)
    redis.call('EXPIRE', pkey, ttl)
    written = written + 1
  end
  local ekey = prefix .. 'entity:' .. entity_id
  redis.call('ZADD', ekey, event_time, event_key)
  local size = redis.call('ZCARD', ekey)
  if size > cap then redis.call('ZREMRANGEBYRANK', ekey, 0, size - cap - 1) end
  redis.call('EXPIRE', ekey, ttl)
end
return written
"""


class QueryStore:
    def __init__(self, settings: Settings, client: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.prefix = settings.redis_key_prefix
        self.client = client or connect(settings)
        self._write = self.client.register_script(_WRITE_BATCH)
        self.healthy = False

    async def ping(self) -> bool:
        self.healthy = await answers(self.client)
        return self.healthy

    async def write_predictions(self, predictions: Sequence[Prediction]) -> int:
        """Write a batch; returns how many were written, 0 (counted as skipped) on failure."""
        if not predictions:
            return 0
        meta = orjson.dumps(
            [
                (f"{p['model']}:{p['event_id']}", p["entity_id"], p["variant"], p["event_time"])
                for p in predictions
            ]
        )
        args: list[Any] = [
            self.prefix,
            self.settings.redis_prediction_ttl_s,
            self.settings.redis_entity_cap,
            meta,
            *map(orjson.dumps, predictions),
        ]
        try:
            written = int(await self._write(keys=[], args=args))
        except (RedisError, OSError) as exc:
            if self.healthy:
                log.warning(
                    "query store write failed; predictions still go to Kafka",
                    extra={"error": str(exc), "skipped": len(predictions)},
                )
            self.healthy = False
            REDIS_WRITES.labels("skipped").inc(len(predictions))
            return 0
        if not self.healthy:
            log.info("query store writable again")
        self.healthy = True
        REDIS_WRITES.labels("written").inc(len(predictions))
        return written

    async def prediction(self, model: str, event_id: str) -> dict[str, Any] | None:
        """Every variant's latest prediction of a model for an event, or None."""
        raw = await self.client.hgetall(f"{self.prefix}pred:{model}:{event_id}")
        out = {_text(k): orjson.loads(v) for k, v in raw.items() if not _text(k).startswith("t:")}
        return out or None

    async def entity_predictions(self, entity_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """An entity's most recent predictions by event time, newest first."""
        ids = await self.client.zrevrange(f"{self.prefix}entity:{entity_id}", 0, limit - 1)
        out = []
        for raw_id in ids:
            model, _, event_id = _text(raw_id).partition(":")
            variants = await self.prediction(model, event_id)
            if variants:
                out.append({"model": model, "event_id": event_id, "variants": variants})
        return out

    async def forget_entity(self, entity_id: str) -> int:
        """Delete an entity's index and its predictions; returns the keys removed."""
        ekey = f"{self.prefix}entity:{entity_id}"
        ids = await self.client.zrange(ekey, 0, -1)
        keys = [ekey] + [f"{self.prefix}pred:{_text(i)}" for i in ids]
        return int(await self.client.delete(*keys))

    async def close(self) -> None:
        await self.client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
