"""Alerts and drift state in Redis, for the query API and `scoremesh monitor status`.

Redis is a read model, never the system of record (that is the alerts topic). Layout,
``<p>`` = ``settings.redis_key_prefix``:

- ``<p>alerts:by-key:<alert_key>``: hash ``{order, alert}``: the newest Alert record of a
  key as JSON; written only if newer (``order`` = episode, count, last seen, resolved);
  TTL ``redis_alert_ttl_s``, refreshed by every write;
- ``<p>alerts:open``: sorted set of firing alert keys, score = last seen (ms);
- ``<p>alerts:recent``: list of the newest Alert records as JSON (newest first, capped);
- ``<p>alerts:gate:<alert_key>:<event>``: a notification claim (SET NX PX cooldown) so that
  one monitor process out of several notifies;
- ``<p>monitor:drift:<model>@<version>``: hash signal -> JSON of its last windowed
  measurement (stats, state, sample, window); TTL ``redis_alert_ttl_s``;
- ``<p>monitor:versions``: set of ``model@version`` that have drift state.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from services.common.redis_client import answers, connect
from services.common.settings import Settings


class AlertReadModel:
    """Reads of the monitor's Redis read model (the query API, `scoremesh monitor status`)."""

    def __init__(
        self,
        settings: Settings,
        ttl_s: int,
        recent: int,
        client: aioredis.Redis | None = None,
    ) -> None:
        self.prefix = settings.redis_key_prefix
        self.ttl_s = ttl_s
        self.recent = recent
        self.client = client or connect(settings)
        self.healthy = False

    async def ping(self) -> bool:
        self.healthy = await answers(self.client)
        return self.healthy

    async def open_alerts(self) -> list[dict[str, Any]]:
        keys = await self.client.zrevrange(f"{self.prefix}alerts:open", 0, -1)
        out: list[dict[str, Any]] = []
        for key in keys:
            body = await self.client.hget(
                f"{self.prefix}alerts:by-key:{key.decode() if isinstance(key, bytes) else key}",
                "alert",
            )
            if body:
                out.append(orjson.loads(body))
        return out

    async def drift_rows(self) -> list[dict[str, Any]]:
        versions = await self.client.smembers(f"{self.prefix}monitor:versions")
        out: list[dict[str, Any]] = []
        for raw in sorted(versions):
            version_key = raw.decode() if isinstance(raw, bytes) else str(raw)
            rows = await self.client.hgetall(f"{self.prefix}monitor:drift:{version_key}")
            out.extend(orjson.loads(v) for v in rows.values())
        return out

    async def close(self) -> None:
        await self.client.aclose()
