"""Which cluster a command is about to change, said before it changes it.

On stderr, so machine-readable output on stdout stays clean. A new shell with a dev stack
running talks to the dev broker without any configuration: this line makes that visible,
and says when a global flag (--bootstrap-server, --redis-url) won over the environment.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from services.cli.context import flag_origin

if TYPE_CHECKING:
    from services.common.settings import Settings


def origin(settings: Settings, name: str) -> str:
    """Where a setting came from: a global flag, SCOREMESH_<NAME> or the dev stack."""
    from services.common.devstack import setting_origin

    return flag_origin(name) or setting_origin(settings, name)


def announce_kafka(settings: Settings) -> None:
    where = origin(settings, "kafka_bootstrap")
    prefix = f", topics prefixed {settings.topic_prefix!r}" if settings.topic_prefix else ""
    _say(f"Kafka {settings.require_bootstrap()}{' ' + where if where else ''}{prefix}")


def announce_redis(settings: Settings) -> None:
    where = origin(settings, "redis_url")
    _say(
        f"Redis {settings.require_redis()}{' ' + where if where else ''}, "
        f"keys prefixed {settings.redis_key_prefix!r}"
    )


def _say(where: str) -> None:
    print(f"cluster: {where}", file=sys.stderr, flush=True)
