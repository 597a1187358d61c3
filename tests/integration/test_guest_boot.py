"""Boot the built guest under QEMU TCG and drive the agent end to end.

Needs root, qemu-system-x86_64, mke2fs, a static busybox (for the container rootfs) and an
image built by ``hanabi-image build`` at /var/lib/hanabi/guest/current. The QMP and
virtio-serial plumbing here is deliberately minimal; vmmd/agentd have the real ones.
Run with ``-s`` to see the measured timings.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest

import hanabi_wire as P
from hanabi_image.elf import Elf
from hanabi_wire import KERNEL_CMDLINE


GUEST = Path(os.environ.get("HANABI_GUEST_DIR", "/var/lib/hanabi/guest/current"))  # as tests.helpers.hanabi
BUSYBOX = Path("/bin/busybox")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (QEMU disk images and /var/lib/hanabi)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not on PATH (apt-get install qemu-system-x86)"
    if shutil.which("mke2fs") is None:
        return "mke2fs not on PATH (e2fsprogs)"
    for f in ("vmlinux", "initrd.img", "manifest.json"):
        if not (GUEST / f).exists():
            return f"no built guest image: {GUEST / f} missing (run `hanabi-image build`)"
    if not BUSYBOX.exists() or Elf.load(str(BUSYBOX)).interpreter() is not None:
        return f"{BUSYBOX} is not a static busybox (apt-get install busybox-static)"
    return None


_reason = _skip_reason()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


class Qmp:
    """Just enough QMP: greeting, qmp_capabilities, commands; events are skipped."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        json.loads(self.file.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, execute: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            resp = json.loads(self.file.readline())
            if "return" in resp:
                return resp["return"]
            if "error" in resp:
                raise RuntimeError(f"QMP {execute}: {resp['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Agent:
    """A host end of the virtio-serial agent channel (QEMU's chardev socket)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.connect()
        self.next_id = 0

    def connect(self, sync: bool = False) -> None:
        """Connect; with ``sync`` do what a reconnecting agentd does: SYNC, skip to the agent's SYNC."""
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path)
        self.dec = P.FrameDecoder(wait_sync=sync)
        self.inbox: list[dict[str, Any]] = []
        if sync:
            self.sock.sendall(P.SYNC)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(P.encode_frame(msg))

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.inbox):
                if pred(m):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message in {timeout} s; inbox={self.inbox}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                raise EOFError("QEMU closed the agent socket")
            self.inbox += self.dec.feed(data)

    def request(self, mtype: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        self.send({"type": mtype, "id": rid, **fields})
        rep = self.wait_for(lambda m: m.get("type") == "reply" and m.get("id") == rid, timeout)
        assert rep["ok"] is True, rep
        return rep["result"]

    def exit_of(self, exec_id: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for(lambda m: m.get("type") == "exit" and m.get("exec_id") == exec_id, timeout)

    def output(self, exec_id: str, stream: str = "stdout") -> bytes:
        out = b""
        for m in [m for m in self.inbox if m.get("type") == "output" and m.get("exec_id") == exec_id
                  and m.get("stream") == stream]:
            self.inbox.remove(m)
            out += m["data"]
        return out


def agent_cpu_ticks(agent: Agent, process: dict[str, Any], exec_id: str) -> int:
    """utime + stime (1/100 s) of the guest's PID 1, the agent, read from inside the container."""
    agent.request("exec", container_id="c1", exec_id=exec_id, process={**process, "args": ["cat", "/proc/1/stat"]})
    assert agent.exit_of(exec_id)["exit_code"] == 0
    fields = agent.output(exec_id).decode().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def make_rootfs(tmp: Path) -> Path:
    """A tiny ext4 image with a static busybox and its applets."""
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    img = tmp / "rootfs.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), str(img), "32M"], check=True,
                   capture_output=True)
    return img


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[dict[str, Any]]:
    sock, qmp_path, console = tmp_path / "agent.sock", tmp_path / "qmp.sock", tmp_path / "console.log"
    cmd = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256", "-nodefaults", "-no-user-config",
           "-display", "none", "-no-reboot", "-kernel", str(GUEST / "vmlinux"), "-initrd", str(GUEST / "initrd.img"),
           "-append", KERNEL_CMDLINE, "-device", "pcie-root-port,id=rp0,chassis=1", "-device", "virtio-serial-pci",
           "-chardev", f"socket,id=ch0,path={sock},server=on,wait=off",
           "-device", "virtserialport,chardev=ch0,name=agent.0",
           "-serial", f"file:{console}", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not (sock.exists() and qmp_path.exists()):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "qemu died"
            assert time.monotonic() < deadline, "QEMU did not create its sockets"
            time.sleep(0.005)
        yield {"proc": proc, "t0": t0, "sock": str(sock), "qmp": str(qmp_path), "console": console, "tmp": tmp_path}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if console.exists():
            print("---- guest console (tail) ----\n" + console.read_text(errors="replace")[-3000:])


def test_boot_hotplug_run_and_power_off(vm: dict[str, Any]) -> None:
    manifest = json.loads((GUEST / "manifest.json").read_text())
    rootfs_img = make_rootfs(vm["tmp"])
    agent = Agent(vm["sock"])

    # The agent is PID 1 after ~3-4 s of TCG boot; ping until it answers.
    pong = None
    sent: set[int] = set()
    deadline = time.monotonic() + 60
    while pong is None:
        agent.next_id += 1
        sent.add(agent.next_id)
        agent.send({"type": "ping", "id": agent.next_id, **P.ping_fields()})
        try:  # pings sent before the agent opened its port are delivered then: any answer counts
            pong = agent.wait_for(lambda m: m.get("type") == "reply" and m.get("id") in sent, 0.5)
        except TimeoutError:
            assert time.monotonic() < deadline, "agent never answered"
    ready_s = time.monotonic() - vm["t0"]
    assert pong["result"]["kernel"] == manifest["kernel_release"]
    print(f"\nboot to agent answering: {ready_s:.2f} s (guest uptime {pong['result']['uptime_s']:.2f} s)")

    qmp = Qmp(vm["qmp"])
    t = time.monotonic()
    qmp.cmd("blockdev-add", driver="raw", **{"node-name": "rootfs0"},
            file={"driver": "file", "filename": str(rootfs_img)})
    qmp.cmd("device_add", driver="virtio-blk-pci", drive="rootfs0", bus="rp0", serial="hanabi-rootfs", id="vd0")
    process = {"args": ["uname", "-r"], "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
               "user": {"uid": 0, "gid": 0}, "terminal": False}
    agent.request("create_container", container_id="c1", hostname="hanabi-test",
                  rootfs={"serial": "hanabi-rootfs", "fstype": "ext4", "readonly": False}, process=process)
    print(f"hotplug + create_container (mounts): {time.monotonic() - t:.3f} s")
    t = time.monotonic()
    assert agent.request("start", container_id="c1")["pid"] > 1
    ex = agent.exit_of("init")
    print(f"start + `uname -r` exit: {time.monotonic() - t:.3f} s")
    assert (ex["exit_code"], ex["signal"]) == (0, None)
    assert agent.output("init").decode() == manifest["kernel_release"] + "\n"

    agent.request("exec", container_id="c1", exec_id="e3", process={**process, "args": ["sh", "-c", "exit 3"]})
    assert agent.exit_of("e3")["exit_code"] == 3

    # No host connected for 2 s: the agent (PID 1) must not spin on virtio-serial POLLHUP.
    # Then a reconnecting host (SYNC) gets a clean stream, with what was queued meanwhile.
    cpu0 = agent_cpu_ticks(agent, process, "s0")
    agent.request("exec", container_id="c1", exec_id="bg", process={**process, "args": ["sh", "-c", "sleep 1; echo late"]})
    agent.sock.close()
    time.sleep(2)
    t = time.monotonic()
    agent.connect(sync=True)
    assert agent.request("ping", **P.ping_fields())["agent_version"] == manifest["agent_version"]
    print(f"reconnect + SYNC + ping: {time.monotonic() - t:.3f} s")
    assert agent.exit_of("bg")["exit_code"] == 0 and agent.output("bg") == b"late\n"
    idle = agent_cpu_ticks(agent, process, "s1") - cpu0
    print(f"agent CPU while the host was away ~2 s: {idle / 100:.2f} s")
    assert idle < 60, f"agent used {idle / 100:.2f} s CPU in ~2 s without a host: spinning?"

    check = ("test -c /dev/null && test -e /proc/self/status && test -d /dev/pts && test -d /dev/shm "
             "&& test -d /sys/class && hostname && cat /proc/self/cgroup && cat")
    agent.request("exec", container_id="c1", exec_id="chk", process={**process, "args": ["sh", "-c", check]})
    agent.send({"type": "stdin", "container_id": "c1", "exec_id": "chk", "data": b"via stdin\n"})
    agent.request("close_stdin", container_id="c1", exec_id="chk")
    ex = agent.exit_of("chk")
    assert ex["exit_code"] == 0, agent.output("chk", "stderr")
    assert agent.output("chk") == b"hanabi-test\n0::/hanabi-c1\nvia stdin\n"

    # Orphans are re-parented to the agent (PID 1), which must reap them: no zombies left.
    orphan = "(sleep 0.2 &); sleep 1; cat /proc/[0-9]*/stat | awk '$3 == \"Z\"' | wc -l"
    agent.request("exec", container_id="c1", exec_id="orph", process={**process, "args": ["sh", "-c", orphan]})
    assert agent.exit_of("orph")["exit_code"] == 0
    assert agent.output("orph").strip() == b"0", agent.output("orph", "stderr")

    agent.request("exec", container_id="c1", exec_id="sl", process={**process, "args": ["sleep", "600"]})
    procs = agent.request("ps", container_id="c1")["processes"]
    assert [p["exec_id"] for p in procs] == ["sl"]
    agent.request("destroy_container", container_id="c1")
    assert agent.exit_of("sl", timeout=1)["signal"] == 9

    t = time.monotonic()
    agent.request("shutdown")
    assert vm["proc"].wait(30) == 0
    print(f"shutdown reply to QEMU exit: {time.monotonic() - t:.3f} s")
    qmp.close()
