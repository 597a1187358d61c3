"""Every daemon killed with SIGKILL and restarted while a container runs: nothing is lost
(the container keeps running, keeps its network and its DNS relay, answers exec, and its exit after a
SIGTERM is still seen and ends its stand-in) and nothing leaks after delete."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hanabi_common.config import DAEMONS
from tests.helpers.hanabi import daemons_for_test, leftovers
from tests.helpers.netns import netns_pair
from hanabi_runtime.demo_bundle import make_bundle

pytestmark = pytest.mark.integration


@pytest.fixture
def daemons(tmp_path):
    with daemons_for_test(tmp_path / "hanabi") as started:
        yield started


def test_all_daemons_killed_and_restarted_while_a_container_runs(daemons, tmp_path):
    pair = netns_pair()
    cid = "survivor"
    dns = None
    try:
        # Docker's embedded DNS stands in the namespace on 127.0.0.11:53; resolv.conf names it.
        dns = subprocess.Popen(["ip", "netns", "exec", pair.inner, sys.executable, "-m", "tests.helpers.dns_stub",
                                "127.0.0.11", "53", "10.9.8.7"], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
        assert dns.stdout.readline().strip() == "ready"
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.11\noptions ndots:0\n")
        bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", "trap 'exit 42' TERM; while true; do sleep 1; done"])
        config = json.loads((bundle / "config.json").read_text())
        config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"] + [
            {"type": "network", "path": pair.inner_path}]
        config["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv),
                                 "options": ["rbind", "ro"]})
        (bundle / "config.json").write_text(json.dumps(config))
        daemons.runtime("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), cid, check=True)
        daemons.runtime("start", cid, check=True)
        standin = int((tmp_path / "pid").read_text())
        assert daemons.state(cid)["status"] == "running"

        lookup = "nslookup db.example 127.0.0.11"
        before = daemons.runtime("exec", cid, "sh", "-c", lookup)
        assert "10.9.8.7" in before.stdout.decode(), before.stdout.decode() + before.stderr.decode()

        for name in DAEMONS:
            daemons.stop(name, sig=signal.SIGKILL)
        for name in DAEMONS:
            daemons.start(name)

        state = daemons.state(cid)
        assert state["status"] == "running" and state["pid"] == standin
        after = daemons.runtime("exec", cid, "sh", "-c", lookup)  # the relay was found back too
        assert "10.9.8.7" in after.stdout.decode(), after.stdout.decode() + after.stderr.decode()
        # And over TCP (what a resolver does after a truncated answer): a length-prefixed query
        # through busybox nc; the stub's answer is the question plus one 16-byte A record.
        query = bytes.fromhex("abcd01000001000000000000") + b"\x02db\x07example\x00\x00\x01\x00\x01"
        framed = len(query).to_bytes(2, "big") + query
        octal = "".join(f"\\{byte:03o}" for byte in framed)
        tcp = daemons.runtime("exec", cid, "sh", "-c", f"printf '{octal}' | nc -w 5 127.0.0.11 53 | od -An -tx1")
        got = bytes.fromhex("".join(tcp.stdout.decode().split()))
        assert got[:2] == (len(query) + 16).to_bytes(2, "big") and got[2:4] == b"\xab\xcd", tcp
        assert got.endswith(bytes([10, 9, 8, 7])), tcp
        done = daemons.runtime("exec", cid, "sh", "-c", "echo still here; cat /sys/class/net/eth0/address")
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().splitlines() == ["still here", pair.mac()]
        pinged = subprocess.run(["ip", "netns", "exec", pair.outer, "busybox", "ping", "-c", "1", "-W", "5",
                                 pair.inner_ip], capture_output=True, text=True)
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr

        daemons.runtime("kill", cid, "TERM", check=True)
        daemons.wait_stopped(cid, 30, "the container did not stop after SIGTERM")
        daemons.runtime("delete", cid, check=True)
        assert leftovers(daemons, cid) == []
        assert pair.leftovers() == []
        assert not Path(f"/proc/{standin}").exists() or "zombie" in Path(f"/proc/{standin}/status").read_text()
    finally:
        daemons.runtime("delete", "--force", cid)
        if dns is not None:
            dns.kill()
            dns.wait()
        pair.destroy()
