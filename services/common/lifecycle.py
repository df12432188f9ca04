"""Process lifecycle: signals, graceful shutdown within a deadline, the health endpoint."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from typing import Protocol

from services.common.devstack import announce_service, withdraw_service
from services.common.health import CannotListen, HealthServer
from services.common.logs import configure_logging
from services.common.settings import ConfigError, Settings

log = logging.getLogger(__name__)


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def run(self, stop: asyncio.Event) -> None: ...

    async def stop(self) -> None: ...

    def register_checks(self, health: HealthServer) -> None: ...


def tune_collector(thresholds: tuple[int, ...] | None) -> None:
    """The collector as a started service has it. Start-up objects (models, schemas,
    libraries) live for the whole process: moved out of the collector's way, so full
    collections stop adding 10-20 ms to the tail. A service whose heap grows with its state
    (the label join) may ask for rarer collections: its optional attribute
    ``gc_thresholds``, as for gc.set_threshold."""
    gc.collect()
    gc.freeze()
    if thresholds:
        gc.set_threshold(*thresholds)


async def serve(make: Callable[[], Service], settings: Settings, name: str) -> int:
    """Run a service until SIGTERM/SIGINT; finish the in-flight batch and close in time."""
    health = HealthServer(name, settings.metrics_host, settings.metrics_port)
    try:
        await health.start()  # first: a taken port then leaves no client to close
    except CannotListen as exc:  # one line naming the setting, not a traceback
        log.error(str(exc))
        log.info("service stopped", extra={"exit_code": 1})
        return 1
    service = make()  # clients bind to the running loop, so build inside it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service.register_checks(health)
    exit_code = 0
    announced = None
    try:
        announced = announce_service(service.name, health.port, settings)
        await service.start()
        api_port = getattr(service, "port", None)  # a service with its own listener (query)
        if isinstance(api_port, int):
            announced = announce_service(service.name, health.port, settings, api_port)
        tune_collector(getattr(service, "gc_thresholds", None))
        log.info("service started", extra={"topic_prefix": settings.topic_prefix})
        await service.run(stop)
    except ConfigError as exc:
        # A setting to change (a port taken, a broker feature refused): one line says which.
        log.error(str(exc))
        exit_code = 1
    except Exception:
        log.exception("service failed")
        exit_code = 1
    finally:
        withdraw_service(announced)
        try:
            await asyncio.wait_for(service.stop(), settings.shutdown_deadline_s)
        except TimeoutError:
            log.error(
                "shutdown deadline passed", extra={"deadline_s": settings.shutdown_deadline_s}
            )
            exit_code = exit_code or 1
        await health.stop()
    log.info("service stopped", extra={"exit_code": exit_code})
    return exit_code


def run_service(name: str, make: Callable[[], Service], settings: Settings) -> int:
    configure_logging(name, settings.log_level)
    try:
        import uvloop
    except ImportError:  # optional: the stdlib loop works, a little slower
        return asyncio.run(serve(make, settings, name))
    return int(uvloop.run(serve(make, settings, name)))
