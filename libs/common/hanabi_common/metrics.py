"""Prometheus metrics of a daemon (prometheus_client): its RPC traffic and its own gauges.

Every daemon has a registry of its own with
- `hanabi_rpc_requests_total{daemon,method,outcome}` and
  `hanabi_rpc_request_seconds{daemon,method}`, fed by the RPC server;
- the gauges its service reports at scrape time: a service with a `metrics()` method
  returns `{name: (help, value)}` where value is a number, or a `LabelledGauge` (a number
  per value of one label), read fresh on every scrape.
They are served by the `metrics` RPC method (`hanabi-<daemon> ctl metrics`) and, when
`[metrics] port_base` is set, over HTTP on `[metrics] listen`:port_base + the daemon's
index (vmmd, netd, blockd, agentd), path /metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("hanabi.metrics")
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


@dataclass(frozen=True)
class LabelledGauge:
    """A gauge value per value of one label (e.g. VMs per state)."""

    label: str
    values: Mapping[str, float]


Value = float | LabelledGauge
Gauges = Mapping[str, tuple[str, Value]]


class ServiceCollector(Collector):
    """Turns a service's `metrics()` dict into gauges at scrape time."""

    def __init__(self, daemon: str, read: Callable[[], Gauges]) -> None:
        self.daemon = daemon
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges as of now (a failing read yields none and is logged)."""
        try:
            gauges = self.read()
        except Exception:  # noqa: BLE001 - a scrape must not break the daemon
            log.exception("metrics not read", extra={"daemon": self.daemon})
            return
        for name, (help_text, value) in sorted(gauges.items()):
            if isinstance(value, LabelledGauge):
                family = GaugeMetricFamily(name, help_text, labels=["daemon", value.label])
                for label_value, number in sorted(value.values.items()):
                    family.add_metric([self.daemon, label_value], float(number))
            else:
                family = GaugeMetricFamily(name, help_text, labels=["daemon"])
                family.add_metric([self.daemon], float(value))
            yield family


class DaemonMetrics:
    """One daemon's registry: RPC counters and latency, and its service's gauges."""

    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("hanabi_rpc_requests", "RPC requests served, by method and outcome",
                                ["daemon", "method", "outcome"], registry=self.registry)
        self.latency = Histogram("hanabi_rpc_request_seconds", "Time to serve an RPC request",
                                 ["daemon", "method"], buckets=RPC_BUCKETS, registry=self.registry)

    def observe_call(self, method: str, outcome: str, seconds: float) -> None:
        """Count one served request (unknown methods are counted under one name)."""
        self.requests.labels(self.daemon, method, outcome).inc()
        self.latency.labels(self.daemon, method).observe(seconds)

    def add_service(self, read: Callable[[], Gauges]) -> None:
        """Report the service's own gauges on every scrape."""
        self.registry.register(ServiceCollector(self.daemon, read))

    def text(self) -> str:
        """The Prometheus text exposition of everything."""
        return generate_latest(self.registry).decode()

    def serve_http(self, address: str, port: int) -> None:
        """Serve /metrics over HTTP on address:port (a daemon thread of prometheus_client)."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics over http", extra={"address": address, "port": port})
