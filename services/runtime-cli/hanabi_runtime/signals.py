"""Signal names and numbers as runc accepts them: KILL, SIGKILL, kill, 9."""

from __future__ import annotations

import signal

from hanabi_common.errors import InvalidArgument


def parse_signal(value: str) -> int:
    """The signal number for `value`; InvalidArgument for anything unknown."""
    text = value.strip()
    if text.isdigit():
        number = int(text)
        if 1 <= number <= 64:
            return number
        raise InvalidArgument(f"signal number {number} is out of range 1..64")
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidArgument(f"unknown signal {value!r}") from None
