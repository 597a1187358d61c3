"""Just enough ELF64 (little-endian) parsing for the guest image builder.

* ``needed()`` / ``interpreter()``: DT_NEEDED libraries and PT_INTERP of an executable or
  shared object, to copy the library closure of python3 into the initramfs;
* ``section()``: a section's bytes (``.modinfo`` of kernel modules: depends=, softdep=);
* ``notes()``: (owner, type) of every ELF note, to check a vmlinux carries the Xen PVH entry
  note (owner "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY) that lets QEMU and Firecracker
  boot it directly.
"""

from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
PT_DYNAMIC = 2
PT_INTERP = 3
PT_NOTE = 4
DT_NEEDED = 1
DT_STRTAB = 5
XEN_ELFNOTE_PHYS32_ENTRY = 18


class ElfError(ValueError):
    """Not a 64-bit little-endian ELF file, or a malformed one."""


class Elf:
    """A parsed ELF64 LE image held in memory."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
            raise ElfError("not a 64-bit little-endian ELF file")
        self.data = data
        (self.e_type, _m, _v, self.entry, self.phoff, self.shoff, _f, _eh, self.phentsize,
         self.phnum, self.shentsize, self.shnum, self.shstrndx) = struct.unpack_from(
            "<HHIQQQIHHHHHH", data, 16)

    @classmethod
    def load(cls, path: str) -> Elf:
        with open(path, "rb") as f:
            return cls(f.read())

    def segments(self) -> list[tuple[int, int, int, int, int]]:
        """(p_type, p_offset, p_vaddr, p_filesz, p_memsz) of every program header."""
        out = []
        for i in range(self.phnum):
            p_type, _fl, off, vaddr, _pa, filesz, memsz, _al = struct.unpack_from(
                "<IIQQQQQQ", self.data, self.phoff + i * self.phentsize)
            out.append((p_type, off, vaddr, filesz, memsz))
        return out

    def _sections(self) -> list[tuple[int, int, int, int]]:
        """(sh_name, sh_type, sh_offset, sh_size) of every section header."""
        out = []
        for i in range(self.shnum):
            name, stype, _fl, _addr, off, size = struct.unpack_from(
                "<IIQQQQ", self.data, self.shoff + i * self.shentsize)
            out.append((name, stype, off, size))
        return out

    def section(self, wanted: str) -> bytes | None:
        secs = self._sections()
        if not secs or self.shstrndx >= len(secs):
            return None
        _n, _t, stroff, strsize = secs[self.shstrndx]
        for name, _stype, off, size in secs:
            end = self.data.index(b"\0", stroff + name)
            if self.data[stroff + name:end].decode("ascii", "replace") == wanted:
                return self.data[off:off + size]
        return None

    def _vaddr_to_offset(self, vaddr: int) -> int:
        for p_type, off, start, filesz, _memsz in self.segments():
            if p_type == 1 and start <= vaddr < start + filesz:
                return off + (vaddr - start)
        raise ElfError(f"address {vaddr:#x} is not in a loaded segment")

    def interpreter(self) -> str | None:
        for p_type, off, _va, filesz, _ms in self.segments():
            if p_type == PT_INTERP:
                return self.data[off:off + filesz].rstrip(b"\0").decode()
        return None

    def needed(self) -> list[str]:
        dyn = [s for s in self.segments() if s[0] == PT_DYNAMIC]
        if not dyn:
            return []
        _t, off, _va, filesz, _ms = dyn[0]
        entries = []
        strtab = None
        for i in range(0, filesz, 16):
            tag, val = struct.unpack_from("<qQ", self.data, off + i)
            if tag == 0:
                break
            if tag == DT_STRTAB:
                strtab = self._vaddr_to_offset(val)
            elif tag == DT_NEEDED:
                entries.append(val)
        if strtab is None:
            return []
        out = []
        for n in entries:
            end = self.data.index(b"\0", strtab + n)
            out.append(self.data[strtab + n:end].decode())
        return out

    def notes(self) -> list[tuple[str, int]]:
        out = []
        for p_type, off, _va, filesz, _ms in self.segments():
            if p_type != PT_NOTE:
                continue
            pos, end = off, off + filesz
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                name = self.data[pos + 12:pos + 12 + namesz].rstrip(b"\0").decode("ascii", "replace")
                out.append((name, ntype))
                pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
        return out

    def has_pvh_note(self) -> bool:
        return ("Xen", XEN_ELFNOTE_PHYS32_ENTRY) in self.notes()


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` key=value strings of a kernel module (values per key, in order)."""
    sec = Elf(ko).section(".modinfo") or b""
    out: dict[str, list[str]] = {}
    for item in sec.split(b"\0"):
        k, sep, v = item.decode("utf-8", "replace").partition("=")
        if sep:
            out.setdefault(k, []).append(v)
    return out
