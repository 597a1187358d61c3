"""Build-time smoke test: run the agent with the *trimmed* guest interpreter on the host.

The initramfs only carries the stdlib modules the agent was seen to import; a module that
some stdlib function imports lazily (``os.execvpe`` -> ``warnings``, say) would only fail
inside the VM. So the builder starts the agent from the assembled tree in host mode
(``--fd``: socketpair channel, ``DirSandbox``: no mounts, no chroot) and walks it through
its code paths: ping, create, exec with output/stdin/exit, a failed exec, signal, ps,
an exec on a pty with a resize, an unknown request, destroy and shutdown.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from typing import Any

import hanabi_wire as P


class SelfTestError(RuntimeError):
    """The trimmed guest interpreter could not run the agent."""


def _exchange(sock: socket.socket, dec: P.FrameDecoder, inbox: list[dict[str, Any]], msg: dict[str, Any],
              want: str, timeout: float = 20.0) -> dict[str, Any]:
    if msg:
        sock.sendall(P.encode_frame(msg))
    deadline = time.monotonic() + timeout
    while True:
        for i, m in enumerate(inbox):
            if (want == "reply" and m.get("id") == msg.get("id")) or (want != "reply" and m.get("type") == want):
                return inbox.pop(i)
        left = deadline - time.monotonic()
        if left <= 0:
            raise SelfTestError(f"agent self-test: no {want} for {msg.get('type')}; got {inbox}")
        sock.settimeout(left)
        data = sock.recv(1 << 20)
        if not data:
            raise SelfTestError("agent self-test: the agent closed the channel")
        inbox += dec.feed(data)


def run(python: str, agent_path: str) -> None:
    """Drive the agent under ``python`` (imports from ``agent_path``); raise on any failure."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    with tempfile.TemporaryDirectory() as rootfs:
        code = (f"import sys; sys.path.insert(0, {agent_path!r}); from hanabi_guest.agent import main; "
                f"main(['--fd', '{fd}', '--rootfs-dir', {rootfs!r}])")
        proc = subprocess.Popen([python, "-I", "-S", "-B", "-c", code], pass_fds=[fd],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        theirs.close()
        dec = P.FrameDecoder()
        inbox: list = []
        try:
            def req(i: int, mtype: str, **fields: Any) -> dict[str, Any]:
                return _exchange(ours, dec, inbox, {"type": mtype, "id": i, **fields}, "reply")

            def ok(i: int, mtype: str, **fields: Any) -> dict[str, Any]:
                rep = req(i, mtype, **fields)
                if not rep.get("ok"):
                    raise SelfTestError(f"agent self-test: {mtype} failed: {rep}")
                result: dict[str, Any] = rep["result"]
                return result

            spec = {"args": ["sh", "-c", "cat; echo err >&2; exit 3"], "env": ["A=b"], "cwd": "/",
                    "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 1024}]}
            if ok(1, "ping", **P.ping_fields()).get("protocol") != P.PROTOCOL_VERSION:
                raise SelfTestError("agent self-test: ping did not state the protocol version")
            ok(2, "create_container", container_id="t", rootfs={"serial": "x"}, process=spec, hostname="h")
            ok(3, "exec", container_id="t", exec_id="e", process=spec)
            ours.sendall(P.encode_frame({"type": P.T_STDIN, "container_id": "t", "exec_id": "e", "data": b"in"}))
            ok(4, "close_stdin", container_id="t", exec_id="e")
            ex = _exchange(ours, dec, inbox, {}, "exit")
            if ex.get("exit_code") != 3:
                raise SelfTestError(f"agent self-test: unexpected exit {ex}")
            if req(5, "exec", container_id="t", exec_id="m", process={**spec, "args": ["no-such-cmd"]})["ok"]:
                raise SelfTestError("agent self-test: exec of a missing command succeeded")
            ok(6, "exec", container_id="t", exec_id="s", process={**spec, "args": ["sh", "-c", "sleep 30"]})
            ok(7, "ps", container_id="t")
            ok(8, "signal", container_id="t", exec_id="s", signal=9)
            tty = {**spec, "args": ["sh", "-c", "read x; stty size"], "terminal": True,
                   "consoleSize": {"height": 5, "width": 6}}
            ok(20, "exec", container_id="t", exec_id="tty", process=tty)
            ok(21, "resize", container_id="t", exec_id="tty", height=12, width=34)
            ours.sendall(P.encode_frame({"type": P.T_STDIN, "container_id": "t", "exec_id": "tty",
                                         "data": b"go\n"}))
            while (ex := _exchange(ours, dec, inbox, {}, "exit")).get("exec_id") != "tty":
                pass
            out = b"".join(m["data"] for m in inbox if m.get("type") == "output"
                           and m.get("exec_id") == "tty")
            if ex.get("exit_code") != 0 or b"12 34" not in out:
                raise SelfTestError(f"agent self-test: pty exec gave {ex} and {out!r}")
            if req(9, "bogus")["ok"] or req(10, "start", container_id="?")["ok"]:
                raise SelfTestError("agent self-test: bad requests succeeded")
            ok(11, "destroy_container", container_id="t")
            ok(12, "shutdown")
            rc = proc.wait(20)
        finally:
            ours.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        if rc != 0 or "Traceback" in log:
            raise SelfTestError(f"agent self-test: agent exited {rc}: {log[-3000:]}")


def _main() -> None:  # pragma: no cover - manual use
    import sys

    run(sys.argv[1], sys.argv[2])
    print("agent self-test passed")


if __name__ == "__main__":
    _main()
