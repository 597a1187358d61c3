"""How the agent mounts the VM's 9P file share (docs/agent-protocol.md, "File share").

Two transports, one protocol (9P2000.L), chosen by the kernel command line:
- QEMU: a virtio-9p device with mount tag SHARE_MOUNT_TAG (QEMU's own 9P server);
- Firecracker (`hanabi.share=PATH` on the command line): a stream the agent opens to host
  vsock port SHARE_VSOCK_PORT, which the host hands to diod; the kernel's 9P client runs on
  that socket (`trans=fd`), and PATH, the host's export root, is the attach name.
`cache=mmap`: reads and writes go to the host at once (a host change is seen, a write is on
the host when write(2) returns); only shared writable mmap uses the page cache.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import errno
import os

from hanabi_wire.constants import CMDLINE_SHARE, SHARE_VSOCK_PORT

MSIZE = 262144
VIRTIO_OPTIONS = f"trans=virtio,version=9p2000.L,msize={MSIZE},cache=mmap,access=client"
# /init loads modules in the background: a mount before the transport's module is in fails
# with EINVAL ("unknown transport"), so the agent waits for these first.
VIRTIO_MODULES = ("9p", "9pnet_virtio")
FD_MODULES = ("9p", "9pnet_fd", "vmw_vsock_virtio_transport")
VMADDR_CID_HOST = 2
# The vsock connection is not there yet (device still probing, or the host not listening).
_NOT_YET = (errno.ENODEV, errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EADDRNOTAVAIL)


def share_aname(cmdline: str) -> str | None:
    """The attach name of a share over vsock (``hanabi.share=PATH``), or None (virtio-9p)."""
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == CMDLINE_SHARE and value.startswith("/") and "," not in value:
            return value
    return None


def fd_options(fd: int, aname: str) -> str:
    """Mount options of 9P on an open stream ``fd``, attaching to ``aname`` (diod's export).
    access=user: each guest uid attaches as itself, so the host checks and owns as that uid."""
    return (f"trans=fd,rfdno={fd},wfdno={fd},version=9p2000.L,aname={aname},msize={MSIZE},"
            "cache=mmap,access=user,uname=root,dfltuid=0,dfltgid=0")


def modules_loaded(names: tuple[str, ...], sys_module: str = "/sys/module") -> bool:
    """True once every module of ``names`` shows in sysfs."""
    return all(os.path.isdir(os.path.join(sys_module, name)) for name in names)


def connect_host(port: int = SHARE_VSOCK_PORT) -> int | None:
    """An AF_VSOCK stream to the host's ``port`` as a raw fd (the mount keeps it for the
    VM's life), or None while it cannot be made yet."""
    import socket

    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.connect((VMADDR_CID_HOST, port))
    except OSError as exc:
        sock.close()
        if exc.errno in _NOT_YET:
            return None
        raise
    return sock.detach()
