"""Run `hanabi-runtime` as the lean entry point or as the full typer CLI, and see what it imported."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

# Never on a hot path (issue 14): the heavy libraries, and the modules that import them.
HEAVY = ("pydantic", "pydantic_core", "typer", "click", "jsonschema", "zmq",
         "hanabi_common.config", "hanabi_common.state", "hanabi_common.rpc.client",
         "hanabi_common.rpc.envelope", "hanabi_common.models", "hanabi_runtime.cli",
         "hanabi_runtime.lifecycle", "hanabi_runtime.state")

_PROBE = """
import atexit, json, sys
at_start = set(sys.modules)  # the interpreter's own, and what site's .pth files import
entry, target = sys.argv.pop(1), sys.argv.pop(1)
def _dump():
    with open(target, "w") as handle:
        json.dump(sorted(set(sys.modules) - at_start), handle)
atexit.register(_dump)
sys.argv[0] = "hanabi-runtime"
if entry == "lean":
    from hanabi_runtime.lean import main
else:
    from hanabi_runtime.cli import main
main()
"""


def run_cli(args: list[str], *, full: bool = False, timeout: float = 60) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the CLI with `args` in a fresh interpreter; the result and the modules it imported
    (not those the interpreter had before it: an editable install's finder imports pathlib)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as modules, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        done = subprocess.run([sys.executable, "-c", _PROBE, "full" if full else "lean", modules.name, *args],
                              stdout=out, stderr=err, stdin=subprocess.DEVNULL, timeout=timeout)
        out.seek(0)
        err.seek(0)
        done.stdout, done.stderr = out.read(), err.read()
        text = modules.read()
    return done, set(json.loads(text)) if text else set()


def heavy_imports(modules: set[str]) -> list[str]:
    """The modules of HEAVY (or under them) that were imported."""
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))
