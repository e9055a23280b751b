"""The ``jobd`` command."""

from __future__ import annotations

import os
import signal
import sys

import trio

from jobd._alloc import tune_allocator
from jobd._config import ServerConfig, parse_args
from jobd._log import EventLog
from jobd._notify import (
    notify_ready,
    notify_reloading,
    notify_stopping,
    notify_watchdog,
    watchdog_interval,
)
from jobd._server import Server, serve
from jobd._telemetry import NULL, Telemetry, TelemetryError
from jobd._telemetry_factory import open_telemetry
from jobd._tls import TLSConfigError
from jobd._version import __version__
from jobd.engine import EngineError


async def _watchdog(interval: float) -> None:
    """Ping systemd's watchdog from the event loop: a frozen loop stops the pings."""
    while True:
        notify_watchdog()
        await trio.sleep(interval)


async def _run(config: ServerConfig, log: EventLog, telemetry: Telemetry = NULL) -> None:
    async with trio.open_nursery() as watchdog:
        interval = watchdog_interval()
        if interval is not None:
            watchdog.start_soon(_watchdog, interval)
        watchdog.start_soon(log.write_batches)
        await _serve_until_signalled(config, log, telemetry)
        watchdog.cancel_scope.cancel()


async def _serve_until_signalled(config: ServerConfig, log: EventLog,
                                 telemetry: Telemetry) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(lambda task_status: serve(
                config, log=log, telemetry=telemetry, task_status=task_status))
            notify_ready(f"listening on port {server.port}")
            async for signum in signals:
                if signum == signal.SIGHUP:
                    notify_reloading()
                    server.reload_tls()
                    notify_ready(f"listening on port {server.port}")
                    continue
                log.info("signal", name=signal.Signals(signum).name)
                notify_stopping()
                server.request_shutdown()
                break


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # `jobd ca ...` and `jobd cert ...` before the daemon's parser (which requires
    # -c/-k/-C); their module imports cryptography only when one of them runs.
    if args and args[0] in ("ca", "cert"):
        from jobd._ca import main as ca_main

        return ca_main(args)
    config = parse_args(argv)
    tune_allocator()
    log = EventLog(config.log_format, config.log_level)
    try:
        telemetry = open_telemetry(config.telemetry, service_version=__version__, log=log)
    except TelemetryError as problem:
        log.error("startup-failed", reason=str(problem))
        return 1
    if telemetry.enabled:
        log.sink = telemetry.log_record
        log.info("telemetry", exporter="otlp", protocol="http/protobuf",
                 endpoint=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "default")
    status = 0
    try:
        trio.run(_run, config, log, telemetry)
    except* TLSConfigError as group:
        for exc in _leaves(group):
            log.error("startup-failed", reason=str(exc))
        status = 1
    except* OSError as os_group:
        for err in _leaves(os_group):
            log.error("startup-failed", reason=_os_reason(err, config))
        status = 1
    except* EngineError as engine_group:  # limits this machine cannot enforce
        for exc in _leaves(engine_group):
            log.error("startup-failed", reason=str(exc))
        status = 1
    finally:
        log.sink = None
        telemetry.shutdown()
    return status


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside (possibly nested) groups."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _os_reason(exc: BaseException, config: ServerConfig) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else f" on {config.address}:{config.port}"
        return f"{exc.strerror.lower()}{where}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
