"""`hanabi-runtime check`: the pure verdict per backend from injected host facts."""

from __future__ import annotations

import dataclasses

from hanabi_runtime.check import HostFacts, assess, auto_choice, exit_status, render

PVM = "the host's KVM is the nested PVM flavour (module kvm_pvm is loaded)"
GOOD = HostFacts(firecracker_binary="firecracker", firecracker_path="/usr/bin/firecracker",
                 firecracker_version="1.16.1", firecracker_problem=None, firecracker_floor="1.8.0",
                 jailer_wanted=False, jailer_path=None, qemu_binary="qemu-system-x86_64",
                 qemu_path="/usr/bin/qemu-system-x86_64", kvm_problem=None, vhost_vsock=True,
                 device_mapper=True, guest_problem=None, fc_kernel_problem=None,
                 daemons={"vmmd": None, "agentd": "agentd is not running"})


def facts(**changes) -> HostFacts:
    return dataclasses.replace(GOOD, **changes)


def by_name(reports):
    return {r.name: r for r in reports}


def test_everything_present_both_run_and_auto_takes_firecracker():
    reports = assess(GOOD)
    assert all(r.can_run and not r.problems for r in reports)
    assert auto_choice(reports) == "firecracker" and exit_status(reports) == 0


def test_this_host_firecracker_missing_and_pvm_kvm():
    reports = by_name(assess(facts(firecracker_path=None, firecracker_version=None,
                                   firecracker_problem="firecracker not on PATH", kvm_problem=PVM,
                                   vhost_vsock=False, device_mapper=False)))
    fc, qemu = reports["firecracker"], reports["qemu"]
    assert not fc.can_run and fc.problems == ["firecracker not on PATH", f"KVM unusable: {PVM}"]
    assert len(fc.install) == 2 and ">= 1.8.0" in fc.install[0] and "hardware KVM" in fc.install[1]
    assert qemu.can_run and any("TCG" in n for n in qemu.notes)
    assert any("virtio-serial" in n for n in qemu.notes)
    assert auto_choice(list(reports.values())) == "qemu" and exit_status(list(reports.values())) == 0


def test_old_firecracker_and_missing_jailer_are_reported_with_fixes():
    fc = by_name(assess(facts(firecracker_problem="/usr/bin/firecracker is Firecracker 1.7.0; hanabi needs >= 1.8.0",
                              jailer_wanted=True)))["firecracker"]
    assert not fc.can_run and "1.7.0" in fc.problems[0] and "jailer" in fc.problems[1]
    assert len(fc.problems) == len(fc.install)


def test_no_backend_without_qemu_or_guest_image_exit_1():
    reports = assess(facts(firecracker_problem="firecracker not on PATH", qemu_path=None))
    assert exit_status(reports) == 1 and auto_choice(reports) is None
    reports = assess(facts(guest_problem="/var/lib/hanabi/guest/current/vmlinux missing"))
    assert exit_status(reports) == 1
    assert all("make guest" in " ".join(r.install) for r in reports)


def test_a_bzimage_only_guest_stops_firecracker_only():
    reports = by_name(assess(facts(fc_kernel_problem="vmlinux is not an ELF vmlinux")))
    assert not reports["firecracker"].can_run and reports["qemu"].can_run


def test_render_says_which_and_why():
    text = render(GOOD, assess(facts(firecracker_problem="firecracker not on PATH")))
    assert "firecracker: CANNOT run on this host" in text and "  - firecracker not on PATH" in text
    assert "qemu: can run" in text and "--hypervisor auto takes: qemu" in text
    assert "daemon vmmd: answers" in text and "daemon agentd: not reachable (agentd is not running)" in text
