"""Pure parts of the Firecracker backend: version floor, argv (direct and jailer), the
jail's file layout, the guest cmdline, the serial Firecracker gives a drive."""

from __future__ import annotations

from pathlib import Path

import pytest

from hanabi_common.errors import InvalidArgument
from hanabi_vmmd.firecracker import process as p
from hanabi_vmmd.firecracker.serial import device_id
from hanabi_vmmd.firecracker.version import MIN_VERSION, judge, parse_version

VM_DIR = Path("/run/hanabi/vm/0123456789abcdef")


@pytest.mark.parametrize("text, expected", [
    ("Firecracker v1.16.1\n\nSupported snapshot data format versions: v5.0.0", (1, 16, 1)),
    ("Firecracker v1.8.0", (1, 8, 0)),
    ("Firecracker 1.10.2-dev", (1, 10, 2)),
    ("qemu-system-x86_64 version 7.2.0", None),
    ("", None),
])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_judge_floor_and_problems():
    assert MIN_VERSION == (1, 8, 0)
    assert judge("firecracker", "/usr/bin/firecracker", "Firecracker v1.8.0").ok
    old = judge("firecracker", "/usr/bin/firecracker", "Firecracker v1.7.9")
    assert not old.ok and old.version == (1, 7, 9) and ">= 1.8.0" in old.problem
    assert judge("firecracker", None, None).problem == "firecracker not on PATH"
    assert "no Firecracker version" in judge("fc", "/x/fc", "hello").problem
    assert "failed: boom" in judge("fc", "/x/fc", None, "boom").problem


def test_direct_layout_and_argv():
    layout = p.layout_for(VM_DIR, "/usr/bin/firecracker", None)
    assert layout.api_socket == VM_DIR / "fc.sock" and layout.vsock_socket == VM_DIR / "fc-vsock.sock"
    assert layout.fc("ph0.img") == str(VM_DIR / "ph0.img") and layout.jail_dir is None
    assert p.firecracker_argv("/usr/bin/firecracker", layout, "0123456789abcdef") == [
        "/usr/bin/firecracker", "--api-sock", str(VM_DIR / "fc.sock"), "--id", "0123456789abcdef"]


def test_jailer_layout_and_argv():
    jailer = p.JailerConfig(binary="/usr/bin/jailer", uid=123, gid=456, chroot_base=Path("/srv/jail"),
                            parent_cgroup="hanabi", cgroups=("cpu.max=50000 100000",))
    layout = p.layout_for(VM_DIR, "/usr/bin/firecracker", jailer)
    assert layout.root == Path("/srv/jail/firecracker/0123456789abcdef/root")
    assert layout.jail_dir == Path("/srv/jail/firecracker/0123456789abcdef")
    assert layout.fc("ph0.img") == "/ph0.img" and layout.api_socket == layout.root / "fc.sock"
    argv = p.jailer_argv(jailer, "/usr/bin/firecracker", "0123456789abcdef", "/run/netns/c1")
    assert argv == ["/usr/bin/jailer", "--id", "0123456789abcdef", "--exec-file", "/usr/bin/firecracker",
                    "--uid", "123", "--gid", "456", "--chroot-base-dir", "/srv/jail",
                    "--cgroup-version", "2", "--netns", "/run/netns/c1", "--parent-cgroup", "hanabi",
                    "--cgroup", "cpu.max=50000 100000",
                    "--", "--api-sock", "/fc.sock", "--id", "0123456789abcdef"]
    assert "--netns" not in p.jailer_argv(jailer, "/usr/bin/firecracker", "abc", None)


@pytest.mark.parametrize("exec_file, instance, cfg, match", [
    ("firecracker", "abc", {}, "absolute"),
    ("/usr/bin/qemu", "abc", {}, "named"),
    ("/usr/bin/firecracker", "a_b", {}, "letters"),
    ("/usr/bin/firecracker", "abc", {"cgroup_version": 3}, "neither"),
    ("/usr/bin/firecracker", "abc", {"cgroups": ("cpu.max",)}, "FILE=VALUE"),
])
def test_jailer_argv_refuses_bad_input(exec_file, instance, cfg, match):
    with pytest.raises(InvalidArgument, match=match):
        p.jailer_argv(p.JailerConfig(**cfg), exec_file, instance, None)


def test_jail_id_must_be_a_valid_instance_id():
    assert p.jail_id(VM_DIR) == "0123456789abcdef"
    with pytest.raises(InvalidArgument):
        p.jail_id(Path("/run/x/not_valid"))


def test_nics_netns():
    assert p.nics_netns([]) is None
    assert p.nics_netns(["/run/netns/a", "/run/netns/a"]) == "/run/netns/a"
    with pytest.raises(InvalidArgument):
        p.nics_netns(["/run/netns/a", None])


def test_kernel_args_name_the_vsock_share_only_when_the_vm_has_one():
    assert "hanabi.share" not in p.kernel_args("console=ttyS0")
    assert p.kernel_args("console=ttyS0", share=True).split()[-1] == "hanabi.share=/export"


def test_kernel_args_add_the_vsock_channel_once():
    args = p.kernel_args("console=ttyS0 quiet")
    assert args == ("console=ttyS0 quiet hanabi.channel=vsock reboot=k pci=off "
                    "sysctl.kernel.ctrl-alt-del=1 hanabi.poweroff=reboot")
    assert p.kernel_args(args) == args


def test_device_id_like_kvmtool():
    assert device_id(2049, 0, 131077) == "20490131077"
    assert device_id(66306, 0, 123456789012345678) == "66306012345678901234"[:20]
    assert len(device_id(2 ** 40, 2 ** 40, 2 ** 60)) == 20


def test_the_guest_ends_a_firecracker_vm_with_a_restart():
    from hanabi_guest.sandbox import LINUX_REBOOT_CMD_POWER_OFF, LINUX_REBOOT_CMD_RESTART, poweroff_command

    assert poweroff_command(p.kernel_args("console=ttyS0")) == LINUX_REBOOT_CMD_RESTART
    assert poweroff_command("console=ttyS0 rdinit=/init") == LINUX_REBOOT_CMD_POWER_OFF
