"""The monitor's writes to its Redis read model (layout: services/common/alert_store.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.alert_store import AlertReadModel
from services.common.settings import Settings
from services.monitor import metrics as m
from services.monitor.alerts import AlertState, Transition

log = logging.getLogger(__name__)

# ARGV: prefix, ttl, recent cap, then per alert: key, order, state, last_seen, json
_WRITE_ALERTS = """
local prefix, ttl, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local written = 0
for i = 4, #ARGV, 5 do
  local akey, order, state, last_seen, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local hkey = prefix .. 'alerts:by-key:' .. akey
  local held = redis.call('HGET', hkey, 'order')
  if (not held) or held < order then
    redis.call('HSET', hkey, 'order', order, 'alert', body)
    redis.call('EXPIRE', hkey, ttl)
    if state == 'firing' then
      redis.call('ZADD', prefix .. 'alerts:open', tonumber(last_seen), akey)
    else
      redis.call('ZREM', prefix .. 'alerts:open', akey)
    end
    redis.call('LPUSH', prefix .. 'alerts:recent', body)
    written = written + 1
  end
end
redis.call('LTRIM', prefix .. 'alerts:recent', 0, cap - 1)
return written
"""


def order_text(record: dict[str, Any]) -> str:
    """The episode order of an Alert record as a string Redis compares correctly."""
    first, count, last, resolved = AlertState.from_record(record).order
    return f"{first:015d}:{count:012d}:{last:015d}:{resolved}"


class AlertStore(AlertReadModel):
    """The read model, plus the monitor's writes and notification claims."""

    def __init__(
        self,
        settings: Settings,
        ttl_s: int,
        recent: int,
        client: aioredis.Redis | None = None,
    ) -> None:
        super().__init__(settings, ttl_s, recent, client)
        self._write = self.client.register_script(_WRITE_ALERTS)

    async def write(
        self,
        transitions: Sequence[Transition],
        drift: dict[str, list[dict[str, Any]]],
        versions: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Alert records (if newer) and drift rows per ``model@version``; failures are
        counted and logged, never raised."""
        try:
            if transitions:
                args: list[Any] = [self.prefix, self.ttl_s, self.recent]
                for t in transitions:
                    r = t.record
                    args += [r["alert_key"], order_text(r), r["state"], r["last_seen"]]
                    args.append(orjson.dumps(r))
                await self._write(keys=[], args=args)
            if drift:
                pipe = self.client.pipeline(transaction=False)
                for version_key, rows in drift.items():
                    key = f"{self.prefix}monitor:drift:{version_key}"
                    pipe.hset(key, mapping={row["signal"]: orjson.dumps(row) for row in rows})
                    pipe.expire(key, self.ttl_s)
                    pipe.sadd(f"{self.prefix}monitor:versions", version_key)
                await pipe.execute()
            if versions:
                pipe = self.client.pipeline(transaction=False)
                for version_key, row in versions.items():
                    key = f"{self.prefix}monitor:version:{version_key}"
                    pipe.set(key, orjson.dumps(row), ex=self.ttl_s)
                    pipe.sadd(f"{self.prefix}monitor:versions", version_key)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            m.ALERT_STORE_WRITES.labels("failed").inc()
            if self.healthy:
                log.warning("alert store write failed", extra={"error": str(exc)})
            self.healthy = False
            return
        m.ALERT_STORE_WRITES.labels("written").inc()
        self.healthy = True

    async def claim(self, transition: Transition, ttl_ms: int) -> bool:
        """True when this process may send this notification (first claim in ``ttl_ms``)."""
        key = f"{self.prefix}alerts:gate:{transition.key}:{transition.event}"
        try:
            return bool(await self.client.set(key, "1", nx=True, px=max(1, ttl_ms)))
        except (RedisError, OSError) as exc:
            log.warning("notification gate unavailable; sending", extra={"error": str(exc)})
            return True
