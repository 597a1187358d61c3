"""The QEMU argv vmmd builds (pure: no qemu needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hanabi_vmmd import qemu_cmdline as qc
from hanabi_vmmd.hypervisor import VmSpec
from hanabi_vmmd.qemu import QemuHypervisor


def spec(accel: str = "tcg", **kw) -> VmSpec:
    args = dict(memory_mib=256, vcpus=2, kernel=Path("/g/vmlinux"), initrd=Path("/g/initrd.img"),
                cmdline="console=ttyS0 rdinit=/init", accel=accel, hotplug_slots=3)
    args.update(kw)
    return VmSpec.in_dir("sb-1", Path("/run/hanabi/vm/0123456789abcdef"), QemuHypervisor.files, **args)


def option(argv: list[str], flag: str) -> list[str]:
    """Every value that follows `flag`."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_q35_tcg_argv():
    argv = qc.build_argv(spec(), binary="/usr/bin/qemu-system-x86_64", machine="q35")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert option(argv, "-name") == ["hanabi-sb-1"]
    assert option(argv, "-machine") == ["q35,vmport=off,sata=off,smbus=off,mem-merge=off"]
    assert option(argv, "-accel") == ["tcg,tb-size=32"]
    assert option(argv, "-cpu") == ["max"]
    assert option(argv, "-m") == ["256M"] and option(argv, "-smp") == ["2"]
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert option(argv, "-display") == ["none"]
    assert option(argv, "-kernel") == ["/g/vmlinux"]
    assert option(argv, "-initrd") == ["/g/initrd.img"]
    assert option(argv, "-append") == ["console=ttyS0 rdinit=/init"]
    devices = option(argv, "-device")
    assert [d for d in devices if d.startswith("pcie-root-port")] == [
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=2",
        "pcie-root-port,id=rp2,bus=pcie.0,chassis=3",
    ]
    assert "virtio-serial-pci,id=vser0" in devices
    assert "virtserialport,chardev=agent,name=agent.0" in devices
    vm = "/run/hanabi/vm/0123456789abcdef"
    assert option(argv, "-chardev") == [f"socket,id=agent,path={vm}/agent.sock,server=on,wait=off"]
    assert option(argv, "-serial") == [f"file:{vm}/console.log"]
    assert option(argv, "-qmp") == [f"unix:{vm}/qmp.sock,server=on,wait=off"]
    assert option(argv, "-pidfile") == [f"{vm}/qemu.pid"]
    assert option(argv, "-sandbox") == [qc.SANDBOX_OPTS]
    assert "-enable-kvm" not in argv


def test_pc_kvm_argv_uses_acpi_hotplug_and_host_cpu():
    argv = qc.build_argv(spec("kvm"), machine="pc", sandbox=False)
    assert option(argv, "-machine") == ["pc,vmport=off,sata=off,smbus=off,mem-merge=off"]
    assert option(argv, "-accel") == ["kvm"]
    assert option(argv, "-cpu") == ["host"]
    assert not [d for d in option(argv, "-device") if d.startswith("pcie-root-port")]
    assert "-sandbox" not in argv


def test_guest_ram_is_mergeable_only_when_asked():
    """QEMU's own default is mem-merge=on: without vmm.ksm a host running ksmd must not merge
    hanabi's VMs, so off is passed explicitly, for the machine's RAM and a template's file."""
    assert "mem-merge=off" in option(qc.build_argv(spec()), "-machine")[0]
    assert "mem-merge=on" in option(qc.build_argv(spec(), mem_merge=True), "-machine")[0]
    file_ram = spec(memory_file=Path("/t/k/memory"), incoming=True)
    assert option(qc.build_argv(file_ram), "-object")[0].endswith(",share=off,merge=off")
    merged = qc.build_argv(file_ram, mem_merge=True)
    assert "mem-merge=on" in option(merged, "-machine")[0]
    assert option(merged, "-object")[0].endswith(",share=off,merge=on")
    assert QemuHypervisor().mem_merge is False


def test_every_option_takes_a_value():
    argv = qc.build_argv(spec())
    flags_with_values = {"-name", "-machine", "-accel", "-cpu", "-m", "-smp", "-display", "-sandbox",
                         "-kernel", "-initrd", "-append", "-device", "-chardev", "-serial", "-qmp",
                         "-pidfile", "-msg"}
    i = 1
    while i < len(argv):
        assert argv[i].startswith("-"), argv[i]
        i += 2 if argv[i] in flags_with_values else 1


@pytest.mark.parametrize("bad", [dict(accel="hvf"), dict(memory_mib=32), dict(vcpus=0)])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        qc.build_argv(spec(**bad))


def test_unknown_machine_is_refused():
    with pytest.raises(ValueError):
        qc.build_argv(spec(), machine="microvm")


def test_comma_in_a_socket_path_is_refused():
    bad = VmSpec.in_dir("x", Path("/run/a,b/vm/1"), QemuHypervisor.files, memory_mib=128, vcpus=1, kernel=Path("/k"),
                        initrd=Path("/i"), cmdline="", accel="tcg")
    with pytest.raises(ValueError, match="comma"):
        qc.build_argv(bad)


def test_kernel_cmdline_base_and_extra():
    assert qc.kernel_cmdline("", base="a b") == "a b"
    assert qc.kernel_cmdline("  debug loglevel=7 ", base="a b") == "a b debug loglevel=7"
    default = qc.kernel_cmdline()
    assert "console=ttyS0" in default and "panic=-1" in default


def test_base_cmdline_is_the_kata_style_one():
    for word in ("console=ttyS0", "quiet", "panic=-1", "tsc=reliable", "no_timer_check",
                 "rcupdate.rcu_expedited=1", "i8042.noaux", "i8042.nomux", "i8042.nopnp",
                 "i8042.dumbkbd", "cryptomgr.notests", "8250.nr_uarts=1", "rdinit=/init"):
        assert word in qc.BASE_KERNEL_CMDLINE.split()


def test_hotplug_slots_and_picking():
    assert qc.hotplug_slots("q35", 3) == ["rp0", "rp1", "rp2"]
    assert qc.pick_slot("q35", 3, set()) == "rp0"
    assert qc.pick_slot("q35", 3, {"rp0", "rp2"}) == "rp1"
    assert qc.pick_slot("q35", 3, {"rp0", "rp1", "rp2"}) is None
    assert qc.pick_slot("pc", 3, {"pci.0"}) == "pci.0"
