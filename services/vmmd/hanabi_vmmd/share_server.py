"""The file share of a Firecracker VM: 9P2000.L over a guest-initiated vsock stream, served
by Debian's diod (one well-kept 9P server; we write none of our own).

Firecracker has no shared-filesystem device. Its hybrid vsock hands a guest connection to
host port P to whoever listens on the Unix socket `<vsock uds>_P`; `ShareServer` listens on
`<vsock uds>_SHARE_VSOCK_PORT` and gives each accepted connection to a diod of its own
(`diod -f -r 0 -w 1 -e /export -n -N`: the connection as its stdin and stdout, no
authentication beyond that socket, which only the VM reaches). The agent mounts it with
`trans=fd` (docs/agent-protocol.md).

diod follows a client's `..` out of its export (a hostile guest kernel can send one), so it
never sees the host's tree: `CONFINE` runs it in a mount namespace of its own, chrooted
into an empty tmpfs holding only a read-only /usr (its program and libraries, Debian's
merged /usr) and the VM's export root at /export (an rbind, taken when the guest connects:
after blockd bound the container's paths in). Walking up from /export reaches that empty
root, nothing of the host.

A diod that dies while its VM runs (killed, crashed) takes the guest's 9P transport with
it: every file operation on the share fails with EIO from then on (the kernel's `trans=fd`
client never reconnects, and the container's root is on that mount). The server logs it and
calls `on_failure`, the owning backend's policy (Firecracker: end the VM, so the sandbox
reads as stopped, 137, as when QEMU and its 9P server die); it keeps listening, and a new
connection gets a new diod. vmmd keeps its own copy of each connection until its diod is
reaped, so it tells a client that hung up (the guest shutting down; diod 1.0.24 sometimes
crashes on that way out) from a server that died: the first is only logged.

A diod runs in a session of its own, so it outlives a vmmd restart like the VMM does;
`stop_servers` ends every diod of an export root (found by HANABI_SHARE_EXPORT in its
environment), at VM stop and for orphans at vmmd start.
"""

from __future__ import annotations

import logging
import select
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from collections.abc import Callable

from hanabi_common.errors import FailedPrecondition
from hanabi_vmmd import proc
from hanabi_wire.constants import SHARE_EXPORT_NAME, SHARE_VSOCK_PORT

log = logging.getLogger("hanabi.vmmd.share")
DIOD = "diod"
EXPORT_ENV = "HANABI_SHARE_EXPORT"
# $1: an empty directory to build the root in, $2: the export root, $3: where it appears in
# the new root; then the server's argv.
CONFINE = r"""
set -e
root=$1; export_dir=$2; share=$3; shift 3
mount -t tmpfs -o mode=0755,size=64k,nosuid,nodev hanabi-share "$root"
mkdir "$root/usr" "$root$share"
mount --rbind /usr "$root/usr"
mount -o remount,bind,ro "$root/usr"
for d in lib lib64 bin sbin; do ln -s "usr/$d" "$root/$d"; done
mount --rbind "$export_dir" "$root$share"
exec chroot "$root" "$@"
"""


def diod_path(binary: str = DIOD) -> str | None:
    """The diod executable, or None when it is not installed (apt-get install diod)."""
    return shutil.which(binary)


def listen_path(vsock_uds: Path) -> Path:
    """Where Firecracker connects a guest's connection to SHARE_VSOCK_PORT."""
    return Path(f"{vsock_uds}_{SHARE_VSOCK_PORT}")


def diod_argv(binary: str, export: Path, root: Path) -> list[str]:
    """One diod serving the connection on fds 0/1, confined (CONFINE) to `root` where the
    export root `export` is its only export, SHARE_EXPORT_NAME."""
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", CONFINE, "confine",
            str(root), str(export), SHARE_EXPORT_NAME, binary, "-f", "-r", "0", "-w", "1", "-e", SHARE_EXPORT_NAME,
            "-n", "-N", "-L", "stderr"]


class ShareServer:
    """Accepts the VM's share connections on `path`; a diod per connection."""

    def __init__(self, path: Path, export: Path, binary: str, log_file: Path,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.path, self.export, self.binary, self.log_file = Path(path), Path(export), binary, Path(log_file)
        # Called (from a watcher thread) with a reason when a diod dies while serving.
        self.on_failure = on_failure
        self.roots = self.log_file.parent  # each diod's (empty, on the host) root dir lives here
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.served: list[int] = []
        self.ended: dict[int, int] = {}  # pid -> Popen return code, once its watcher is done

    def start(self) -> None:
        """Listen (before the VM boots, so the guest's first connect finds us)."""
        if not self.export.is_dir():
            raise FailedPrecondition(f"the share root {self.export} does not exist")
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(self.path))
        sock.listen(4)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name=f"share-{self.path.name}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            try:
                self.serve(conn)  # conn is the watcher's now
            except OSError as exc:
                conn.close()
                log.error("could not start diod for a share connection", extra={"export": str(self.export),
                                                                                "error": str(exc)})

    def serve(self, conn: socket.socket) -> int:
        """Hand one connection to a new diod; returns its pid. Our copy of `conn` stays open
        until the diod is reaped (then closed: the guest sees the stream end), so its end
        can tell a client that hung up from a server that died."""
        root = self.roots / f"diod-root-{len(self.served)}"
        root.mkdir(mode=0o700, exist_ok=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", EXPORT_ENV: str(self.export)}
        with open(self.log_file, "ab") as err:
            child = subprocess.Popen(diod_argv(self.binary, self.export, root), stdin=conn.fileno(),
                                     stdout=conn.fileno(), stderr=err, start_new_session=True, close_fds=True,
                                     env=env)
        self.served.append(child.pid)
        threading.Thread(target=self._watch, args=(child, conn), daemon=True).start()
        log.info("share served", extra={"export": str(self.export), "pid": child.pid})
        return child.pid

    def _watch(self, child: subprocess.Popen, conn: socket.socket) -> None:
        """Reap a diod; one that dies while its VM runs leaves the guest's share failing
        with EIO (the 9P client's transport is gone): say so and call `on_failure`."""
        status = child.wait()
        try:
            hung_up = peer_hung_up(conn)
            conn.close()  # the last copy: a guest still connected sees the stream end now
            self._ended(child, status, hung_up)
        finally:
            self.ended[child.pid] = status

    def _ended(self, child: subprocess.Popen, status: int, hung_up: bool) -> None:
        if self._sock is None:
            return  # closing: we ended it
        extra = {"export": str(self.export), "pid": child.pid, "status": proc.exit_status(status)}
        if hung_up:  # diod's exit status then does not matter (it may crash on the way out)
            log.info("the share's 9P client hung up", extra=extra)
            return
        log.error("the share's 9P server died; the container's files now fail with EIO", extra=extra)
        if self.on_failure is not None:
            try:
                self.on_failure(f"the file share's 9P server (diod, pid {child.pid}) died with status "
                                f"{proc.exit_status(status)}")
            except Exception:  # noqa: BLE001 - a policy that fails must not kill the watcher silently
                log.exception("the share failure policy failed", extra=extra)

    def close(self) -> None:
        """Stop listening and end the diods this server started."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self.path.unlink(missing_ok=True)
        stop_servers(self.export)


def peer_hung_up(conn: socket.socket) -> bool:
    """True when the other end of `conn` (the guest, through Firecracker) has closed it."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


def stop_servers(export: Path) -> list[int]:
    """SIGKILL every share server of `export` (ours, even from before a vmmd restart),
    known by EXPORT_ENV in its environment."""
    killed = []
    want = f"{EXPORT_ENV}={export}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        pid = int(entry.name)
        if want in environ and proc.kill_verified(pid, proc.start_time(pid), signal.SIGKILL):
            killed.append(pid)
    return killed
