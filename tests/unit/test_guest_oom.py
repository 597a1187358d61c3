"""The guest's OOM kill watch (oom.py): memory.events parsing, the inotify watch, and the
agent's `oom` event before the exit of the process (ProcIO.check_oom)."""

from __future__ import annotations

import os
import select

from hanabi_guest.oom import OomWatch, parse_oom_kills, read_oom_kills

EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill {n}\noom_group_kill 0\n"


def test_parse_oom_kills():
    assert parse_oom_kills(EVENTS.format(n=2)) == 2
    assert parse_oom_kills("low 0\n") == 0
    assert parse_oom_kills("oom_kill x\n") == 0
    assert parse_oom_kills("") == 0


def test_read_of_a_missing_group_is_zero(tmp_path):
    assert read_oom_kills(str(tmp_path / "gone")) == 0


def test_the_watch_fires_on_a_change_and_reports_growth_once(tmp_path):
    events = tmp_path / "memory.events"
    events.write_text(EVENTS.format(n=1))
    watch = OomWatch(str(tmp_path))
    try:
        assert watch.last == 1 and watch.grown() is None  # what it had before is not news
        assert select.select([watch.fd], [], [], 0)[0] == []
        with open(events, "w") as f:  # as the kernel's cgroup_file_notify: IN_MODIFY
            f.write(EVENTS.format(n=2))
        assert select.select([watch.fd], [], [], 2)[0] == [watch.fd]
        watch.drain()
        assert select.select([watch.fd], [], [], 0)[0] == []
        assert watch.grown() == 2
        assert watch.grown() is None
        events.unlink()
        assert watch.grown() is None  # the group went away
    finally:
        watch.close()
    assert watch.fd == -1


def test_the_agent_sends_oom_before_the_exit(tmp_path):
    from hanabi_guest.core import Container, Proc
    from hanabi_guest.procio import ProcIO
    from hanabi_guest.poller import Poller
    from hanabi_guest.sandbox import Rootfs

    class Agent(ProcIO):
        def __init__(self):
            self.sel = Poller()
            self.containers, self.procs, self.out_fds = {}, {}, {}
            self.paused, self.stdin_bytes = False, 0
            self.sent: list[dict] = []

        def send(self, msg):
            self.sent.append(msg)

    (tmp_path / "memory.events").write_text(EVENTS.format(n=0))
    agent = Agent()
    c = Container("c1", {"args": ["x"]}, None, {})
    c.root = Rootfs(str(tmp_path / "rootfs"))
    c.root.cgroup = str(tmp_path)
    agent.containers["c1"] = c
    agent.watch_oom(c)
    assert c.oom is not None and c.oom.fd in agent.sel.get_map()
    r, w = os.pipe()
    os.close(w)
    proc = Proc("c1", "init", 4242, ["x"], os.open(os.devnull, os.O_WRONLY), r, None)
    c.procs["init"] = proc
    agent.procs[proc.pid] = proc
    (tmp_path / "memory.events").write_text(EVENTS.format(n=1))  # the kernel killed it...
    proc.status = 9  # ...and it was reaped before the watch was read
    agent._close_stream(proc, r)
    agent._maybe_exited(proc)
    assert [m["type"] for m in agent.sent] == ["oom", "exit"]
    assert agent.sent[0] == {"type": "oom", "container_id": "c1", "oom_kills": 1}
    assert agent.sent[1]["signal"] == 9
    agent.unwatch_oom(c)
    assert c.oom is None and agent.sel.get_map() == {}
