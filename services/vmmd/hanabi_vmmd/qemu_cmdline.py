"""The QEMU command line of a hanabi VM (pure: no I/O, unit-tested argv in, argv out).

The VM is a q35 (or pc) machine without default devices: a PVH-bootable kernel and the
initramfs from the guest dir, the console on a serial port logged to a file, the agent on
a virtio-serial port backed by a Unix socket, QMP on another Unix socket, and empty PCIe
root ports (q35) to hot-plug disks and NICs into later (pc hot-plugs into pci.0 through
ACPI). Under TCG the translation buffer is capped (tb-size) to save about 35 MiB per VM.
Guest RAM is mergeable by the host's KSM only when asked (`mem_merge`, `vmm.ksm`): QEMU's
own default is on, so a host running ksmd would otherwise merge every VM's pages.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from hanabi_common.models.vmmd import MIN_VM_MEMORY_MIB
from hanabi_wire.constants import KERNEL_CMDLINE, SERIAL_PORT_NAME, SHARE_MOUNT_TAG

from hanabi_vmmd.hypervisor import NicSpec, VmSpec

BASE_KERNEL_CMDLINE: str = KERNEL_CMDLINE  # the guest image's (hanabi_wire.constants)
TCG_TB_SIZE_MIB = 32
PC_HOTPLUG_BUS = "pci.0"
SANDBOX_OPTS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def kernel_cmdline(extra: str = "", base: str | None = None) -> str:
    """The guest kernel command line: the image's base plus `vmm.kernel_cmdline_extra`."""
    parts = [base if base is not None else BASE_KERNEL_CMDLINE, extra.strip()]
    return " ".join(part for part in parts if part)


def hotplug_slots(machine: str, count: int) -> list[str]:
    """The buses disks and NICs are hot-plugged into: rp0..rpN-1 on q35, pci.0 on pc."""
    if machine == "pc":
        return [PC_HOTPLUG_BUS]
    return [f"rp{index}" for index in range(count)]


def pick_slot(machine: str, count: int, busy: Collection[str]) -> str | None:
    """A free hot-plug bus, or None when every root port is taken (pc's pci.0 is shared)."""
    if machine == "pc":
        return PC_HOTPLUG_BUS
    for slot in hotplug_slots(machine, count):
        if slot not in busy:
            return slot
    return None


def _check_option_path(value: str, what: str) -> str:
    if "," in value:
        raise ValueError(f"{what} {value!r} contains a comma, which QEMU's option syntax cannot carry")
    return value


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def machine_args(machine: str, accel: str, memory_backend: str | None = None,
                 mem_merge: bool = False) -> list[str]:
    """-machine, -accel and -cpu for the machine type and accelerator (`memory_backend`:
    the id of the -object that holds the guest RAM; `mem_merge`: guest RAM marked
    mergeable for KSM, MADV_MERGEABLE)."""
    if machine not in ("q35", "pc"):
        raise ValueError(f"unknown machine type {machine!r}")
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"unknown accelerator {accel!r}")
    backend = f",memory-backend={memory_backend}" if memory_backend else ""
    args = ["-machine", f"{machine},vmport=off,sata=off,smbus=off,mem-merge={_on_off(mem_merge)}{backend}"]
    if accel == "tcg":
        args += ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}", "-cpu", "max"]
    else:
        args += ["-accel", "kvm", "-cpu", "host"]
    return args


def root_port_args(machine: str, count: int) -> list[str]:
    """Empty PCIe root ports to hot-plug into (none on pc: pci.0 takes ACPI hot-plug)."""
    args: list[str] = []
    if machine == "pc":
        return args
    for index, slot in enumerate(hotplug_slots(machine, count)):
        args += ["-device", f"pcie-root-port,id={slot},bus=pcie.0,chassis={index + 1}"]
    return args


def nic_args(machine: str, nics: Sequence[NicSpec], fds: Sequence[int]) -> list[str]:
    """A tap netdev (by inherited fd) and a virtio-net device with the given MAC per NIC,
    cold-plugged on the root bus (so they keep the hot-plug root ports free)."""
    if len(nics) != len(fds):
        raise ValueError("one tap fd per NIC is needed")
    bus = "pci.0" if machine == "pc" else "pcie.0"
    args: list[str] = []
    for nic, fd in zip(nics, fds, strict=True):
        args += ["-netdev", f"tap,id={nic.device_id}-net,fd={fd},vhost=off",
                 "-device", f"virtio-net-pci,netdev={nic.device_id}-net,id={nic.device_id},"
                            f"mac={nic.mac},bus={bus},romfile="]
    return args


def share_args(machine: str, share_dir) -> list[str]:
    """The VM's file share: QEMU's own 9P server (`-fsdev local`) exporting `share_dir`,
    on a virtio-9p device cold-plugged on the root bus. passthrough: owners and modes are
    the host's (uids map 1:1, as under runc); multidevs=remap: the export crosses mount
    points (one bind per container path), whose inode numbers must not collide."""
    if share_dir is None:
        return []
    path = _check_option_path(str(share_dir), "share dir")
    bus = "pci.0" if machine == "pc" else "pcie.0"
    return ["-fsdev", f"local,id=share0,path={path},security_model=passthrough,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=share0,mount_tag={SHARE_MOUNT_TAG},bus={bus},romfile="]


MEMORY_BACKEND_ID = "m0"


def memory_args(memory_mib: int, memory_file, shared: bool, mem_merge: bool = False) -> list[str]:
    """The guest RAM as a file (VM templates): the template maps it shared (its writes land
    in the file), a clone private (copy-on-write over the template's pages; with
    `mem_merge`, KSM may merge the pages it copied with identical ones of other VMs)."""
    if memory_file is None:
        return []
    path = _check_option_path(str(memory_file), "memory file")
    return ["-object", f"memory-backend-file,id={MEMORY_BACKEND_ID},size={memory_mib}M,mem-path={path},"
                       f"share={_on_off(shared)},merge={_on_off(mem_merge)}"]


def build_argv(spec: VmSpec, *, binary: str = "qemu-system-x86_64", machine: str = "q35",
               sandbox: bool = True, nic_fds: Sequence[int] = (), mem_merge: bool = False) -> list[str]:
    """The full argv that boots `spec` (raises ValueError on values QEMU cannot take);
    `nic_fds`: the tap fds QEMU inherits, one per `spec.nics` entry; `mem_merge`: the guest
    RAM is mergeable by KSM (`vmm.ksm`)."""
    if spec.memory_mib < MIN_VM_MEMORY_MIB or spec.vcpus < 1:
        raise ValueError(f"a VM needs at least {MIN_VM_MEMORY_MIB} MiB and 1 vCPU")
    for path in (spec.vm_dir, spec.agent_socket, spec.control_socket, spec.console_log):
        _check_option_path(str(path), "path")
    argv = [binary, "-name", f"hanabi-{spec.sandbox_id}"]
    argv += machine_args(machine, spec.accel, MEMORY_BACKEND_ID if spec.memory_file is not None else None,
                         mem_merge)
    argv += ["-m", f"{spec.memory_mib}M", "-smp", str(spec.vcpus)]
    argv += memory_args(spec.memory_mib, spec.memory_file, spec.memory_shared, mem_merge)
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if sandbox:
        argv += ["-sandbox", SANDBOX_OPTS]
    argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.cmdline]
    argv += root_port_args(machine, spec.hotplug_slots)
    argv += ["-device", "virtio-serial-pci,id=vser0",
             "-chardev", f"socket,id=agent,path={spec.agent_socket},server=on,wait=off",
             "-device", f"virtserialport,chardev=agent,name={SERIAL_PORT_NAME}"]
    argv += nic_args(machine, spec.nics, nic_fds)
    argv += share_args(machine, spec.share_dir)
    argv += ["-serial", f"file:{spec.console_log}"]
    argv += ["-qmp", f"unix:{spec.control_socket},server=on,wait=off"]
    argv += ["-pidfile", str(spec.pid_file), "-msg", "timestamp=on"]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv
