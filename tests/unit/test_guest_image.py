"""Unit tests of the guest image builder's pieces (cpio, ELF, kernel, apt parsing, hashing)."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hanabi_image import debs, image, kernel
from hanabi_image.cpio import CpioWriter
from hanabi_image.elf import Elf, ElfError, modinfo

GUEST = Path("/var/lib/hanabi/guest/current")


def make_elf(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 LE relocatable with the given sections (like a .ko)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    blobs = [*sections.values(), names]
    off = 64
    data = b""
    headers = [b"\0" * 64]
    name_off = 1
    for name, blob in zip([*sections, ".shstrtab"], blobs, strict=True):
        headers.append(struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, off + len(data), len(blob), 0, 0, 1, 0))
        name_off += len(name) + 1
        data += blob
    shoff = off + len(data)
    ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, len(headers), len(headers) - 1)
    return ehdr + data + b"".join(headers)


def test_modinfo_of_a_synthetic_module() -> None:
    ko = make_elf({".text": b"\x90" * 8, ".modinfo": b"license=GPL\0depends=a,b\0softdep=pre: c post: d\0"})
    assert modinfo(ko) == {"license": ["GPL"], "depends": ["a,b"], "softdep": ["pre: c post: d"]}
    with pytest.raises(ElfError):
        Elf(b"not an elf at all" * 4)


def test_module_closure_orders_dependencies_first(tmp_path: Path) -> None:
    mods = {"top": "depends=mid-x,base\0softdep=pre: opt missing_soft\0", "mid_x": "depends=base\0",
            "base": "depends=\0", "opt": "depends=\0", "unused": "depends=\0"}
    for name, info in mods.items():
        d = tmp_path / "kernel" / name
        d.mkdir(parents=True)
        (d / f"{name.replace('_', '-')}.ko").write_bytes(make_elf({".modinfo": info.encode()}))
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    order = kernel.module_closure(str(tmp_path), ["top", "ext4", "base"])
    names = [Path(p).name for p in order]
    assert set(names) == {"mid-x.ko", "base.ko", "opt.ko", "top.ko"}
    assert names.index("base.ko") < names.index("mid-x.ko") < names.index("top.ko")
    assert names.index("opt.ko") < names.index("top.ko")
    with pytest.raises(kernel.KernelError, match="neither built in"):
        kernel.module_closure(str(tmp_path), ["nonexistent"])


def fake_bzimage(payload: bytes) -> bytes:
    setup_sects = 4
    bz = bytearray(512 * (setup_sects + 1))
    bz[0x1F1] = setup_sects
    bz[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", bz, 0x206, 0x20F)
    struct.pack_into("<II", bz, 0x248, 0x100, len(payload))
    return bytes(bz) + b"\0" * 0x100 + payload + b"trailing"


def test_bzimage_payload_and_gzip_decompression() -> None:
    inner = make_elf({".text": b"kernel"})
    payload = gzip.compress(inner) + struct.pack("<I", len(inner))
    assert kernel.decompress_payload(kernel.bzimage_payload(fake_bzimage(payload))) == inner
    with pytest.raises(kernel.KernelError, match="PVH"):
        kernel.extract_vmlinux(fake_bzimage(payload))
    with pytest.raises(kernel.KernelError, match="bzImage"):
        kernel.bzimage_payload(b"\0" * 4096)


@pytest.mark.skipif(not (GUEST / "vmlinuz").exists() or shutil.which("lz4") is None,
                    reason="needs a built guest (hanabi-image build) and lz4")
def test_real_kernel_payload_gives_the_built_vmlinux() -> None:
    vmlinux = kernel.extract_vmlinux((GUEST / "vmlinuz").read_bytes())
    # Debian's generic kernel: an XZ payload (the cloud flavour's was LZ4 legacy frames).
    assert kernel.bzimage_payload((GUEST / "vmlinuz").read_bytes())[:6] == b"\xfd7zXZ\x00"
    assert vmlinux == (GUEST / "vmlinux").read_bytes()
    assert Elf(vmlinux).has_pvh_note()


def test_elf_interpreter_and_needed() -> None:
    exe = Elf.load(os.path.realpath(sys.executable))
    assert exe.interpreter() == "/lib64/ld-linux-x86-64.so.2"
    needed = exe.needed()
    assert needed and all(".so" in n for n in needed)
    if os.path.exists("/bin/busybox") and Elf.load("/bin/busybox").interpreter() is None:
        assert Elf.load("/bin/busybox").needed() == []


def test_cpio_newc_is_read_by_gnu_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "bin/tool").chmod(0o755)
    (tree / "bin/alias").symlink_to("tool")
    (tree / "odd").write_bytes(b"x" * 5)
    out = tmp_path / "a.cpio"
    with out.open("wb") as f:
        w = CpioWriter(f)
        w.add_dir("dev")
        w.add_tree(str(tree))
        w.add_chardev("dev/console", 5, 1)
        w.close()
    assert out.stat().st_size % 4 == 0
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=out.open("rb"), capture_output=True,
                             text=True, check=True).stdout
    lines = {ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in listing.splitlines()}
    assert set(lines) == {"dev", "bin", "bin/alias", "bin/tool", "odd", "dev/console"}
    assert lines["bin/tool"].startswith("-rwxr-xr-x") and " root " in lines["bin/tool"]
    assert lines["dev/console"].startswith("crw-------") and re.search(r" 5,\s+1 ", lines["dev/console"])
    assert lines["bin/alias"].startswith("lrwx") and lines["bin/alias"].endswith("-> tool")
    w = CpioWriter(io.BytesIO())
    w.add_dir("x")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_file("x", b"")


def test_deb_filename_quotes_the_epoch() -> None:
    d = debs.Deb("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64", "", "")
    assert d.filename == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"


def test_resolve_replaces_the_kernel_meta_package(monkeypatch: pytest.MonkeyPatch) -> None:
    index = {
        "linux-image-amd64": "Depends: linux-image-6.1.0-99-amd64 (= 6.1.999-1)",
        "linux-image-6.1.0-99-amd64": "Depends: kmod",
        "zlib1g": "Depends: libc6 (>= 2.14)",
    }

    def fake_run(cmd: list[str]) -> str:
        assert cmd[:3] == ["apt-cache", "show", "--no-all-versions"]
        return "\n\n".join(f"Package: {n}\nVersion: 1:2.{i}\nArchitecture: amd64\nSHA256: {i:064x}\n{index[n]}\n"
                           for i, n in enumerate(index) if n in cmd[3:]) + "\n"

    monkeypatch.setattr(debs, "_run", fake_run)
    monkeypatch.setattr(debs, "ensure_indexes", lambda: pytest.fail("apt-get update needed?"))
    got = debs.resolve(["linux-image-amd64", "zlib1g"])
    assert sorted(got) == ["linux-image-6.1.0-99-amd64", "zlib1g"]
    assert got["zlib1g"].version == "1:2.2"
    with pytest.raises(debs.DebError, match="no candidate"):
        debs.show(["not-a-package"])


def test_inputs_hash_tracks_versions_and_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    a = {"p": debs.Deb("p", "1", "amd64", "aa", "")}
    b = {"p": debs.Deb("p", "2", "amd64", "aa", "")}
    assert image.inputs_hash(a) == image.inputs_hash(dict(a))
    assert image.inputs_hash(a) != image.inputs_hash(b)
    h = image.inputs_hash(a)
    real = image.sources
    monkeypatch.setattr(image, "sources", lambda: {**real(), "init": b"#!/bin/sh\n"})
    assert image.inputs_hash(a) != h


def test_kernel_cmdline_and_sources() -> None:
    assert "rdinit=/init" in image.KERNEL_CMDLINE and "console=ttyS0" in image.KERNEL_CMDLINE
    src = image.sources()
    assert src["init"].startswith(b"#!/bin/sh")
    assert "hanabi_guest/agent.py" in src and "hanabi_wire/framing.py" in src and "hanabi_wire/doc.py" not in src
    for name, data in src.items():  # the guest side must stay stdlib-only
        if name.endswith(".py"):
            assert b"import typer" not in data and b"pydantic" not in data, name


@pytest.mark.skipif(not (GUEST / "manifest.json").exists(), reason="no built guest (hanabi-image build)")
def test_cli_info_prints_the_current_manifest() -> None:
    exe = Path(sys.executable).with_name("hanabi-image")
    out = subprocess.run([str(exe), "info"], capture_output=True, text=True, check=True).stdout
    manifest = json.loads(out)
    assert manifest["path"] == os.path.realpath(GUEST)
    assert manifest["firecracker_versions"] == ">=1.8"
    assert set(manifest["files"]) == {"vmlinuz", "vmlinux", "initrd.img"}
    assert manifest["files"]["initrd.img"]["size"] == (GUEST / "initrd.img").stat().st_size


def test_prune_keeps_current_and_newest(tmp_path: Path) -> None:
    for i, name in enumerate(["a" * 16, "b" * 16, "c" * 16, "d" * 16, "e" * 16]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "current").symlink_to("a" * 16)  # the oldest, but current
    (tmp_path / ("f" * 16 + ".tmp-999999999")).mkdir()  # a crashed build
    (tmp_path / "notes").mkdir()
    removed = image.prune(str(tmp_path), keep=2)
    assert sorted(os.path.basename(p) for p in removed) == ["b" * 16, "c" * 16, "f" * 16 + ".tmp-999999999"]
    assert sorted(os.listdir(tmp_path)) == ["a" * 16, "current", "d" * 16, "e" * 16, "notes"]
