"""One owner per cross-daemon sequence, one writer per file of a sandbox directory.

- netd calls no other daemon: a link that comes or goes is a LinkChange it reports
  (`net.changes`), and the runtime (hanabi_runtime.netfollow, run by the stand-in) plugs the
  NIC and configures the guest, as it does at create (tests/integration/test_network.py
  runs it for real).
- `auto` is decided by vmmd alone: the runtime asks it (`vm.backend`) and takes the disk
  formats from its answer.
- Each daemon writes only its own state file in a sandbox directory.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from hanabi_common import disowned

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"vmmd": "services/vmmd/hanabi_vmmd", "netd": "services/netd/hanabi_netd",
            "blockd": "services/blockd/hanabi_blockd", "agentd": "services/agentd/hanabi_agentd",
            "runtime": "services/runtime-cli/hanabi_runtime"}


def _imports(directory: str) -> dict[str, set[str]]:
    out = {}
    for path in (ROOT / directory).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def test_netd_calls_no_other_daemon():
    sideways = {f: sorted(n for n in names if n.startswith(("hanabi_vmmd", "hanabi_agentd", "hanabi_blockd")))
                for f, names in _imports(PACKAGES["netd"]).items()}
    assert not any(sideways.values()), sideways


def test_the_runtime_does_not_decide_auto_itself():
    users = [f for f, names in _imports(PACKAGES["runtime"]).items() if "hanabi_vmmd.selection" in names]
    assert users == []
    lifecycle = (ROOT / PACKAGES["runtime"] / "lifecycle.py").read_text()
    assert '== "firecracker"' not in lifecycle and "vmmd.backend(" in lifecycle


def _state_name(package: str) -> str:
    module = {"vmmd": "hanabi_vmmd.state", "netd": "hanabi_netd.state", "blockd": "hanabi_blockd.state",
              "agentd": "hanabi_agentd.state", "runtime": "hanabi_runtime.procs"}[package]
    return importlib.import_module(module).STATE_NAME


def test_the_teardown_markers_name_each_daemons_own_file():
    assert disowned.DAEMON_STATE_NAMES == {d: _state_name(d) for d in ("agentd", "vmmd", "blockd", "netd")}
    names = [_state_name(p) for p in PACKAGES]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_daemon_writes_only_its_own_state_file(package):
    """Every `store.write(sandbox, NAME, ...)` of a package names its own state file (the
    runtime's exec records are its own too)."""
    own = _state_name(package)
    found = []
    for path in (ROOT / PACKAGES[package]).rglob("*.py"):
        module_name = ".".join(path.relative_to(ROOT / PACKAGES[package]).with_suffix("").parts)
        module = importlib.import_module(f"{Path(PACKAGES[package]).name}.{module_name}".removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write"
                    and "store" in ast.unparse(node.func.value) and len(node.args) >= 2):
                continue
            arg = node.args[1]
            if isinstance(arg, ast.Name):
                name = getattr(module, arg.id, None)
            elif isinstance(arg, ast.JoinedStr) and package == "runtime":
                name = "exec" if "EXEC_PREFIX" in ast.unparse(arg) else ast.unparse(arg)
            else:
                name = ast.unparse(arg)
            found.append((path.name, node.lineno, name))
    assert found, "no state writes found: the scan is broken"
    bad = [f for f in found if f[2] not in (own, "exec")]
    assert not bad, f"{package} writes state files that are not its own: {bad}"
