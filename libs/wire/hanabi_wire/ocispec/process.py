"""The OCI ``process`` object of a container's init or exec, validated (pure, no I/O).

``check_process(p)`` checks args, env, cwd, terminal and consoleSize, user (uid, gid,
additionalGids, umask), rlimits, oomScoreAdj, noNewPrivileges, capabilities and the LSM
labels (``caps``); ValueError naming the field. The agent runs it before every spawn, the
runtime on config.json before anything is provisioned; the agent's process.py starts it.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

from ..constants import MAX_TTY_DIM
from ..schema import is_int
from .caps import check_labels, parse
from .linux import ID_LIMIT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_ARGS = 4096
MAX_STRING = 128 * 1024


def _str_list(v: Any, what: str, *, nonempty: bool = False) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{what} must be a list of strings")
    if nonempty and not v:
        raise ValueError(f"{what} must not be empty")
    if len(v) > MAX_ARGS or any(len(x) > MAX_STRING or "\0" in x for x in v):
        raise ValueError(f"{what} has too many or too long entries, or NUL bytes")
    return v


def check_process(p: Any) -> None:
    """Validate an OCI process object; raise ValueError (→ INVALID_ARGUMENT)."""
    if not isinstance(p, dict):
        raise ValueError("process must be an object")
    _str_list(p.get("args"), "process.args", nonempty=True)
    if "env" in p and p["env"] is not None:
        for e in _str_list(p["env"], "process.env"):
            if "=" not in e:
                raise ValueError(f"process.env entry {e[:64]!r} has no '='")
    cwd = p.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
        raise ValueError("process.cwd must be an absolute path")
    if p.get("terminal") not in (None, False, True):
        raise ValueError("process.terminal must be a boolean")
    size = p.get("consoleSize")
    if size is not None:
        if not isinstance(size, dict) or not all(
                is_int(size.get(k, 0)) and 0 <= size.get(k, 0) <= MAX_TTY_DIM for k in ("height", "width")):
            raise ValueError(f"process.consoleSize must be {{height, width}} in 0..{MAX_TTY_DIM}")
    user = p.get("user", {})
    if not isinstance(user, dict):
        raise ValueError("process.user must be an object")
    for key in ("uid", "gid"):
        if key in user and not (is_int(user[key]) and 0 <= user[key] < ID_LIMIT):
            raise ValueError(f"process.user.{key} must be a 32-bit id")
    gids = user.get("additionalGids") or []
    if not isinstance(gids, list) or not all(is_int(g) and 0 <= g < ID_LIMIT for g in gids):
        raise ValueError("process.user.additionalGids must be a list of ids")
    if "umask" in user and user["umask"] is not None and not (is_int(user["umask"]) and 0 <= user["umask"] <= 0o777):
        raise ValueError("process.user.umask must be 0..0777")
    rlimits = p.get("rlimits") or []
    if not isinstance(rlimits, list):
        raise ValueError("process.rlimits must be a list")
    for r in rlimits:
        if not (isinstance(r, dict) and isinstance(r.get("type"), str) and r["type"].startswith("RLIMIT_")
                and is_int(r.get("soft")) and is_int(r.get("hard"))):
            raise ValueError("process.rlimits entries need type RLIMIT_*, soft and hard")
    if "oomScoreAdj" in p and p["oomScoreAdj"] is not None:
        if not (is_int(p["oomScoreAdj"]) and -1000 <= p["oomScoreAdj"] <= 1000):
            raise ValueError("process.oomScoreAdj must be -1000..1000")
    if p.get("noNewPrivileges") not in (None, False, True):
        raise ValueError("process.noNewPrivileges must be a boolean")
    parse(p)
    check_labels(p)
