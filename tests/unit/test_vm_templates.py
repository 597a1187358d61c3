"""VM templates without QEMU: the template/clone command lines, the template store's keys,
staleness, builds and their failures (with a builder that writes the files a real one would),
the `restored` request's fields, and the guest's RNG ioctls (on the host's /dev/urandom)."""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path

import pytest

from hanabi_common.errors import FailedPrecondition, Unavailable
from hanabi_vmmd import qemu_cmdline as qc
from hanabi_vmmd.cloning import clone_hostname, restore_fields
from hanabi_vmmd.hypervisor import VmSpec
from hanabi_vmmd.qemu import QemuHypervisor
from hanabi_vmmd import templates as tpl
from hanabi_vmmd.templates import TemplateParams, TemplateStore, TemplateUnsupported, image_id
from hanabi_wire import T_RESTORED, messages
from hanabi_wire.constants import HOSTNAME_REGEX, RESTORE_SEED_BYTES


def spec(**kw) -> VmSpec:
    args = dict(memory_mib=256, vcpus=1, kernel=Path("/g/vmlinux"), initrd=Path("/g/initrd.img"),
                cmdline="console=ttyS0", accel="tcg", hotplug_slots=4, share_dir=Path("/run/s/1"))
    args.update(kw)
    return VmSpec.in_dir("sb-1", Path("/run/hanabi/vm/0123456789abcdef"), QemuHypervisor.files, **args)


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_template_and_clone_command_lines_differ_only_in_ram_sharing_incoming_and_host_paths():
    template = qc.build_argv(spec(memory_file=Path("/t/k/memory"), memory_shared=True))
    clone = qc.build_argv(spec(memory_file=Path("/t/k/memory"), incoming=True))
    assert option(template, "-machine") == ["q35,vmport=off,sata=off,smbus=off,mem-merge=off,memory-backend=m0"]
    assert option(template, "-object") == ["memory-backend-file,id=m0,size=256M,mem-path=/t/k/memory,share=on,merge=off"]
    assert option(clone, "-object") == ["memory-backend-file,id=m0,size=256M,mem-path=/t/k/memory,share=off,merge=off"]
    assert option(clone, "-incoming") == ["defer"] and "-incoming" not in template
    assert option(clone, "-device") == option(template, "-device")  # same devices, same order
    plain = qc.build_argv(spec())
    assert "-object" not in plain and "-incoming" not in plain
    with pytest.raises(ValueError, match="comma"):
        qc.build_argv(spec(memory_file=Path("/t/a,b/memory")))


def params(**kw) -> TemplateParams:
    base = dict(backend="qemu", image_id="img1", vmm_id="qemu:1", memory_mib=256, vcpus=1, machine="q35",
                accel="tcg", cmdline="console=ttyS0", hotplug_slots=4, share=True)
    base.update(kw)
    return TemplateParams(**base)


def test_the_key_covers_every_parameter():
    keys = {params().key()} | {params(**{k: v}).key() for k, v in (
        ("image_id", "img2"), ("vmm_id", "qemu:2"), ("memory_mib", 512), ("vcpus", 2), ("machine", "pc"),
        ("accel", "kvm"), ("cmdline", "x"), ("hotplug_slots", 3), ("share", False), ("backend", "firecracker"))}
    assert len(keys) == 11 and params().key() == params().key()


class Builder:
    """Writes what a real build leaves (memory, state, a socket-ish leftover); can fail."""

    def __init__(self) -> None:
        self.built: list[str] = []
        self.fail = False
        self.unsupported = False

    def __call__(self, p: TemplateParams, build_dir: Path) -> float:
        self.built.append(p.key())
        (build_dir / "agent.sock").write_text("")
        if self.fail:
            raise Unavailable("QEMU exited while starting")
        if self.unsupported:
            raise TemplateUnsupported("the agent refused restored")
        (build_dir / "memory").write_bytes(b"\0" * 4096)
        (build_dir / "state").write_bytes(b"QEVM" + b"\0" * 100)
        return 2.5


def test_built_once_kept_across_stores_and_complete(tmp_path):
    builder = Builder()
    store = TemplateStore(tmp_path / "templates", builder)
    first = store.get(params())
    assert sorted(p.name for p in first.dir.iterdir()) == ["memory", "state", "template.json"]
    assert first.record.boot_to_ready_s == 2.5 and first.record.state_bytes == 104
    assert not store.build_dir(first.key).exists()
    again = TemplateStore(tmp_path / "templates", builder).get(params())  # a restarted vmmd
    assert again.dir == first.dir and builder.built == [first.key]


def test_concurrent_gets_build_once(tmp_path):
    builder = Builder()
    store = TemplateStore(tmp_path / "t", builder)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.get(params()).key)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4 and len(builder.built) == 1


def test_a_new_image_or_vmm_replaces_the_old_templates_of_its_backend_only(tmp_path):
    store = TemplateStore(tmp_path / "t", Builder())
    old = store.get(params())
    small = store.get(params(memory_mib=128))               # another size of the same image: kept
    other = store.get(params(backend="firecracker", image_id="x"))
    new = store.get(params(image_id="img2"))
    assert {t.key for t in store.list()} == {new.key, other.key}
    assert not old.dir.exists() and not small.dir.exists()
    newer = store.get(params(image_id="img2", vmm_id="qemu:2"))
    assert {t.key for t in store.list()} == {newer.key, other.key}


def test_a_failed_build_leaves_nothing_and_is_not_retried_at_once(tmp_path):
    builder = Builder()
    builder.fail = True
    store = TemplateStore(tmp_path / "t", builder)
    with pytest.raises(Unavailable):
        store.get(params())
    assert list((tmp_path / "t").rglob("*")) == [tmp_path / "t" / "build"]
    with pytest.raises(FailedPrecondition, match="retried after"):
        store.get(params())
    assert len(builder.built) == 1


def test_an_incomplete_template_is_not_used(tmp_path):
    store = TemplateStore(tmp_path / "t", Builder())
    template = store.get(params())
    template.state_file.unlink()
    assert store.find(template.key) is None
    rebuilt = store.get(params())
    assert rebuilt.state_file.is_file()


def test_image_id_follows_the_manifest_and_the_files(tmp_path):
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    (tmp_path / "manifest.json").write_text(json.dumps({"inputs_hash": "a", "files": {}}))
    first = image_id(tmp_path, kernel, initrd)
    assert image_id(tmp_path, kernel, initrd) == first
    (tmp_path / "manifest.json").write_text(json.dumps({"inputs_hash": "b", "files": {}}))
    second = image_id(tmp_path, kernel, initrd)
    os.utime(initrd, ns=(1, 1))
    assert len({first, second, image_id(tmp_path, kernel, initrd)}) == 3


def test_restored_fields_pass_the_wire_check_and_differ_per_clone():
    import re

    a, b = restore_fields("sandbox-a"), restore_fields("sandbox-a")
    assert a["seed"] != b["seed"] and len(base64.b64decode(a["seed"])) == RESTORE_SEED_BYTES
    assert re.match(HOSTNAME_REGEX, a["hostname"]) and a["hostname"] == clone_hostname("sandbox-a")
    assert clone_hostname("sandbox-a") != clone_hostname("sandbox-b")
    checked = messages.check_message(messages.request(T_RESTORED, **a), messages.HOST)
    assert len(checked["seed"]) == RESTORE_SEED_BYTES
    with pytest.raises(messages.WireError):
        messages.request(T_RESTORED, **{**a, "seed": base64.b64encode(b"short").decode()})


@pytest.mark.skipif(os.geteuid() != 0, reason="RNDADDENTROPY needs CAP_SYS_ADMIN")
def test_the_guest_reseed_ioctls_are_accepted_by_a_6x_kernel():
    """The guest's handler runs the same ioctls; wrong numbers or a wrong struct fail here."""
    from hanabi_guest.handlers import reseed_kernel_rng

    reseed_kernel_rng(os.urandom(RESTORE_SEED_BYTES))



def test_after_the_backoff_a_failed_or_discarded_template_is_built_again(tmp_path, monkeypatch):
    builder = Builder()
    store = TemplateStore(tmp_path / "t", builder)
    template = store.get(params())
    store.discard(template.key)             # a clone of it did not start
    assert not template.dir.exists()
    with pytest.raises(FailedPrecondition, match="retried after"):
        store.get(params())
    monkeypatch.setattr(tpl, "RETRY_AFTER_FAILURE_S", 0.0)
    assert store.get(params()).state_file.is_file() and len(builder.built) == 2


def test_an_image_that_cannot_make_templates_is_never_retried(tmp_path, monkeypatch):
    builder = Builder()
    builder.unsupported = True
    store = TemplateStore(tmp_path / "t", builder)
    with pytest.raises(TemplateUnsupported):
        store.get(params())
    monkeypatch.setattr(tpl, "RETRY_AFTER_FAILURE_S", 0.0)
    with pytest.raises(FailedPrecondition, match="refused restored"):
        store.get(params())
    assert len(builder.built) == 1
    builder.unsupported = False
    assert store.get(params(image_id="rebuilt-image")).key != params().key()  # a new image may
