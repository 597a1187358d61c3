"""agentd over Firecracker's hybrid vsock, end to end on real Unix sockets with the REAL
guest agent: the agent (hanabi_guest, in a subprocess with DirSandbox) serves its
VsockChannel on a listening socket standing for AF_VSOCK port 1024; a relay speaking
Firecracker's host-side protocol (CONNECT <port> / OK <host port>, tests/helpers/
hybrid_vsock.py) stands for Firecracker; agentd's AgentService connects the way vmmd's
VmInfo says (agent_transport "hybrid_vsock", agent_port 1024) and runs a container."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from hanabi_agentd.channel import address_for
from hanabi_agentd.service import AgentService
from hanabi_common.config import AgentConfig, Config
from hanabi_common.errors import DeadlineExceeded, InvalidArgument
from hanabi_common.models.agentd import ConnectAgent, ContainerRef, CreateContainer, RootfsSpec
from hanabi_common.models.base import SandboxRef

from tests.helpers.hybrid_vsock import HybridVsockRelay

GUEST = """
import socket, sys
from hanabi_guest.agent import Agent
from hanabi_guest.channel import VsockChannel
from hanabi_guest.sandbox import DirSandbox
listener = socket.socket(fileno=int(sys.argv[1]))
Agent(VsockChannel(listener=listener), DirSandbox(sys.argv[2])).run()
"""


@pytest.fixture
def fc_vm():
    """A real guest agent behind a hybrid vsock relay: {'vsock': host socket path, ...}."""
    root = tempfile.mkdtemp(prefix="hhv")
    rootfs = os.path.join(root, "rootfs")
    os.mkdir(rootfs)
    guest_port = os.path.join(root, "guest-1024.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(guest_port)
    listener.listen(1)
    agent = subprocess.Popen([sys.executable, "-c", GUEST, str(listener.fileno()), rootfs],
                             pass_fds=[listener.fileno()], stderr=subprocess.PIPE)
    listener.close()
    relay = HybridVsockRelay(os.path.join(root, "fc-vsock.sock"), {1024: guest_port})
    config = Config(run_dir=os.path.join(root, "run"),
                    agent=AgentConfig(ready_timeout_s=10.0, request_timeout_s=10.0))
    service = AgentService(config, restore=False)
    yield {"vsock": relay.path, "relay": relay, "service": service, "agent": agent}
    service.close()
    relay.close()
    agent.kill()
    agent.wait(5)
    shutil.rmtree(root, ignore_errors=True)


def proc_spec(*args: str) -> dict:
    return {"args": list(args), "env": ["PATH=/usr/bin:/bin"], "cwd": "/",
            "user": {"uid": os.getuid(), "gid": os.getgid()}}


def test_agentd_reaches_the_real_agent_over_hybrid_vsock_and_runs_a_container(fc_vm):
    svc: AgentService = fc_vm["service"]
    info = svc.connect(ConnectAgent(sandbox_id="sb1", socket_path=fc_vm["vsock"],
                                    transport="hybrid_vsock", port=1024))
    assert info.kernel == os.uname().release  # the real agent answered ping
    assert fc_vm["relay"].requests[0] == b"CONNECT 1024\n"
    details = svc.inspect(SandboxRef(sandbox_id="sb1"))
    assert details.channel_kind == "hybrid-vsock" and details.address == f"hvsock://{fc_vm['vsock']}:1024"

    svc.create(CreateContainer(sandbox_id="sb1", container_id="c1", rootfs=RootfsSpec(serial="r1"),
                               process=proc_spec("sh", "-c", "exit 7")))
    assert svc.start(ContainerRef(sandbox_id="sb1", container_id="c1")).pid > 0
    deadline = time.monotonic() + 10
    while (state := svc.state(ContainerRef(sandbox_id="sb1", container_id="c1"))).status != "stopped":
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    assert state.processes[0].exit_code == 7


def test_a_port_nobody_listens_on_fails_with_the_reason(fc_vm):
    svc: AgentService = fc_vm["service"]
    with pytest.raises(DeadlineExceeded, match="no listener on vsock port 52"):
        svc.connect(ConnectAgent(sandbox_id="sb2", socket_path=fc_vm["vsock"], transport="hybrid_vsock",
                                 port=52, timeout_s=1.0))
    assert set(fc_vm["relay"].requests) == {b"CONNECT 52\n"}


def test_address_for_each_transport():
    assert address_for("/run/a.sock") == "/run/a.sock"
    assert address_for("/run/v.sock", "hybrid_vsock", 1024) == "hvsock:///run/v.sock:1024"
    assert address_for("vsock://3", "vsock", 1024) == "vsock://3:1024"
    for bad in (("/run/v.sock", "hybrid_vsock", None), ("v.sock", "hybrid_vsock", 1),
                ("/x", "vsock", 1), ("/x", "carrier-pigeon", 1)):
        with pytest.raises(InvalidArgument):
            address_for(*bad)
