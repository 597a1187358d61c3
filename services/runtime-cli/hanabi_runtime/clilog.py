"""Where the CLI's warnings and errors go: stderr, and the --log file (text or JSON), as runc.

Shared by the typer CLI and the lean hot paths (standard library only, logging on demand:
a lean command calls `defer_logging`, and `logger` sets it up at the first warning).
"""

from __future__ import annotations

import json
import sys
import time

PROGRAM = "hanabi-runtime"
_deferred: tuple | None = None  # setup_logging's arguments until the first `logger` call


def defer_logging(log, log_format: str, debug: bool) -> None:
    """`setup_logging`, done by the first `logger` call (the logging module costs a lean
    command more than its work when nothing is logged)."""
    global _deferred
    _deferred = (log, log_format, debug)


def logger(name: str):
    """The logger `name` (a `logging.Logger`), logging set up first if it was deferred."""
    global _deferred
    import logging

    if _deferred is not None:
        args, _deferred = _deferred, None
        setup_logging(*args)
    return logging.getLogger(name)


def setup_logging(log, log_format: str, debug: bool) -> None:
    """Warnings go to the --log file only: during `create` our stderr is the container's."""
    import logging

    root = logging.getLogger("hanabi")  # with a handler here, Python's last resort stays silent
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    if log is not None:
        handler: logging.Handler = logging.FileHandler(log)
        if log_format == "json":
            from hanabi_common.logs import JsonFormatter
            handler.setFormatter(JsonFormatter())
    elif debug:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)


def report_error(exc, log, log_format: str | None) -> None:
    """Say a HanabiError on stderr, and in the --log file when there is one."""
    message = exc.message
    sys.stderr.write(f"{PROGRAM}: {exc.code.value.lower()}: {message}\n")
    sys.stderr.flush()
    if log:
        try:
            with open(log, "a") as handle:
                if log_format == "json":
                    handle.write(json.dumps({"level": "error", "msg": message,
                                             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
                else:
                    handle.write(f"level=error msg={message!r}\n")
        except OSError:
            pass
