"""The in-guest agent's pty mode (process.terminal: true) and `resize`, run on the host.

Same rig as test_guest_agent.py: the agent is a subprocess on a socketpair, with DirSandbox
(no mounts, no chroot), so `sh` here is the host's shell, on a pty the agent opened.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Iterator

import pytest


from tests.unit.test_guest_agent import AgentProc, proc_spec


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    a = AgentProc(tmp_path)
    a.ok("create_container", container_id="c1", rootfs={"serial": "hanabi-rootfs"},
         process=proc_spec("sh", terminal=True, consoleSize={"height": 30, "width": 100}))
    yield a
    a.close()


def type_in(agent: AgentProc, text: bytes, exec_id: str = "init") -> None:
    agent.send({"type": "stdin", "container_id": "c1", "exec_id": exec_id, "data": text})


def read_until(agent: AgentProc, needle: bytes, exec_id: str = "init", timeout: float = 10.0) -> bytes:
    """Collect the process's (stdout) output until `needle` shows up; return all of it."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} did not show up; got {seen!r}")
        agent._pump(min(left, 0.2))
        seen += agent.output_of(exec_id, "stdout")
        assert not agent.output_of(exec_id, "stderr"), "a pty has no separate stderr stream"
    return seen


def test_shell_on_a_pty_answers_and_follows_resizes(agent: AgentProc) -> None:
    agent.ok("start", container_id="c1")
    type_in(agent, b"echo $((6*7))\n")
    out = read_until(agent, b"42\r\n")  # onlcr: the guest pty translates, the host relays bytes
    assert b"echo $((6*7))" in out  # echoed by the pty's line discipline
    type_in(agent, b"stty size; tty; [ -t 0 ] && [ -t 2 ] && echo tty-$((2+3))\n")
    out = read_until(agent, b"tty-5\r\n")  # computed: the echoed command line does not match
    assert b"30 100\r\n" in out and b"/dev/pts/" in out  # consoleSize applied at start
    assert agent.ok("resize", container_id="c1", exec_id="init", height=50, width=132) == {}
    type_in(agent, b"stty size\n")
    assert b"50 132\r\n" in read_until(agent, b"50 132\r\n")
    type_in(agent, b"echo bye-$((1+1)); exit 3\n")
    ex = agent.exit_of("init")
    assert (ex["exit_code"], ex["signal"]) == (3, None)
    assert b"bye-2\r\n" in agent.output_of("init", "stdout")  # exit came after all output
    assert agent.err("resize", container_id="c1", exec_id="init", height=5, width=5)["code"] == "NOT_FOUND"


def test_the_pty_is_the_controlling_terminal(agent: AgentProc) -> None:
    agent.ok("start", container_id="c1")
    # ^C is turned into SIGINT for the foreground job by the pty's line discipline, which
    # only works on a controlling terminal of the process's session.
    type_in(agent, b"sleep 30\n")
    read_until(agent, b"sleep 30\r\n")
    time.sleep(0.3)
    started = time.monotonic()
    type_in(agent, b"\x03")
    type_in(agent, b"echo interrupted-$((1+1))\n")
    read_until(agent, b"interrupted-2\r\n")
    assert time.monotonic() - started < 10
    type_in(agent, b"exit\n")
    assert agent.exit_of("init")["exit_code"] == 0


def test_exec_on_a_pty_with_lots_of_output(agent: AgentProc) -> None:
    agent.ok("start", container_id="c1")
    agent.ok("exec", container_id="c1", exec_id="e1",
             process=proc_spec("sh", "-c", "stty size; i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done; exit 5",
                               terminal=True))
    ex = agent.exit_of("e1")
    assert ex["exit_code"] == 5
    out = agent.output_of("e1", "stdout")
    assert out.startswith(b"0 0\r\n")  # no consoleSize: the kernel's default
    assert out.endswith(b"line 2999\r\n") and out.count(b"\r\n") == 3001  # nothing lost at the end
    type_in(agent, b"exit\n")
    agent.exit_of("init")


def test_resize_errors(agent: AgentProc) -> None:
    agent.ok("start", container_id="c1")
    agent.ok("exec", container_id="c1", exec_id="pipes", process=proc_spec("sleep", "30"))
    bad = agent.err("resize", container_id="c1", exec_id="pipes", height=10, width=10)
    assert bad["code"] == "FAILED_PRECONDITION" and "no terminal" in bad["message"]
    for height, width in ((0, 10), (10, 65536), ("10", 10), (True, 10), (None, 10)):
        assert agent.err("resize", container_id="c1", exec_id="init", height=height,
                         width=width)["code"] == "INVALID_ARGUMENT"
    assert agent.err("resize", container_id="c1", exec_id="nope", height=1, width=1)["code"] == "NOT_FOUND"
    assert agent.err("resize", container_id="c9", height=1, width=1)["code"] == "NOT_FOUND"
    assert agent.ok("resize", container_id="c1", height=65535, width=1) == {}  # exec_id defaults to init
    agent.ok("destroy_container", container_id="c1")


def test_stdin_close_on_a_pty_keeps_the_output(agent: AgentProc) -> None:
    agent.ok("start", container_id="c1")
    type_in(agent, b"echo before-$((1+1))\n")
    read_until(agent, b"before-2\r\n")
    agent.ok("close_stdin", container_id="c1", exec_id="init")
    type_in(agent, b"echo dropped\n")  # stdin is closed: ignored
    agent.ok("signal", container_id="c1", signal=9)
    assert agent.exit_of("init")["signal"] == 9
    assert b"dropped" not in agent.output_of("init", "stdout")
