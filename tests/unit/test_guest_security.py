"""Capabilities, no_new_privs, LSM labels and seccomp of container processes (validated by
hanabi_wire.ocispec; applied by the guest's caps.py, seccomp.py, process.py): validation as
pure functions, then the real thing on the host (libseccomp and prctl/capset in a forked
child; the host runs the tests as root)."""

from __future__ import annotations

import os
import shutil

import pytest

from hanabi_wire.ocispec import caps as wcaps
from hanabi_wire.ocispec import seccomp as wseccomp
from hanabi_wire.ocispec.process import check_process

from hanabi_guest import caps, seccomp
from hanabi_guest.process import spawn

BUSYBOX = shutil.which("busybox")


def proc(**kw):
    return {"args": ["true"], "cwd": "/", **kw}


# ---- capabilities ---------------------------------------------------------------------------

def test_no_capabilities_object_means_none_at_all_as_runc():
    assert wcaps.parse(proc()) == wcaps.CapSets()


def test_sets_become_masks():
    sets = wcaps.parse(proc(capabilities={
        "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_CHECKPOINT_RESTORE"], "effective": ["CAP_KILL"],
        "permitted": ["CAP_KILL", "CAP_NET_RAW"], "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]}))
    assert sets.bounding == 1 << 0 | 1 << 5 | 1 << 40
    assert sets.effective == 1 << 5 and sets.permitted == 1 << 5 | 1 << 13
    assert sets.inheritable == sets.ambient == 1 << 5
    assert wcaps.names_of(sets.permitted) == ["CAP_KILL", "CAP_NET_RAW"]


@pytest.mark.parametrize("bad, message", [
    ({"bounding": ["CAP_FOO"]}, "process.capabilities.bounding: unknown capability 'CAP_FOO'"),
    ({"effective": ["chown"]}, "process.capabilities.effective: unknown capability 'chown'"),
    ({"effective": "CAP_KILL"}, "process.capabilities.effective must be a list"),
    ({"everything": []}, "process.capabilities.everything: unknown capability set"),
])
def test_bad_capabilities_name_the_field(bad, message):
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        check_process(proc(capabilities=bad))


def test_ambient_only_where_permitted_and_inheritable_as_runc():
    # `runc spec` lists ambient capabilities without inheritable ones: runc raises none of them.
    sets = wcaps.parse(proc(capabilities={"permitted": ["CAP_KILL", "CAP_CHOWN"], "inheritable": ["CAP_KILL"],
                                         "ambient": ["CAP_KILL", "CAP_CHOWN", "CAP_NET_RAW"]}))
    assert wcaps.names_of(caps.raisable_ambient(sets)) == ["CAP_KILL"]


def test_lsm_labels_the_guest_cannot_apply_are_refused():
    with pytest.raises(ValueError, match=r"process\.apparmorProfile 'docker-default'.*no AppArmor policy"):
        check_process(proc(apparmorProfile="docker-default"))
    with pytest.raises(ValueError, match=r"process\.selinuxLabel: selinux label is specified"):
        check_process(proc(selinuxLabel="system_u:system_r:container_t:s0"))
    check_process(proc(apparmorProfile="unconfined"))
    check_process(proc(apparmorProfile=""))
    with pytest.raises(ValueError, match="noNewPrivileges must be a boolean"):
        check_process(proc(noNewPrivileges="yes"))


# ---- seccomp plan (pure) --------------------------------------------------------------------

def test_plan_follows_runcs_rules():
    p = wseccomp.plan({
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO"},  # = the default: skipped
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"},
                      {"index": 1, "value": 5, "valueTwo": 0, "op": "SCMP_CMP_NE"}]},
        ]})
    assert p.default == wseccomp.ACT_ERRNO | 1
    assert p.arches == ["x86_64", "x86", "x32"]
    assert (wseccomp.ATTR_CTL_NNP, 0) in p.attrs and (wseccomp.ATTR_CTL_SSB, 1) in p.attrs
    got = [(r.name, r.action, r.args) for r in p.rules]
    assert got == [
        ("read", wseccomp.ACT_ALLOW, []), ("write", wseccomp.ACT_ALLOW, []),
        ("clone3", wseccomp.ACT_ERRNO | 38, []),
        # Two comparisons of one argument: one rule each (ORed), as runc does.
        ("personality", wseccomp.ACT_ALLOW, [(0, 4, 0, 0)]), ("personality", wseccomp.ACT_ALLOW, [(0, 4, 8, 0)]),
        ("clone", wseccomp.ACT_ALLOW, [(0, 7, 2114060288, 0), (1, 1, 5, 0)]),
    ]


@pytest.mark.parametrize("profile, message", [
    ({"defaultAction": "SCMP_ACT_FOO"}, "linux.seccomp.defaultAction: 'SCMP_ACT_FOO' is not a valid action for seccomp"),
    ({}, "linux.seccomp.defaultAction: 'None' is not a valid action"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1}, "errnoRet is only valid with"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "SCMP_ACT_NOTIFY needs a seccomp agent"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"}, "linux.seccomp.listenerPath"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}, "'SCMP_ARCH_Z80' is not a valid architecture"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NOPE"]}, "linux.seccomp.flags"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_KILL"}]},
     r"linux.seccomp.syscalls\[0\].names must be a non-empty list"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_BOOM"}]},
     r"linux.seccomp.syscalls\[0\].action: 'SCMP_ACT_BOOM'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "op": "SCMP_CMP_EQ"}]}]},
     r"syscalls\[0\].args\[0\].index must be 0..5"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "op": "SCMP_CMP_ABOUT"}]}]},
     r"args\[0\].op: 'SCMP_CMP_ABOUT' is not a valid operator"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 70000}]}, "errnoRet must be 0..65535"),
])
def test_malformed_profiles_name_the_field(profile, message):
    with pytest.raises(ValueError, match=message):
        wseccomp.plan(profile)


# ---- the real thing on the host --------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="capabilities need root")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")


def run(p, guard=None) -> tuple[int, str, str]:
    """spawn ``p`` on the host (no chroot) and return (status, stdout, stderr)."""
    pid, stdin, out, err = spawn(p, "/", chroot=False, guard=guard)
    os.close(stdin)
    data = {out: b"", err: b""}
    for fd in (out, err):
        os.set_blocking(fd, True)
        while chunk := os.read(fd, 65536):
            data[fd] += chunk
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), data[out].decode(), data[err].decode()


def status_lines(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())
            if k.startswith(("Cap", "NoNewPrivs", "Seccomp"))}


@needs_root
@needs_busybox
def test_capability_sets_and_no_new_privs_are_applied():
    p = proc(args=[BUSYBOX, "cat", "/proc/self/status"], noNewPrivileges=True,
             user={"uid": 65534, "gid": 65534},
             capabilities={"bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN"],
                           "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                           "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                           "inheritable": ["CAP_NET_BIND_SERVICE"], "ambient": ["CAP_NET_BIND_SERVICE"]})
    code, out, err = run(p)
    assert code == 0, err
    got = status_lines(out)
    # exec as a non-root user: permitted/effective are what the ambient set gives (runc: same)
    assert got["CapBnd"] == f"{1 << 0 | 1 << 5 | 1 << 10:016x}"
    assert got["CapInh"] == got["CapAmb"] == f"{1 << 10:016x}"
    assert got["CapPrm"] == got["CapEff"] == f"{1 << 10:016x}"
    assert got["NoNewPrivs"] == "1" and got["Seccomp"] == "0"


@needs_root
@needs_busybox
def test_root_without_capabilities_object_has_none():
    code, out, err = run(proc(args=[BUSYBOX, "cat", "/proc/self/status"]))
    assert code == 0, err
    got = status_lines(out)
    assert got["CapEff"] == got["CapPrm"] == got["CapBnd"] == "0" * 16
    assert got["NoNewPrivs"] == "0"


@needs_root
@needs_busybox
@pytest.mark.parametrize("nnp", [True, False])
def test_seccomp_filter_is_loaded_with_and_without_no_new_privs(nnp, tmp_path):
    from hanabi_guest.process import make_guard

    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": 13}]}
    filt = seccomp.Filter(wseccomp.plan(profile))
    try:
        assert filt.skipped == ["no_such_syscall"]
        p = proc(args=[BUSYBOX, "sh", "-c", f"grep -E 'Seccomp|NoNew' /proc/self/status; mkdir {tmp_path}/d"],
                 noNewPrivileges=nnp, capabilities={"bounding": ["CAP_KILL"]})
        code, out, err = run(p, make_guard(p, filt))
    finally:
        filt.release()
    assert status_lines(out)["Seccomp"] == "2"
    assert status_lines(out)["NoNewPrivs"] == ("1" if nnp else "0")
    assert code == 1 and "Permission denied" in err
    assert not (tmp_path / "d").exists()


def test_the_warm_up_thread_ends_and_is_joined():
    from hanabi_guest import hardening

    hardening.start_warm_up()
    assert hardening._warm is not None
    hardening.ensure_warm()
    assert hardening._warm is None
    hardening.ensure_warm()  # nothing to wait for


def test_the_filter_is_compiled_in_the_background_and_waited_for():
    from hanabi_guest.hardening import Security

    sec = Security.build({"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "not_a_syscall"], "action": "SCMP_ACT_ERRNO"}]}}, None)
    filt = sec.filter()
    assert filt is not None and filt.ctx and filt.skipped == ["not_a_syscall"]
    assert sec.filter() is filt
    sec.release()
    assert filt.ctx is None and sec.filter() is None
    assert Security.build({}, None).filter() is None and Security.build(None, None).spec is None
    with pytest.raises(ValueError, match="linux.seccomp.defaultAction"):
        Security.build({"seccomp": {"defaultAction": "SCMP_ACT_NOPE"}}, None)


def test_a_failed_compilation_fails_every_later_start(monkeypatch):
    """A profile libseccomp refuses fails each `filter()` (each start), not only the first:
    the init made ahead of start (handlers._make_init) may be the first to meet the error,
    and a second start must not then run the process without its filter. (libseccomp's own
    refusals are rare and depend on its version, so the compilation is made to fail here.)"""
    from hanabi_guest import seccomp
    from hanabi_guest.hardening import Security

    def refuse(plan):
        raise seccomp.SeccompError("linux.seccomp.syscalls: cannot add the rule for 'mkdir' (libseccomp errno 22)")

    monkeypatch.setattr(seccomp, "Filter", refuse)
    sec = Security.build({"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}}, None)
    sec.compile_soon()
    for _ in range(3):
        with pytest.raises(seccomp.SeccompError, match="mkdir"):
            sec.filter()
    sec.release()  # nothing to release, no error
