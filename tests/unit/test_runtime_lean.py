"""The lean hot paths answer byte for byte as the typer CLI does, without its imports.

No daemon runs here: the containers are state files written as `create` writes them, with
real processes as stand-ins; a started container's agentd is absent (status falls back to
the stand-in, teardown reports each daemon as not running). Each case runs the lean entry
point and the full CLI in fresh interpreters and compares exit status, stdout and stderr,
and asserts the lean run imported none of pydantic, typer, click, jsonschema or pyzmq.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hanabi_common.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, Config
from hanabi_common.state import VersionedState
from hanabi_runtime import lifecycle
from hanabi_runtime.execs import EXEC_PREFIX, ExecRecord
from hanabi_runtime.lean import commands, records
from hanabi_runtime.lean.argv import parse
from hanabi_runtime.state import RuntimeState
from hanabi_runtime.procs import process_start_time
from tests.helpers.lean import heavy_imports, run_cli


def test_mirrors_match_their_definitions():
    from hanabi_agentd.client import SLACK_S

    defaults = Config()
    assert records.DEFAULT_CONFIG_PATH == str(DEFAULT_CONFIG_PATH) and records.CONFIG_ENV == CONFIG_ENV
    assert set(records.CONFIG_KEYS) == set(Config.model_fields)
    assert records.DEFAULTS == {"run_dir": str(defaults.run_dir),
                                "rpc.default_timeout_s": defaults.rpc.default_timeout_s,
                                "agent.request_timeout_s": defaults.agent.request_timeout_s,
                                "vmm.stop_timeout_s": defaults.vmm.stop_timeout_s}
    assert records.SCHEMA_VERSION == VersionedState.SCHEMA_VERSION
    for fields, model in ((records.RUNTIME_STATE, RuntimeState), (records.EXEC_RECORD, ExecRecord)):
        assert list(fields) == list(model.model_fields)
        for name, info in model.model_fields.items():
            default = fields[name][1]
            assert (default is records.REQUIRED) == info.is_required(), name
            if default is not records.REQUIRED:
                assert default == info.default, name
    assert records.EXEC_PREFIX == EXEC_PREFIX
    assert commands.START_FIFO == lifecycle.START_FIFO and commands.AGENTD_SLACK_S == SLACK_S
    from hanabi_runtime import pod, teardown
    assert commands.POD_CONTAINER_TYPE == pod.CONTAINER_TYPE and teardown.SIGKILL == signal.SIGKILL
    assert set(lifecycle.LATER_PHASES) == {"poststart", "poststop"}  # the phases that fall back


def test_argv_takes_runc_globals_and_leaves_the_rest_to_typer():
    cmd = parse(["--root", "/r", "--log", "/l.json", "--log-format=json", "--systemd-cgroup", "state", "c1"])
    assert (cmd.name, cmd.args, cmd.globals["log"], cmd.globals["log_format"]) == \
        ("state", {"id": "c1"}, "/l.json", "json")
    assert parse(["kill", "--all", "c1", "KILL"]).args == {"id": "c1", "signal": "KILL", "all": True}
    # containerd's shim (go-runc), behind Docker's wrapper that puts --config first
    shim = parse(["--config", "/etc/h.toml", "--root", "/run/containerd/runc/moby", "--log",
                  "/run/containerd/x/log.json", "--log-format", "json", "--systemd-cgroup", "kill", "--all", "c1", "9"])
    assert (shim.name, shim.args, shim.globals["config"]) == ("kill", {"id": "c1", "signal": "9", "all": True},
                                                             "/etc/h.toml")
    assert parse(["delete", "--force", "c1"]).args == {"id": "c1", "force": True}
    assert parse(["delete", "-f", "c1"]).args == {"id": "c1", "force": True}
    assert parse(["events", "--stats", "--interval=2", "c1"]).args == {"id": "c1", "stats": True, "interval": "2"}
    assert parse(["ps", "c1", "-f", "json"]).args == {"id": "c1", "format": "json"}
    assert parse(["create", "--bundle", "/b", "--pid-file=/p", "--no-pivot", "c1"]).args == {
        "id": "c1", "bundle": "/b", "pid_file": "/p", "no_pivot": True}
    for argv in (["state"], ["state", "a", "b"], ["--debug", "state", "c"], ["state", "--help", "c"],
                 ["--version"], ["create", "-bx", "c"], ["kill", "-s", "c"], ["--", "state", "c"], []):
        assert parse(argv) is None, argv


@pytest.fixture
def world(tmp_path):
    """A config, a run dir, a live stand-in (killed at the end) and a writer of state files."""
    config = tmp_path / "hanabi.toml"
    config.write_text(f'run_dir = "{tmp_path}/run"\n[agent]\nrequest_timeout_s = 2.0\n')
    standin = subprocess.Popen(["sleep", "60"])
    sbs = tmp_path / "run" / "sbs"

    def record(cid, **fields):
        fields = {"standin_pid": standin.pid, "standin_start_time": process_start_time(standin.pid), **fields}
        state = RuntimeState(id=cid, bundle="/b", rootfs="/b/rootfs", created_at=time.time(),
                             annotations={"a": "b"}, **fields)
        (sbs / cid).mkdir(parents=True, exist_ok=True)
        (sbs / cid / "state.json").write_text(state.model_dump_json(indent=1))
        return sbs / cid

    sbs.mkdir(parents=True)
    _, modules = run_cli(["--config", str(config), "state", "none"], full=True)  # validates it, once
    assert json.loads((tmp_path / "run" / records.CONFIG_STAMP).read_text()) == {str(config): config.read_text()}
    yield {"config": str(config), "record": record, "standin": standin, "sbs": sbs, "tmp": tmp_path}
    standin.kill()
    standin.wait()


def _same(world, *args, imports=True):
    argv = ["--config", world["config"], "--root", "/run/x", "--log", str(world["tmp"] / "log.json"),
            "--log-format", "json", *args]
    lean, modules = run_cli(argv)
    full, _ = run_cli(argv, full=True)
    got = (lean.returncode, lean.stdout, lean.stderr)
    assert got == (full.returncode, full.stdout, full.stderr), args
    if imports:
        assert heavy_imports(modules) == [], args
    return lean


def test_reads_answer_as_the_full_cli(world):
    world["record"]("c1")
    world["record"]("dead", standin_pid=2 ** 22 - 1)
    world["record"]("s1", started=True)  # agentd absent: the stand-in decides
    for args in (["state", "c1"], ["state", "dead"], ["state", "s1"], ["state", "nope"],
                 ["ps", "--format", "json", "c1"], ["ps", "-f", "json", "dead"], ["ps", "s1"],
                 ["events", "--stats", "s1"], ["kill", "c1", "BOGUS"], ["kill", "dead", "KILL"],
                 ["kill", "s1"], ["kill", "--all", "s1", "KILL"],
                 ["start", "s1"], ["start", "dead"], ["pause", "c1"], ["resume", "s1"]):
        _same(world, *args)
    for args in (["state", "bad/id"], ["kill", "bad/id", "KILL"]):
        _same(world, *args, imports=False)  # refused in the full CLI's words (hanabi_common.ids)
    assert json.loads(_same(world, "state", "c1").stdout)["status"] == "created"
    assert json.loads(_same(world, "state", "s1").stdout)["status"] == "running"


def test_bad_state_files_answer_as_the_full_cli(world):
    world["record"]("v2").joinpath("state.json").write_text('{"schema_version": 2, "id": "v2"}')
    world["record"]("junk").joinpath("state.json").write_text("{not json")
    for args in (["state", "v2"], ["state", "junk"]):
        _same(world, *args)
    odd = world["record"]("odd")  # a field the hand checks do not know: the full CLI answers
    odd.joinpath("state.json").write_text(json.dumps(dict(json.loads(odd.joinpath("state.json").read_text()),
                                                          extra=1)))
    done, modules = run_cli(["--config", world["config"], "state", "odd"])
    assert done.returncode == 1 and b"does not match its schema" in done.stderr and "pydantic" in modules


def test_kill_of_a_created_container_signals_its_standin(world):
    world["record"]("c2")
    _, modules = run_cli(["--config", world["config"], "kill", "c2", "KILL"])
    assert world["standin"].wait(10) == -9 and heavy_imports(modules) == []


def test_hooks_and_invalid_configs_fall_back_to_the_full_cli(world, tmp_path):
    world["record"]("h1", hooks={"poststart": [{"path": "/bin/true"}]})
    done, modules = run_cli(["--config", world["config"], "start", "h1"])
    assert "pydantic" in modules  # the full CLI ran it (and refused: the container is created but no agentd)
    bad = tmp_path / "bad.toml"
    for text in ("run_dir = 5\n", "[vmm]\nmemory_mib = 'x'\nstop_timeout_s = -1\n", "nonsense = 1\n", "x = [\n"):
        bad.write_text(text)
        lean, _ = run_cli(["--config", str(bad), "state", "c1"])
        full, _ = run_cli(["--config", str(bad), "state", "c1"], full=True)
        assert (lean.returncode, lean.stderr) == (full.returncode, full.stderr) and lean.returncode == 1, text


def test_no_config_file_uses_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv(records.CONFIG_ENV, str(tmp_path / "missing.toml"))
    lean, modules = run_cli(["state", "c1"])
    full, _ = run_cli(["state", "c1"], full=True)
    assert (lean.returncode, lean.stderr) == (full.returncode, full.stderr) == (1, lean.stderr)
    assert b"does not exist" in lean.stderr and heavy_imports(modules) == []
    assert os.environ[records.CONFIG_ENV]


def test_a_config_is_read_only_as_the_full_cli_validated_it(world):
    config = world["tmp"] / "hanabi.toml"
    argv = ["--config", str(config), "state", "none"]
    assert heavy_imports(run_cli(argv)[1]) == []
    config.write_text(config.read_text() + "# edited\n")
    first, modules = run_cli(argv)
    assert "pydantic" in modules and b"does not exist" in first.stderr  # the full CLI read it anew
    assert heavy_imports(run_cli(argv)[1]) == []  # and vouched for it
    config.write_text(config.read_text() + "[vmm]\nmemory_mib = 1\n")  # invalid, in a key `state` never reads
    for _ in range(2):
        refused, modules = run_cli(argv)
        assert refused.returncode == 1 and b"config file" in refused.stderr and b"memory_mib" in refused.stderr
        assert "pydantic" in modules


SIMPLE_TOML = [
    Path("deploy/hanabi.toml").read_text() if Path("deploy/hanabi.toml").exists() else "",
    'run_dir = "/tmp/x/run"\nlog_level = "debug"\n[vmm]\nguest_dir = "/g"\npool_size = 2\n\n[block]\nvolume_dir = "/v"\n',
    '  # c\n[ vmm . firecracker ]  # x\nbinary = "fc" # y\njailer = true\n[vmm]\nstop_timeout_s = 2.5\n',
    'a = "x#y"  # z\n', 'a = +3\nb = -0.5\r\nc = false\n',
]
NOT_SIMPLE_TOML = ['a = [1]\n', "a = 'lit'\n", 'a = "x\\ty"\n', 'a.b = 1\n', 'a = 1e3\n', 'a = 1_000\n',
                   '"q" = 1\n', 'a = """x"""\n', '[[t]]\n', 'a = {b=1}\n', 'a = 1979-05-27\n', 'a = inf\n',
                   'vmm = 1\n[vmm.x]\n']


def test_simple_toml_reads_as_tomllib_or_not_at_all():
    import tomllib

    from hanabi_runtime.lean.toml import simple_toml

    for text in SIMPLE_TOML:
        assert simple_toml(text) == tomllib.loads(text), text
    for text in NOT_SIMPLE_TOML:
        assert simple_toml(text) is None, text


def test_a_plain_config_is_read_without_tomllib(world):
    done, modules = run_cli(["--config", world["config"], "state", "none"])
    assert done.returncode == 1 and "tomllib" not in modules and heavy_imports(modules) == []


def test_delete_answers_as_the_full_cli_without_its_imports(world):
    for args in (["delete", "nosuch"], ["delete", "--force", "nosuch"]):
        _same(world, *args)
    world["record"]("run1", started=True)  # agentd is down: the live stand-in says running
    _same(world, "delete", "run1")
    assert (world["sbs"] / "run1" / "state.json").exists()
    results = []
    for full in (False, True):
        standin = subprocess.Popen(["sleep", "60"])
        directory = world["record"]("gone", standin_pid=standin.pid,
                                    standin_start_time=process_start_time(standin.pid))
        (directory / "devices.json").write_text("{}")  # blockd's file: kept for it, as it is down
        done, modules = run_cli(["--config", world["config"], "delete", "--force", "gone"], full=full)
        assert standin.wait(10) == -9
        assert sorted(os.listdir(directory)) == ["devices.json", "disowned.json"]
        marker = json.loads((directory / "disowned.json").read_text())
        from hanabi_common.disowned import Disowned
        assert Disowned.model_validate(marker).pending == ["agentd", "blockd", "netd", "vmmd"]
        results.append((done.returncode, done.stdout, done.stderr))
        if not full:
            assert heavy_imports(modules) == []
        for name in os.listdir(directory):
            (directory / name).unlink()
        directory.rmdir()
    assert results[0] == results[1] and results[0][0] == 0


@pytest.mark.parametrize("code, status, err", [(None, 0, ""), (0, 0, ""), (3, 3, ""), (300, 44, ""),
                                               ("no such container", 1, "no such container\n")])
def test_exit_now_ends_as_sys_exit_would(code, status, err):
    """The CLI's and the stand-in's end: the status sys.exit gives, stdout flushed, atexit run."""
    script = ("import atexit, sys; from hanabi_runtime.lean import exit_now; "
              "atexit.register(lambda: print('atexit ran')); sys.stdout.write('unflushed '); "
              f"exit_now({code!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (status, "unflushed atexit ran\n", err)


def test_create_fails_as_the_full_cli_without_typer(world, tmp_path):
    """`create` runs without typer and click (lean._create) and refuses what the full CLI
    refuses in the same words; what only typer can say (a --preserve-fds that is no number)
    goes to typer."""
    (tmp_path / "nobundle").mkdir()
    for args in (["create", "--bundle", str(tmp_path / "nobundle"), "c1"],
                 ["create", "--preserve-fds", "2", "--bundle", str(tmp_path / "nobundle"), "c2"],
                 ["create", "-b", str(tmp_path / "missing"), "bad/id"],
                 ["create", "--preserve-fds", "x", "c3"]):
        lean = _same(world, *args, imports=False)
        assert lean.returncode != 0, args
    _, modules = run_cli(["--config", world["config"], "create", "--bundle", str(tmp_path / "nobundle"), "c1"])
    assert not {"typer", "click"} & modules
    assert not (world["sbs"] / "c1").exists()


def test_lean_config_of_a_validated_config_reads_as_the_lean_reader(tmp_path):
    """A stand-in whose config the lean reader cannot vouch for takes the models' values
    (`LeanConfig.of`): the same settings as the lean reader gets from the same file."""
    from hanabi_common.config import load_config

    config = tmp_path / "hanabi.toml"
    config.write_text(f'run_dir = "{tmp_path}/run"\n[rpc]\ndefault_timeout_s = 7\n'
                      '[agent]\nrequest_timeout_s = 8.5\n[vmm]\nstop_timeout_s = 2\n')
    full = records.LeanConfig.of(load_config(config))
    (tmp_path / "run").mkdir()
    records.stamp_config(tmp_path / "run", config, config.read_text())  # as the full CLI does
    lean = records.load_config(str(config))
    assert vars(full) == vars(lean) == {"run_dir": f"{tmp_path}/run", "default_timeout_s": 7.0,
                                        "request_timeout_s": 8.5, "stop_timeout_s": 2.0}
