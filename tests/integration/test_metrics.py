"""Prometheus metrics of the four real daemons: over their `metrics` RPC (what `ctl metrics`
prints) and over HTTP on loopback when `[metrics] port_base` is set."""

from __future__ import annotations

import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hanabi_common.config import DAEMONS
from tests.helpers.hanabi import BIN, daemons_for_test

pytestmark = pytest.mark.integration


def free_port_run(count: int) -> int:
    """A port p with p..p+count-1 all free on loopback right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no run of free ports")


@pytest.fixture
def daemons(tmp_path):
    base = free_port_run(len(DAEMONS))
    with daemons_for_test(tmp_path / "hanabi", extra_toml=f"[metrics]\nport_base = {base}\n") as started:
        started.port_base = base
        yield started


def names(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


def test_every_daemon_serves_its_metrics(daemons):
    expected = {"vmmd": {"hanabi_vms", "hanabi_pool_free"}, "netd": {"hanabi_networks", "hanabi_network_taps"},
                "blockd": {"hanabi_block_volumes", "hanabi_block_pool_free_bytes"},
                "agentd": {"hanabi_agents", "hanabi_dns_relay_queries"}}
    for index, daemon in enumerate(DAEMONS):
        ctl = subprocess.run([str(BIN / f"hanabi-{daemon}"), "ctl", "--config", str(daemons.config_path), "metrics"],
                             capture_output=True, text=True, timeout=30)
        assert ctl.returncode == 0, ctl.stderr
        assert expected[daemon] | {"hanabi_rpc_requests", "hanabi_rpc_request_seconds"} <= names(ctl.stdout)
        with urllib.request.urlopen(f"http://127.0.0.1:{daemons.port_base + index}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert expected[daemon] <= names(text)
        assert f'daemon="{daemon}"' in text
