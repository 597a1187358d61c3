"""`Hypervisor.capabilities()` per backend, and vmmd deciding with it rather than with
attribute probes or backend names (the warm pool's backend, templates, shares, guest
serials, file names in the VM's directory)."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

from hanabi_vmmd import hypervisor
from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor
from hanabi_vmmd.firecracker.process import layout_for
from hanabi_vmmd.firecracker.serial import guest_serial
from hanabi_vmmd.firecracker.version import VersionCheck
from hanabi_vmmd.hypervisor import Capabilities, DiskSpec, Hypervisor, VmHandle, VmSpec
from hanabi_vmmd.pooling import pool_backend
from hanabi_vmmd.qemu import QemuHypervisor
from hanabi_vmmd.selection import decide_auto

VMMD = Path(inspect.getfile(hypervisor)).parent
OK = VersionCheck(binary="firecracker", path="/usr/bin/firecracker", problem=None)
MISSING = VersionCheck(binary="firecracker", problem="no firecracker binary on PATH")


def _fc(diod: str = "/nonexistent/diod", version: VersionCheck = OK) -> FirecrackerHypervisor:
    return FirecrackerHypervisor(diod=diod, version=version)


def _handle(tmp_path: Path, name: str) -> VmHandle:
    return VmHandle("sb1", name, 1, 1, tmp_path / "c.sock", tmp_path / "a.sock", tmp_path)


def test_qemu_hot_plugs_disks_and_nics_pools_clones_and_shares_with_virtio_9p(tmp_path):
    caps = QemuHypervisor().capabilities()
    assert caps.hotplug == {"disk", "nic"} and caps.pooling and caps.templates and caps.pause
    assert caps.share == "virtio-9p" and not caps.share_servers and caps.vsock is None  # the agent on virtio-serial
    assert caps.disk_formats[0] == "qcow2" and "raw" in caps.disk_formats
    assert not caps.guest_serial_from_path
    disk = DiskSpec("d", "n", tmp_path / "x.raw", "root")
    assert QemuHypervisor().guest_serial(_handle(tmp_path, "qemu"), disk) == ""
    assert (caps.files.control_socket, caps.files.pid_file, caps.files.stderr_log) == (
        "qmp.sock", "qemu.pid", "qemu.stderr")


def test_firecracker_takes_nics_at_boot_only_so_it_does_not_pool(tmp_path):
    caps = _fc().capabilities()
    assert caps.hotplug == {"disk"} and not caps.pooling and caps.templates  # clones without NICs
    assert caps.vsock == "hybrid" and caps.pause and caps.snapshots and caps.hotplug_slots == 4
    assert caps.disk_formats == ("raw",) and caps.guest_serial_from_path
    image = tmp_path / "root.raw"
    image.write_bytes(b"\0" * 512)
    disk = DiskSpec("d", "n", image, "root")
    assert _fc().guest_serial(_handle(tmp_path, "firecracker"), disk) == guest_serial(image)


def test_firecracker_files_are_its_own_and_its_control_socket_is_the_api_socket(tmp_path):
    files = _fc().capabilities().files
    assert "qemu" not in files.pid_file and "qemu" not in files.stderr_log and "qmp" not in files.control_socket
    assert files.control_socket == layout_for(tmp_path, "/usr/bin/firecracker", None).api_socket.name
    spec = VmSpec.in_dir("sb1", tmp_path, files, memory_mib=128, vcpus=1, kernel=tmp_path / "k",
                         initrd=tmp_path / "i", cmdline="", accel="kvm")
    assert spec.pid_file == tmp_path / "firecracker.pid" and spec.stderr_log == tmp_path / "firecracker.stderr"


def test_firecrackers_share_is_9p_over_vsock_only_where_diod_is_installed(tmp_path):
    assert _fc().capabilities().share is None
    diod = tmp_path / "diod"
    diod.write_text("#!/bin/sh\n")
    os.chmod(diod, 0o755)
    assert _fc(diod=str(diod)).capabilities().share == "9p-vsock" and _fc().capabilities().share_servers


def test_problem_says_why_a_backend_cannot_run():
    assert _fc(version=OK).problem() is None
    assert "no firecracker" in _fc(version=MISSING).problem()
    assert QemuHypervisor(binary="/nonexistent/qemu").problem() == "no /nonexistent/qemu on PATH"


def test_every_backend_is_a_whole_hypervisor_with_consistent_capabilities():
    members = {n for n in vars(Hypervisor) if not n.startswith("_")} | set(Hypervisor.__annotations__)
    for backend in (QemuHypervisor(), _fc()):
        missing = {m for m in members if not hasattr(backend, m)}
        assert not missing, f"{backend.name} lacks {missing}"
        caps = backend.capabilities()
        assert isinstance(caps, Capabilities)
        assert not caps.pooling or "nic" in caps.hotplug, "a pooled VM gets its NICs by hot-plug"
        names = [caps.files.control_socket, caps.files.pid_file, caps.files.stderr_log,
                 caps.files.agent_socket, caps.files.console_log]
        assert len(set(names)) == len(names)


def test_the_pool_takes_the_backend_that_pools_whatever_the_order():
    qemu, fc = QemuHypervisor(), _fc()
    assert pool_backend({"firecracker": fc, "qemu": qemu}) is qemu
    assert pool_backend({"qemu": qemu, "firecracker": fc}) is qemu
    assert pool_backend({"firecracker": fc}) is None


def test_auto_asks_the_firecracker_backend_for_its_problem():
    assert decide_auto({"qemu": QemuHypervisor(), "firecracker": _fc(version=MISSING)}).backend == "qemu"
    assert decide_auto({"qemu": QemuHypervisor()}).backend == "qemu"


def test_vmmd_probes_no_backend_attribute_and_names_no_backend_outside_its_own_module():
    """No getattr/hasattr on a backend, no `backend.name == "qemu"`-style choice: what a
    backend can do comes from capabilities(). (selection.py names them: it chooses.)"""
    own = {"qemu.py", "qemu_cmdline.py", "qemu_snapshot.py", "selection.py", "service.py"}
    found = []
    for path in sorted(VMMD.rglob("*.py")):
        if "firecracker" in path.parts or path.name in own:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and node.args and "backend" in ast.unparse(node.args[0])):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Constant) and node.value in ("qemu", "firecracker"):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_hot_plug_and_the_pool_are_parts_of_the_service_that_declare_what_they_use():
    """Composition, not mixins: Devices and Pooling are given the service (typed by a
    Protocol) and every `self.X` they read is set in their __init__ or is their own."""
    from hanabi_vmmd import devices, pooling
    from hanabi_vmmd.service import VmService

    assert not issubclass(VmService, (devices.Devices, pooling.Pooling))
    for cls in (devices.Devices, pooling.Pooling):
        tree = ast.parse(inspect.getsource(cls))
        init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        assigned = {t.attr for n in ast.walk(init) for t in getattr(n, "targets", [getattr(n, "target", None)])
                    if isinstance(t, ast.Attribute)}
        assigned |= {e.attr for n in ast.walk(init) if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Tuple) for e in t.elts if isinstance(e, ast.Attribute)}
        own = set(vars(cls)) | set(getattr(cls, "__annotations__", {}))
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "self"}
        assert used <= assigned | own, f"{cls.__name__} uses undeclared {sorted(used - assigned - own)}"
