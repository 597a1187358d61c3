"""A daemon's Prometheus metrics: RPC counters and latency fed by the real RPC server, and
a service's gauges read at scrape time."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families

from hanabi_common.metrics import DaemonMetrics, LabelledGauge
from hanabi_common.models.base import NoArgs
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.server import RpcServer


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_service_gauges_are_read_at_every_scrape():
    metrics = DaemonMetrics("vmmd")
    running = {"n": 1}
    metrics.add_service(lambda: {"hanabi_vms": ("VMs by state", LabelledGauge("state", {"running": running["n"]})),
                                 "hanabi_pool_free": ("free", 2)})
    first = samples(metrics.text())
    assert first[("hanabi_vms", (("daemon", "vmmd"), ("state", "running")))] == 1
    assert first[("hanabi_pool_free", (("daemon", "vmmd"),))] == 2
    running["n"] = 3
    assert samples(metrics.text())[("hanabi_vms", (("daemon", "vmmd"), ("state", "running")))] == 3


def test_a_failing_service_read_does_not_break_the_scrape():
    metrics = DaemonMetrics("netd")
    metrics.add_service(lambda: 1 / 0)
    assert "hanabi_rpc_requests" in metrics.text()


def test_the_rpc_server_counts_calls_by_method_and_outcome(tmp_path):
    metrics = DaemonMetrics("testd")
    server = RpcServer("testd", f"ipc://{tmp_path}/t.sock", on_call=metrics.observe_call)
    server.register("fail", NoArgs, lambda _: 1 / 0)
    bound = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"ready": bound.set}, daemon=True)
    thread.start()
    assert bound.wait(10)
    client = RpcClient("testd", f"ipc://{tmp_path}/t.sock", timeout=5)
    try:
        client.ping()
        client.ping()
        for method in ("fail", "no.such.method"):
            try:
                client.call(method, {})
            except Exception:  # noqa: BLE001 - the error reply is what is counted
                pass
    finally:
        server.stop()
        thread.join(5)
    seen = samples(metrics.text())
    assert seen[("hanabi_rpc_requests_total", (("daemon", "testd"), ("method", "ping"), ("outcome", "ok")))] == 2
    assert seen[("hanabi_rpc_requests_total", (("daemon", "testd"), ("method", "fail"),
                                               ("outcome", "INTERNAL")))] == 1
    assert seen[("hanabi_rpc_requests_total", (("daemon", "testd"), ("method", "(unknown)"),
                                               ("outcome", "NOT_FOUND")))] == 1
    assert seen[("hanabi_rpc_request_seconds_count", (("daemon", "testd"), ("method", "ping")))] == 2
