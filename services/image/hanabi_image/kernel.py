"""Kernel artefacts for the guest: the ELF vmlinux inside a bzImage, and module closures.

``extract_vmlinux()`` reads the x86 boot protocol header of a bzImage (payload_offset and
payload_length), decompresses the payload (Debian's cloud kernel: LZ4 legacy frames, magic
02 21 4c 18, through the ``lz4`` tool; gzip/xz/zstd handled too) and checks the result is
an ELF with the PVH entry note, which QEMU (-kernel) and Firecracker boot directly.

``module_closure()`` computes, from the ``depends=`` and ``softdep= pre:`` fields of each
module's ``.modinfo`` (the Debian package ships no modules.dep; depmod runs at install),
every module the requested ones need, in a load order where dependencies come first.
Built-in modules (modules.builtin) are skipped.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import subprocess

from .elf import Elf, modinfo

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


class KernelError(RuntimeError):
    """A kernel image or module tree is not what the builder expects."""


def bzimage_payload(bz: bytes) -> bytes:
    """The compressed kernel payload of a bzImage (without the appended size word)."""
    if bz[0x202:0x206] != b"HdrS":
        raise KernelError("not a bzImage (no HdrS boot header)")
    version = struct.unpack_from("<H", bz, 0x206)[0]
    if version < 0x208:
        raise KernelError(f"boot protocol {version:#x} has no payload fields")
    setup_sects = bz[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    off, length = struct.unpack_from("<II", bz, 0x248)
    payload = bz[pm_start + off: pm_start + off + length]
    if len(payload) != length:
        raise KernelError("bzImage payload is truncated")
    return payload


def decompress_payload(payload: bytes) -> bytes:
    """Decompress a bzImage payload; its last 4 bytes are the little-endian output size."""
    want = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    body = payload[:-4]
    if body.startswith(LZ4_LEGACY_MAGIC):
        proc = subprocess.run(["lz4", "-d", "-c"], input=body, capture_output=True, check=False)
        out = proc.stdout
        if proc.returncode != 0 and len(out) != want:
            raise KernelError(f"lz4 failed: {proc.stderr.decode(errors='replace').strip()}")
    elif body.startswith(b"\x1f\x8b"):
        out = gzip.decompress(body)
    elif body.startswith(b"\xfd7zXZ"):
        out = lzma.decompress(body)
    elif body.startswith(b"\x28\xb5\x2f\xfd"):
        out = subprocess.run(["zstd", "-d", "-c"], input=body, capture_output=True, check=True).stdout
    else:
        raise KernelError(f"unknown kernel compression (magic {body[:4].hex()})")
    if len(out) != want:
        raise KernelError(f"decompressed kernel is {len(out)} bytes, header says {want}")
    return out


def extract_vmlinux(bz: bytes) -> bytes:
    """The uncompressed ELF vmlinux of a bzImage; it must carry the PVH entry note."""
    vmlinux = decompress_payload(bzimage_payload(bz))
    if not Elf(vmlinux).has_pvh_note():
        raise KernelError("vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    return vmlinux


def norm(name: str) -> str:
    """Module names treat '-' and '_' alike."""
    return name.replace("-", "_")


def module_index(moddir: str) -> dict[str, str]:
    """Module name -> path relative to ``moddir`` for every .ko file under it."""
    index: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(moddir):
        for f in files:
            if f.endswith(".ko"):
                index[norm(f[:-3])] = os.path.relpath(os.path.join(dirpath, f), moddir)
            elif f.endswith((".ko.xz", ".ko.zst", ".ko.gz")):
                raise KernelError(f"compressed module {f}: not supported by this builder")
    return index


def builtin_modules(moddir: str) -> set[str]:
    try:
        with open(os.path.join(moddir, "modules.builtin"), encoding="utf-8") as f:
            return {norm(os.path.basename(line.strip())[:-3]) for line in f if line.strip().endswith(".ko")}
    except OSError:
        return set()


def _softdeps_pre(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        mode = None
        for word in v.split():
            if word in ("pre:", "post:"):
                mode = word
            elif mode == "pre:":
                out.append(norm(word))
    return out


def module_closure(moddir: str, wanted: list[str]) -> list[str]:
    """Relative paths of ``wanted`` and all they depend on, dependencies first."""
    index = module_index(moddir)
    builtin = builtin_modules(moddir)
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, required: bool) -> None:
        name = norm(name)
        if name in builtin or state.get(name) == 2:
            return
        if name not in index:
            if required:
                raise KernelError(f"module {name} is neither built in nor in {moddir}")
            return
        if state.get(name) == 1:
            raise KernelError(f"dependency cycle through module {name}")
        state[name] = 1
        with open(os.path.join(moddir, index[name]), "rb") as f:
            info = modinfo(f.read())
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(dep, True)
        for dep in _softdeps_pre(info.get("softdep", [])):
            visit(dep, False)
        state[name] = 2
        order.append(index[name])

    for w in wanted:
        visit(w, True)
    return order
