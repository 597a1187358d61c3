"""Build a small OCI bundle from the host's static busybox (Debian's busybox-static).

Used by `make demo` and by the tests: no registry is reachable, so images are made locally.
`python -m hanabi_runtime.demo_bundle DIR [--] ARGS...` writes DIR/config.json and DIR/rootfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hanabi_runtime.bundle import default_spec

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def find_static_busybox() -> Path:
    """The host's busybox, which must be statically linked to run in any rootfs."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.exists():
            out = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True).stdout
            if "statically linked" in out or "static-pie" in out or not shutil.which("file"):
                return path
    raise FileNotFoundError("no static busybox found: apt-get install busybox-static")


def make_rootfs(rootfs: Path) -> None:
    """A busybox root filesystem with every applet linked."""
    busybox = find_static_busybox()
    for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "var", "run"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = rootfs / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")


def make_bundle(bundle: Path, args: list[str], *, env: list[str] | None = None, cwd: str = "/",
                uid: int = 0, gid: int = 0) -> Path:
    """Write a bundle whose process runs `args`; returns the bundle directory."""
    bundle.mkdir(parents=True, exist_ok=True)
    if not (bundle / "rootfs" / "bin" / "busybox").exists():
        make_rootfs(bundle / "rootfs")
    spec = default_spec(args)
    spec["process"]["cwd"] = cwd
    spec["process"]["user"] = {"uid": uid, "gid": gid}
    if env is not None:
        spec["process"]["env"] = env
    (bundle / "config.json").write_text(json.dumps(spec, indent=2) + "\n")
    return bundle


def main() -> None:
    """Command line: DIR [--] ARGS..."""
    argv = [a for a in sys.argv[1:] if a != "--"]
    if not argv:
        sys.exit("usage: python -m hanabi_runtime.demo_bundle DIR [--] ARGS...")
    print(make_bundle(Path(argv[0]), argv[1:] or ["uname", "-r"]))


if __name__ == "__main__":
    main()
