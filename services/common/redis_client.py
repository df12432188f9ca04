"""One way to reach Redis: the client every service uses, with the same timeouts."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.settings import Settings

# Short timeouts: Redis is a query store beside Kafka, never worth stalling a batch for.
SOCKET_TIMEOUT_S = 2.0


def connect(settings: Settings) -> aioredis.Redis:
    return aioredis.from_url(
        settings.require_redis(),
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
    )


async def answers(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
