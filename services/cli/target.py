"""Which cluster a command is about to change, said before it changes it.

On stderr, so machine-readable output on stdout stays clean. A new shell with a dev stack
running talks to the dev broker without any configuration: this line makes that visible.
"""

from __future__ import annotations

import sys

from services.common.settings import Settings


def announce_kafka(settings: Settings) -> None:
    from services.common.devstack import setting_origin

    origin = setting_origin(settings, "kafka_bootstrap")
    prefix = f", topics prefixed {settings.topic_prefix!r}" if settings.topic_prefix else ""
    _say(f"Kafka {settings.require_bootstrap()}{' ' + origin if origin else ''}{prefix}")


def announce_redis(settings: Settings) -> None:
    from services.common.devstack import setting_origin

    origin = setting_origin(settings, "redis_url")
    _say(
        f"Redis {settings.require_redis()}{' ' + origin if origin else ''}, "
        f"keys prefixed {settings.redis_key_prefix!r}"
    )


def _say(where: str) -> None:
    print(f"cluster: {where}", file=sys.stderr, flush=True)
