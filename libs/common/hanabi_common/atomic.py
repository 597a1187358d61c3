"""Atomic file replacement, in the standard library only (the lean CLI imports it too).

One definition for every state file hanabi writes: a temp file next to the target, fsync,
rename over the target, fsync of the directory. A crash leaves the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import os


def write_atomic(target: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace `target` with `data` atomically (its directory must exist)."""
    target = os.fspath(target)
    directory = os.path.dirname(target) or "."
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
