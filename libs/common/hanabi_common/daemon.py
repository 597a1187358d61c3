"""Running a daemon: logging, the RPC server, signals, sd_notify and the watchdog.

In the spirit of gunicorn's arbiter: the main thread owns the loop, signals only set a
flag, systemd hears READY=1 once the socket is bound and WATCHDOG=1 while the RPC workers
make progress (`rpc.progress`: a canary runs on the pool, no call is stuck past its
deadline); a wedged daemon gets no WATCHDOG=1 and systemd restarts it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Protocol
from collections.abc import Callable

from hanabi_common.config import DAEMONS, Config
from hanabi_common.metrics import DaemonMetrics
from hanabi_common.models.base import NoArgs
from hanabi_common.logs import setup_logging
from hanabi_common.rpc.progress import Watchdog
from hanabi_common.rpc.server import RpcServer
from hanabi_common.sdnotify import notify, watchdog_interval


class Service(Protocol):
    """What a daemon's domain object offers the runner."""

    def register(self, server: RpcServer) -> None:
        """Register the daemon's RPC methods."""

    def close(self) -> None:
        """Release what the daemon holds in memory (never the sandboxes themselves)."""

    # Optional: `metrics() -> hanabi_common.metrics.Gauges`, read at every scrape.


def serve(name: str, config: Config, build: Callable[[Config], Service],
          pid_file: Path | None = None) -> int:
    """Run daemon `name` until SIGTERM/SIGINT; returns the process exit code."""
    log = setup_logging(name, config.log_level)
    config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    config.sandboxes_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    service = build(config)
    interval = watchdog_interval()
    ticks: list[Callable[[], None]] = []

    def tick() -> None:
        for each in ticks:
            each()

    metrics = DaemonMetrics(name)
    if hasattr(service, "metrics"):
        metrics.add_service(service.metrics)
    server = RpcServer(name, config.endpoint(name), max_message_bytes=config.rpc.max_message_bytes,
                       workers=config.rpc.workers, on_tick=tick, on_call=metrics.observe_call,
                       stall_s=2 * interval if interval else 30.0)
    ticks.append(Watchdog(interval, server.progress, notify, log).tick)
    service.register(server)
    server.register("metrics", NoArgs, lambda _: {"text": metrics.text()},
                    "Prometheus text exposition of the daemon's metrics.")
    if config.metrics.port_base:
        metrics.serve_http(config.metrics.listen, config.metrics.port_base + DAEMONS.index(name))

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def ready() -> None:
        if pid_file is not None:
            pid_file.parent.mkdir(parents=True, exist_ok=True)
            pid_file.write_text(f"{os.getpid()}\n")
        notify("READY=1", f"STATUS=serving on {config.endpoint(name)}", f"MAINPID={os.getpid()}")
        log.info("ready", extra={"config": str(config.source) if config.source else "defaults"})

    try:
        server.serve_forever(ready=ready)
    finally:
        notify("STOPPING=1")
        service.close()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    return 0
