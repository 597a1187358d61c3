"""Host side of `terminal: true`: the console socket, the host pty, raw mode, resizes.

The process itself runs on a pty inside the guest (docs/agent-protocol.md, `resize`); the
stand-in bridges that pty to one on the host, in one of three ways (runc's rules, checked
by `standin_args`):

- **`--console-socket PATH`** (containerd's shim: `docker run -t`, `docker exec -t`). The
  stand-in opens a host pty pair, puts the slave in raw mode (the guest's pty does the line
  discipline: echo, ^C, CR/LF), and sends the MASTER to PATH over SCM_RIGHTS as runc does:
  it connects a SOCK_STREAM Unix socket and makes one `sendmsg` whose data is the master's
  name (`/dev/ptmx`) and whose control message is one SCM_RIGHTS fd — what containerd's
  `RecvFd` (go-runc `Socket.ReceiveMaster`) insists on. It keeps the SLAVE as its relay
  end; after `setsid` the slave becomes its controlling terminal, so when the shim resizes
  the master (TIOCSWINSZ) the kernel sends the stand-in SIGWINCH; it reads the size with
  TIOCGWINSZ and passes it on with `IoStream.resize`.
- **no console socket, stdin is a terminal** (`hanabi-runtime run` typed in a shell): the
  stand-in relays its own stdin/stdout, with that terminal in raw mode while it relays
  (restored afterwards), and follows the terminal's SIGWINCH.
- **no console socket, stdin is not a terminal** (scripts, tests): its stdio is relayed as
  is; the guest's pty still echoes and translates.

Use from a stand-in (any exec id)::

    relay = setup_console(console_socket, stdin_fd)    # before reporting "ready"
    status = relay.relay(stream)                        # after start; restores the tty

`ConsoleSocket` is the receiving end (go-runc's `NewConsoleSocket`/`ReceiveMaster`), for
tests and tools. Imports stay light (stdlib only): this runs in every stand-in.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
from contextlib import contextmanager
from typing import Protocol
from collections.abc import Iterator

from hanabi_wire import MAX_TTY_DIM

MAX_NAME_LEN = 4096  # runc's utils.MaxNameLen: the data part of the fd message
MASTER_NAME = "/dev/ptmx"  # what runc sends: the name of the master's file
CONNECT_TIMEOUT_S = 10.0


class Stream(Protocol):
    """What the relay needs of `hanabi_agentd.iostream.IoStream`."""

    def relay(self, stdin_fd: int | None, stdout_fd: int, stderr_fd: int) -> int: ...

    def resize(self, height: int, width: int) -> None: ...


# -- runc's rules ----------------------------------------------------------------------------
def standin_args(terminal: bool, console_socket: str | None, detach: bool) -> list[str]:
    """The stand-in's terminal arguments for a process; InvalidArgument where runc refuses.

    `detach`: the caller returns before the process ends (`create`, `run -d`, `exec -d`).
    """
    from hanabi_common.errors import InvalidArgument

    if console_socket and not (terminal and detach):
        raise InvalidArgument("cannot use console socket if runc will not detach or allocate tty")
    if terminal and detach and not console_socket:
        raise InvalidArgument("cannot allocate tty if runc will detach without setting console socket")
    if not terminal:
        return []
    if console_socket:
        return ["--console-socket", os.path.abspath(console_socket)]
    return ["--tty"]


# -- SCM_RIGHTS ------------------------------------------------------------------------------
def send_fd(socket_path: str, fd: int, name: str = MASTER_NAME,
            timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Connect to the Unix socket at `socket_path` and send `fd` the way runc does."""
    data = name.encode()
    if not 0 < len(data) < MAX_NAME_LEN:
        raise ValueError(f"fd name must be 1..{MAX_NAME_LEN - 1} bytes")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    finally:
        sock.close()


def recv_fd(conn: socket.socket) -> tuple[int, str]:
    """Receive one fd sent by `send_fd` (or runc), checked like containerd's `RecvFd`:
    fewer than MAX_NAME_LEN bytes of name and exactly one SCM_RIGHTS control message with
    exactly one fd. Returns `(fd, name)`; the fd is close-on-exec."""
    space = socket.CMSG_SPACE(struct.calcsize("i"))
    data, ancillary, flags, _ = conn.recvmsg(MAX_NAME_LEN, space, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += struct.unpack(f"{usable // 4}i", payload[:usable])
    try:
        if len(data) >= MAX_NAME_LEN or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError(f"recvfd: incorrect number of bytes read (n={len(data)})")
        if len(ancillary) != 1 or len(fds) != 1:
            raise ValueError(f"recvfd: expected one SCM_RIGHTS message with one fd, got "
                             f"{len(ancillary)} message(s) and {len(fds)} fd(s)")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], data.decode(errors="replace")


class ConsoleSocket:
    """A listening console socket (go-runc's `NewConsoleSocket`): pass `path` as
    `--console-socket`, then `receive_master()` returns the pty master sent to it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        self._sock.listen(1)

    def receive_master(self, timeout: float | None = None) -> int:
        """Accept one connection and return the fd it carries."""
        self._sock.settimeout(timeout)
        conn, _ = self._sock.accept()
        with conn:
            conn.settimeout(timeout)
            fd, _name = recv_fd(conn)
        return fd

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> ConsoleSocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# -- terminals -------------------------------------------------------------------------------
def get_winsize(fd: int) -> tuple[int, int]:
    """TIOCGWINSZ: `(rows, columns)` of the terminal `fd`."""
    import fcntl
    import termios

    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on the terminal `fd` (on a master: what a shim's resize does)."""
    import fcntl
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def make_raw(fd: int) -> list:
    """Put the terminal `fd` in raw mode (cfmakeraw); return the previous attributes."""
    import termios

    old = termios.tcgetattr(fd)
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = old
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
               | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
    return old


def restore(fd: int, attrs: list | None) -> None:
    """Put back attributes `make_raw` returned (quietly: the terminal may be gone)."""
    if attrs is None:
        return
    import termios

    try:
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except (OSError, termios.error):
        pass


def save_terminal(fd: int = 0) -> list | None:
    """The attributes of the terminal `fd` (None if it is none), for `restore`."""
    if not os.isatty(fd):
        return None
    import termios

    try:
        return termios.tcgetattr(fd)
    except termios.error:
        return None


@contextmanager
def terminal_restored(fd: int = 0) -> Iterator[None]:
    """Whatever happens inside (a stand-in killed while it had the terminal raw), leave
    the terminal `fd` with the attributes it had on entry. A no-op if it is no terminal.
    Enter it before the stand-in can go raw (before `create`)."""
    saved = save_terminal(fd)
    try:
        yield
    finally:
        restore(fd, saved)


def take_controlling_tty(fd: int) -> bool:
    """Become a session leader (if not one yet) and make `fd` the controlling terminal,
    so its resizes arrive as SIGWINCH. False if that is not possible here."""
    import fcntl
    import termios

    try:
        os.setsid()
    except PermissionError:
        pass  # already a process group leader (a session leader when spawned detached)
    try:
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
        return True
    except OSError:
        return False


# -- the relay -------------------------------------------------------------------------------
class ConsoleRelay:
    """The host end of a process's terminal: which fds to relay, where the window size is
    read, which terminal goes raw while relaying. Made by `setup_console`."""

    def __init__(self, in_fd: int | None, out_fd: int, *, size_fd: int | None = None,
                 raw_fd: int | None = None, owned: tuple[int, ...] = ()) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.size_fd = size_fd
        self.raw_fd = raw_fd
        self.owned = owned
        self._saved: list | None = None
        self._wake_w: int | None = None

    def relay(self, stream: Stream) -> int:
        """Relay until the process exits, following resizes; return its status."""
        try:
            if self.raw_fd is not None:
                self._saved = make_raw(self.raw_fd)
            if self.size_fd is not None:
                self.follow_resizes(stream)
            return stream.relay(self.in_fd, self.out_fd, self.out_fd)
        finally:
            self.close()

    def follow_resizes(self, stream: Stream) -> None:
        """On SIGWINCH (and once now) send the size of `size_fd` to the process. The
        handler only wakes a thread: sending from a signal handler could deadlock on the
        stream's send lock."""
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w
        signal.signal(signal.SIGWINCH, lambda *_: self.poke())
        threading.Thread(target=self._resizer, args=(stream, wake_r), name="winch", daemon=True).start()
        self.poke()

    def poke(self) -> None:
        """Make the resizer look at the window size again."""
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"w")
            except OSError:
                pass  # full (a look is due anyway) or closed

    def _resizer(self, stream: Stream, wake_r: int) -> None:
        assert self.size_fd is not None
        while True:
            try:
                if not os.read(wake_r, 64):
                    return
                rows, cols = get_winsize(self.size_fd)
            except OSError:
                return
            if 0 < rows <= MAX_TTY_DIM and 0 < cols <= MAX_TTY_DIM:
                try:
                    stream.resize(rows, cols)
                except (OSError, ValueError):
                    pass  # agentd away (the relay re-attaches); the next resize goes through

    def close(self) -> None:
        """Restore the terminal and close what the relay owns."""
        if self.raw_fd is not None:
            restore(self.raw_fd, self._saved)
            self._saved = None
        for fd in self.owned:
            try:
                os.close(fd)
            except OSError:
                pass
        self.owned = ()


def setup_console(console_socket: str | None, stdin_fd: int | None = 0, stdout_fd: int = 1) -> ConsoleRelay:
    """Prepare the host end of a `terminal: true` process (see the module docstring).

    With `console_socket`: open a host pty, send its master there (before `create` or
    `exec` returns, as runc does), keep the slave as controlling terminal and relay end.
    Without: relay `stdin_fd`/`stdout_fd`, raw and resize-following if `stdin_fd` is a tty.
    """
    if console_socket:
        master, slave = os.openpty()
        try:
            make_raw(slave)
            send_fd(console_socket, master)
        except BaseException:
            os.close(slave)
            raise
        finally:
            os.close(master)
        if not take_controlling_tty(slave):
            _warn("cannot make the pty its controlling terminal: window resizes will not follow")
        _release_stdio()
        return ConsoleRelay(slave, slave, size_fd=slave, owned=(slave,))
    if stdin_fd is not None and os.isatty(stdin_fd):
        return ConsoleRelay(stdin_fd, stdout_fd, size_fd=stdin_fd, raw_fd=stdin_fd)
    return ConsoleRelay(stdin_fd, stdout_fd)


def _release_stdio() -> None:
    """Let go of the stdio inherited from `create`: the process's stdio is the pty now, and
    the caller (containerd's shim, through go-runc) waits for its pipes to close before it
    takes `create` as done."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _warn(message: str) -> None:
    try:
        os.write(2, f"hanabi stand-in: {message}\n".encode())
    except OSError:
        pass
