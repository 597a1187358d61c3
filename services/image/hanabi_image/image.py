"""Build the hanabi guest (kernel + initramfs with busybox, python3.11 and the agent).

Everything comes from Debian packages (see ``debs``): the generic kernel, busybox-static,
python3.11-minimal with the few stdlib modules the agent imports, and the C libraries they
link. The result directory holds ``vmlinuz`` (the bzImage), ``vmlinux`` (the ELF with the
PVH note, what QEMU -kernel and Firecracker boot), ``initrd.img`` (newc cpio) and
``manifest.json``. It is named after a hash of the inputs (package versions + checksums,
agent and /init sources, module list, builder version), so a build is skipped when nothing
changed; ``/var/lib/hanabi/guest/current`` points at the newest one.

The VMM boots it with ``KERNEL_CMDLINE`` (append ``hanabi.channel=vsock`` to make the agent
listen on AF_VSOCK port 1024 instead of the virtio-serial port ``agent.0``); those pieces are
``hanabi_wire.constants``. The agent's modules and the protocol package ``hanabi_wire``
(``WIRE_FILES``) go to /usr/lib/hanabi, compiled to __pycache__.
"""

from __future__ import annotations

import ast
import datetime
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import time
from typing import Any

from hanabi_wire.constants import (CHANNEL_VSOCK, CMDLINE_CHANNEL, KERNEL_CMDLINE, PROTOCOL_VERSION,
                                   SERIAL_PORT_NAME, VSOCK_PORT, cmdline_word)

from . import debs as D
from . import selftest
from .cpio import CpioWriter
from .elf import Elf
from .kernel import extract_vmlinux, module_closure

BUILDER_VERSION = "1"
GUEST_ROOT = "/var/lib/hanabi/guest"
KEEP_BUILDS = 3
FIRECRACKER_VERSIONS = ">=1.8"
PACKAGES = ["linux-image-amd64", "busybox-static", "python3.11-minimal", "libpython3.11-minimal",
            "libpython3.11-stdlib", "libc6", "zlib1g", "libexpat1", "libffi8", "libseccomp2"]
# Shared libraries the agent opens with ctypes (not in any ELF's DT_NEEDED): seccomp.py.
CTYPES_LIBS = ["libseccomp.so.2"]
# virtio_mmio: Firecracker (>= 1.8 describes its virtio-mmio devices in ACPI). virtio_balloon
# and virtio_rng are cheap extras (free page reporting, entropy for containers).
# 9p + 9pnet_virtio: QEMU's virtio-9p shares; 9pnet_fd: 9P2000.L over a vsock stream (Firecracker).
# crc32c_generic: ext4's metadata checksums (the generic kernel has it as a module, and ext4
# names it only by the alias crypto-crc32c, which the closure cannot follow).
MODULES = ["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "crc32c_generic", "ext4", "vsock",
           "vmw_vsock_virtio_transport", "virtio_balloon", "virtio_rng", "9p", "9pnet_virtio", "9pnet_fd"]
AGENT_FILES = ["__init__.py", "channel.py", "core.py", "sandbox.py", "process.py",
               "handlers.py", "procio.py", "poller.py", "agent.py", "mounts.py", "share.py", "namespaces.py", "network.py", "dnsrelay.py",
               "blkswap.py", "caps.py", "seccomp.py", "cgroups.py", "hardening.py", "oom.py", "rtnl.py"]
WIRE_FILES = ["__init__.py", "constants.py", "framing.py", "schema.py", "messages.py", "ocispec/__init__.py",
              "ocispec/caps.py", "ocispec/linux.py", "ocispec/process.py", "ocispec/resources.py", "ocispec/seccomp.py"]
PACKAGES_IN_IMAGE = ("hanabi_guest/", "hanabi_wire/")
# Imported lazily by the agent, or needed by the interpreter in the guest's C locale.
EXTRA_IMPORTS = ["ctypes", "resource", "traceback", "socket", "encodings.ascii", "encodings.latin_1"]
INITRD_COMPRESSION = "none"  # "none" or "lz4" (legacy frames, `lz4 -l`)
PY = "usr/bin/python3.11"
STDLIB = "usr/lib/python3.11"
LIB_DIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib"]


class BuildError(RuntimeError):
    """The guest image could not be built."""


def _pkg_file(name: str, package: str = "hanabi_guest") -> bytes:
    """A file of `package`, read as data: the agent is found, never imported on the host."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"package {package} not found (is hanabi installed?)")
    with open(os.path.join(list(spec.submodule_search_locations)[0], name), "rb") as f:
        return f.read()


def agent_version() -> str:
    """The agent's ``AGENT_VERSION``, read from its core.py (the agent is not imported here)."""
    for node in ast.parse(_pkg_file("core.py")).body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["AGENT_VERSION"]
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise BuildError("hanabi_guest/core.py defines no AGENT_VERSION string")


def sources() -> dict[str, bytes]:
    """The agent and protocol package files and /init that go into the initramfs."""
    out = {f"hanabi_guest/{f}": _pkg_file(f) for f in AGENT_FILES}
    out.update({f"hanabi_wire/{f}": _pkg_file(f, "hanabi_wire") for f in WIRE_FILES})
    out["init"] = _pkg_file("init.sh")
    return out


def inputs_hash(debs: dict[str, D.Deb]) -> str:
    doc = {
        "builder": BUILDER_VERSION,
        "packages": {d.name: [d.version, d.sha256] for d in sorted(debs.values(), key=lambda d: d.name)},
        "modules": MODULES,
        "extra_imports": EXTRA_IMPORTS,
        "compression": INITRD_COMPRESSION,
        "sources": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(sources().items())},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _resolve_in(root: str, rel: str) -> str:
    """Follow symlinks of ``rel`` inside the tree ``root`` (absolute targets are root-relative)."""
    rel = rel.lstrip("/")
    for _ in range(40):
        path = os.path.join(root, rel)
        if not os.path.islink(path):
            return rel
        target = os.readlink(path)
        rel = target.lstrip("/") if target.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(rel), target))
    raise BuildError(f"symlink loop at {rel}")


def _copy(src_root: str, rel: str, dst_root: str, dst_rel: str | None = None) -> str:
    real = _resolve_in(src_root, rel)
    dst = os.path.join(dst_root, (dst_rel or rel).lstrip("/"))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(os.path.join(src_root, real), dst)
    return dst


def _copy_libs(x: str, root: str, elf_paths: list[str]) -> list[str]:
    """Copy the DT_NEEDED closure (and the ELF interpreter) of ``elf_paths`` from x to root."""
    copied: list[str] = []
    seen: set[str] = set()
    queue = list(elf_paths)
    interp = Elf.load(elf_paths[0]).interpreter()
    if interp:
        queue.append(_copy(x, interp, root))
        copied.append(interp.lstrip("/"))
    while queue:
        for soname in Elf.load(queue.pop()).needed():
            if soname in seen:
                continue
            seen.add(soname)
            for d in LIB_DIRS:
                if os.path.lexists(os.path.join(x, d, soname)):
                    queue.append(_copy(x, os.path.join(d, soname), root))
                    copied.append(os.path.join(d, soname))
                    break
            else:
                raise BuildError(f"shared library {soname} not found in the unpacked packages")
    return copied


CLOSURE_SCRIPT = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
for m in sys.argv[3:]:
    importlib.import_module(m)
out = {}
for name, mod in list(sys.modules.items()):
    origin = getattr(getattr(mod, "__spec__", None), "origin", None)
    if origin and origin.startswith(sys.argv[2]):
        out[name] = origin
print(json.dumps(out))
"""

COMPILE_SCRIPT = """
import py_compile, sys
mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
for src in sys.argv[2:]:
    if sys.argv[1] == "legacy":
        py_compile.compile(src, cfile=src + "c", doraise=True, invalidation_mode=mode, optimize=2)
    else:
        py_compile.compile(src, doraise=True, invalidation_mode=mode)
"""


def _python(py: str, *args: str) -> str:
    proc = subprocess.run([py, "-I", "-S", "-B", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{py} {' '.join(args[:2])}... failed: {proc.stderr.strip()[-3000:]}")
    return proc.stdout


def _install_python(x: str, root: str) -> int:
    """Copy python3.11, the stdlib modules the agent needs (as sourceless .pyc) and the agent."""
    _copy(x, PY, root)
    os.symlink("python3.11", os.path.join(root, "usr/bin/python3"))
    agent_dir = os.path.join(root, "usr/lib/hanabi")
    for rel, data in sources().items():
        if rel.startswith(PACKAGES_IN_IMAGE):
            os.makedirs(os.path.join(agent_dir, os.path.dirname(rel)), exist_ok=True)
            with open(os.path.join(agent_dir, rel), "wb") as f:
                f.write(data)
    prefix = os.path.join(x, STDLIB) + "/"
    found = json.loads(_python(os.path.join(x, PY), "-c", CLOSURE_SCRIPT, agent_dir, prefix,
                               "hanabi_guest.agent", *EXTRA_IMPORTS))
    files = sorted(set(found.values()) | {prefix + "os.py"})
    py_srcs, sos = [], []
    for origin in files:
        rel = os.path.relpath(origin, x)
        if origin.endswith(".py"):
            dst = os.path.join(root, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(origin, dst)
            py_srcs.append(dst)
        else:
            sos.append(_copy(x, rel, root))
    _python(os.path.join(x, PY), "-c", COMPILE_SCRIPT, "legacy", *py_srcs)
    for src in py_srcs:
        os.unlink(src)
    agent_py = [os.path.join(agent_dir, r) for r in sources() if r.startswith(PACKAGES_IN_IMAGE)]
    _python(os.path.join(x, PY), "-c", COMPILE_SCRIPT, "pycache", *agent_py)
    _copy_libs(x, root, [os.path.join(root, PY), *sos, *_ctypes_libs(x, root)])
    return len(files)


def _ctypes_libs(x: str, root: str) -> list[str]:
    """Copy ``CTYPES_LIBS`` (found in LIB_DIRS of the unpacked packages); their paths in root."""
    out = []
    for soname in CTYPES_LIBS:
        for d in LIB_DIRS:
            if os.path.lexists(os.path.join(x, d, soname)):
                out.append(_copy(x, os.path.join(d, soname), root))
                break
        else:
            raise BuildError(f"shared library {soname} not found in the unpacked packages")
    return out


def _verify_python(root: str) -> None:
    """Run the trimmed interpreter from the tree: every guest import must resolve inside it."""
    check = ("import sys; sys.path.insert(0, sys.argv[1]); import hanabi_guest.agent, json, ctypes, resource; "
             "import hanabi_wire, hanabi_wire.messages, hanabi_wire.ocispec.linux, hanabi_wire.ocispec.process; "
             "ctypes.CDLL('libc.so.6').getpid(); ctypes.CDLL('libseccomp.so.2').seccomp_version; "
             "import traceback\ntry: 1/0\nexcept Exception: traceback.format_exc()\n"
             "bad = [m for m, v in sys.modules.items() if getattr(v, '__file__', None) and "
             "not v.__file__.startswith(sys.argv[2])]; assert not bad, bad; print(sys.version)")
    _python(os.path.join(root, PY), "-c", check, os.path.join(root, "usr/lib/hanabi"), root)
    selftest.run(os.path.join(root, PY), os.path.join(root, "usr/lib/hanabi"))


def _install_busybox(x: str, root: str) -> int:
    _copy(x, "bin/busybox", root)
    applets = subprocess.run([os.path.join(root, "bin/busybox"), "--list-full"], capture_output=True,
                             text=True, check=True).stdout.split()
    n = 0
    for rel in applets:
        dst = os.path.join(root, rel)
        if os.path.lexists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink("/bin/busybox", dst)
        n += 1
    return n


def _assemble(x: str, root: str, release: str) -> dict[str, Any]:
    for d in ("dev", "proc", "sys", "run", "tmp", "etc/hanabi", "root", "mnt"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    applets = _install_busybox(x, root)
    n_py = _install_python(x, root)
    moddir = f"lib/modules/{release}"
    mods = module_closure(os.path.join(x, moddir), MODULES)
    for rel in mods:
        _copy(x, os.path.join(moddir, rel), root)
    with open(os.path.join(root, "etc/hanabi/modules"), "w", encoding="utf-8") as f:
        f.write("".join(f"/{moddir}/{rel}\n" for rel in mods))
    with open(os.path.join(root, "init"), "wb") as f:
        f.write(sources()["init"])
    os.chmod(os.path.join(root, "init"), 0o755)
    _verify_python(root)
    return {"modules": [os.path.basename(m)[:-3] for m in mods], "busybox_applets": applets,
            "python_files": n_py}


def _write_initrd(root: str, out: str) -> int:
    raw = out + ".cpio"
    with open(raw, "wb") as f:
        w = CpioWriter(f)
        w.add_dir("dev")
        w.add_tree(root)
        w.add_chardev("dev/console", 5, 1)
        w.close()
    size = os.path.getsize(raw)
    if INITRD_COMPRESSION == "lz4":
        subprocess.run(["lz4", "-l", "-9", "-q", "-f", raw, out], check=True)
        os.unlink(raw)
    else:
        os.replace(raw, out)
    return size


def _file_info(path: str) -> dict[str, Any]:
    return {"size": os.path.getsize(path), "sha256": D.sha256_file(path)}


def _build_into(tmp: str, debs: dict[str, D.Deb], paths: dict[str, str], digest: str) -> dict[str, Any]:
    x, root = os.path.join(tmp, "x"), os.path.join(tmp, "root")
    for p in paths.values():
        D.extract(p, x)
    kpkg = next(n for n in debs if n.startswith("linux-image-"))
    release = kpkg[len("linux-image-"):]
    with open(os.path.join(x, "boot", f"vmlinuz-{release}"), "rb") as f:
        bz = f.read()
    with open(os.path.join(tmp, "vmlinuz"), "wb") as f:
        f.write(bz)
    with open(os.path.join(tmp, "vmlinux"), "wb") as f:
        f.write(extract_vmlinux(bz))
    details = _assemble(x, root, release)
    raw_size = _write_initrd(root, os.path.join(tmp, "initrd.img"))
    shutil.rmtree(x)
    shutil.rmtree(root)
    return {
        "schema": 1,
        "kernel_release": release,
        "kernel_package": kpkg,
        "packages": {d.name: d.version for d in sorted(debs.values(), key=lambda d: d.name)},
        "inputs_hash": digest,
        "builder_version": BUILDER_VERSION,
        "agent_version": agent_version(),
        "kernel_cmdline": KERNEL_CMDLINE,
        "protocol_version": PROTOCOL_VERSION,
        "agent_channel": {"default": "virtio-serial", "virtio_serial_name": SERIAL_PORT_NAME,
                          "vsock_port": VSOCK_PORT, "vsock_cmdline": cmdline_word(CMDLINE_CHANNEL, CHANNEL_VSOCK)},
        "initrd_compression": INITRD_COMPRESSION,
        "initrd_uncompressed_size": raw_size,
        "files": {n: _file_info(os.path.join(tmp, n)) for n in ("vmlinuz", "vmlinux", "initrd.img")},
        "firecracker_versions": FIRECRACKER_VERSIONS,
        **details,
    }


def _read_manifest(d: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
            manifest: dict[str, Any] = json.load(f)
            return manifest
    except (OSError, ValueError):
        return None


def build(out: str | None = None, force: bool = False, cache: str = D.DEFAULT_CACHE,
          guest_root: str = GUEST_ROOT) -> tuple[str, bool]:
    """Build (or re-use) the guest; return (result directory, whether it was built now)."""
    debs = D.resolve(PACKAGES)
    digest = inputs_hash(debs)
    target = os.path.abspath(out) if out else os.path.join(guest_root, digest[:16])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(os.path.join(os.path.dirname(target), ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = False
        old = _read_manifest(target)
        if force or not old or old.get("inputs_hash") != digest:
            t0 = time.monotonic()
            paths = D.download(list(debs.values()), cache)
            tmp = f"{target}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            try:
                manifest = _build_into(tmp, debs, paths, digest)
                manifest["built_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
                manifest["build_seconds"] = round(time.monotonic() - t0, 2)
                with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
                    json.dump(manifest, f, indent=2, sort_keys=True)
                    f.write("\n")
                if os.path.exists(target):
                    shutil.rmtree(target)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            built = True
        if not out:
            link = os.path.join(guest_root, "current")
            tmp_link = f"{link}.tmp-{os.getpid()}"
            os.symlink(os.path.basename(target), tmp_link)
            os.replace(tmp_link, link)
            prune(guest_root)
    return target, built


def prune(guest_root: str = GUEST_ROOT, keep: int = KEEP_BUILDS) -> list[str]:
    """Delete all but the ``keep`` newest builds (never ``current``) and dead temp dirs.

    A VMM has read the kernel and initrd by the time its VM runs, so an older build only
    matters to a VM that is just being started; ``keep`` covers that.
    """
    current = os.path.realpath(os.path.join(guest_root, "current"))
    builds, removed = [], []
    for name in os.listdir(guest_root):
        path = os.path.join(guest_root, name)
        if ".tmp-" in name and name.rsplit("-", 1)[-1].isdigit():
            if not os.path.exists(f"/proc/{name.rsplit('-', 1)[-1]}") and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        elif len(name) == 16 and all(c in "0123456789abcdef" for c in name) and os.path.isdir(path):
            builds.append((os.stat(path).st_mtime, path))
    for _mtime, path in sorted(builds, reverse=True)[keep:]:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def info(guest_root: str = GUEST_ROOT) -> dict[str, Any]:
    """The manifest of ``current``."""
    m = _read_manifest(os.path.join(guest_root, "current"))
    if m is None:
        raise BuildError(f"no guest image at {guest_root}/current (run `hanabi-image build`)")
    m["path"] = os.path.realpath(os.path.join(guest_root, "current"))
    return m
