"""Every message of the host <-> guest protocol and its fields, as data (``MESSAGES``).

Both ends validate what they receive with ``check_message`` (the agent: each request and
event from the host; agentd: each message from the untrusted guest) and, on the host, each
request's result with ``check_result``. docs/agent-protocol.md's message tables are made
from this table (``hanabi_wire.doc``; a test keeps them equal).

To add a field to a message: add one ``F(...)`` to its tuple below (``default=`` makes it
optional, so older hosts still pass; ``fields=`` declares an object's sub-fields, or leave
it free-form and check it where it is used), regenerate the doc (``python -m
hanabi_wire.doc --write docs/agent-protocol.md``) and read it in the handler
(``msg["name"]``: always present once checked). agentd forwards ``create_container`` and
``configure_network`` from its RPC models (hanabi_common.models.agentd): a field there that
is missing here fails at once (``request``) instead of being dropped by the agent.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

from . import constants as C
from .constants import (ERROR_CODES, HOSTNAME_REGEX, ID_REGEX, INIT_EXEC_ID, LINK_NAME_REGEX, MAC_REGEX,
                        MAX_DATA_CHUNK, MAX_MTU, MAX_PID, MAX_SIGNAL, MAX_TEXT, MAX_TTY_DIM, MIN_MTU,
                        PROTOCOL_VERSION, SERIAL_REGEX, SHARE_ROOTFS_REGEX, STREAM_STDERR, STREAM_STDOUT,
                        UNVERSIONED)
from .schema import B64, BOOL, BYTES, FLOAT, INT, LIST, OBJECT, STR, F, WireError, check

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HOST, GUEST = "host", "guest"
MAX_DNS = 4096
LOOPBACK_V4 = r"^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$"


class Message:
    """One message type: who sends it, whether it is a request (``id``, one reply), its
    fields, its result's fields (requests), whether it travels in data frames."""

    __slots__ = ("type", "sender", "request", "fields", "result", "doc", "data")

    def __init__(self, type: str, sender: str, fields: tuple[F, ...], doc: str, *,
                 request: bool = False, result: tuple[F, ...] | None = None, data: bool = False) -> None:
        self.type, self.sender, self.request, self.fields = type, sender, request, fields
        self.result, self.doc, self.data = result, doc, data


def _id(name: str, doc: str, **kw: Any) -> F:
    return F(name, STR, doc, pattern=ID_REGEX, **kw)


CID = _id("container_id", "the container")
EXEC = _id("exec_id", f"the process (`{INIT_EXEC_ID}`: the container's first)", default=INIT_EXEC_ID)
DISK = (F("serial", STR, "virtio-blk serial of the disk", pattern=SERIAL_REGEX),
        F("fstype", STR, "its filesystem", default="ext4", choices=("ext4",)),
        F("readonly", BOOL, "mount it read-only", default=False, null=True))
ROOTFS = (F("serial", STR, "virtio-blk serial of the root disk (or null: `share`)", default=None,
             pattern=SERIAL_REGEX),
          F("fstype", STR, "its filesystem: ext4 (a disk) or 9p (a share directory)", default="ext4",
            choices=("ext4", "9p")),
          F("readonly", BOOL, "mount it read-only", default=False, null=True),
          F("share", STR, "the root's directory in the VM's file share, `<dir>/rootfs` (or null: `serial`)",
            default=None, pattern=SHARE_ROOTFS_REGEX))
JOIN = (F("ipc", STR, "the container whose init's IPC namespace it joins", default=None, pattern=ID_REGEX),
        F("uts", STR, "the container whose init's UTS namespace (and hostname) it joins", default=None,
          pattern=ID_REGEX))
# One counter of the agent's output and exit events; a replay after a reconnect repeats it
# (docs/agent-protocol.md, "Replay"), and the host drops what it already had.
SEQ = F("seq", INT, "the agent's event counter (see Replay)", default=None, lo=1, hi=(1 << 63) - 1)
PID = (F("pid", INT, "guest pid (in the guest's PID namespace)", lo=1, hi=MAX_PID),)
TTY_DIM: dict[str, Any] = {"lo": 1, "hi": MAX_TTY_DIM}
INTERFACE = (F("name", STR, "link name to give the NIC", pattern=LINK_NAME_REGEX),
             F("mac", STR, "MAC the NIC is found by", pattern=MAC_REGEX),
             F("mtu", INT, "MTU", default=1500, lo=MIN_MTU, hi=MAX_MTU),
             F("addresses", LIST, "addresses with prefix (CIDR)", default=[], max_len=32,
               items=F("address", STR, max_len=64)))
ROUTE = (F("dest", STR, '"default" or a CIDR', max_len=64),
         F("gateway", STR, "next hop", default=None, max_len=64),
         F("dev", STR, "one of the interfaces", default=None, max_len=15),
         F("family", INT, "4 or 6", default=4, choices=(4, 6)))
PS_ENTRY = (F("pid", INT, "guest pid", lo=1, hi=MAX_PID),
            F("exec_id", STR, 'its exec id, "" for one the agent did not start',
              pattern=f"^$|{ID_REGEX}"),
            F("args", LIST, "its command line", default=[], max_len=1024, items=F("arg", STR, max_len=MAX_TEXT)))

_MESSAGES = (
    # --- host -> guest requests
    Message(C.T_PING, HOST, (
        F("protocol", INT, f"the host's protocol version ({PROTOCOL_VERSION}; absent: {UNVERSIONED})",
          default=UNVERSIONED, lo=1, hi=65535),
    ), "are you there; the first request after SYNC (version negotiation)", request=True, result=(
        F("agent_version", STR, "the agent's version", max_len=64),
        F("kernel", STR, "`uname -r`", max_len=256),
        F("uptime_s", FLOAT, "seconds since boot", default=0.0, lo=0),
        F("protocol", INT, f"the agent's protocol version (absent: {UNVERSIONED})", default=UNVERSIONED,
          lo=1, hi=65535),
    )),
    Message(C.T_CREATE_CONTAINER, HOST, (
        CID,
        F("rootfs", OBJECT, "the root: a disk (`serial`) or a share directory (`share`), exactly one",
          fields=ROOTFS),
        F("process", OBJECT, "OCI process object of its init (checked by the agent)"),
        F("hostname", STR, "the VM's hostname", default=None, pattern=HOSTNAME_REGEX),
        F("mounts", LIST, "bind (`source` m0, m1.. in `share`, else on the mounts disk) and tmpfs mounts",
          default=[], max_len=256, items=F("mount", OBJECT)),
        F("mounts_disk", OBJECT, "the disk holding copies of the bind sources", default=None, fields=DISK),
        F("share", STR, "the container's directory in the VM's file share (rootfs, m0..mN)", default=None,
          pattern=ID_REGEX),
        F("linux", OBJECT, "the OCI `linux` subset the guest applies, plus `domainname` (see Linux settings; "
          "checked by the agent)", default=None),
        F("join_namespaces", OBJECT, "namespaces its init joins instead of making them: those of another "
          "container of this VM that runs (a Kubernetes pod's sandbox); `linux.namespaces` does not list them",
          default=None, fields=JOIN),
    ), "mount its disk and prepare the container; the process is not started", request=True, result=()),
    Message(C.T_START, HOST, (CID,), "start the container's init process", request=True, result=PID),
    Message(C.T_EXEC, HOST, (
        _id("exec_id", "the new process's id (not `init`)"),
        CID,
        F("process", OBJECT, "OCI process object"),
    ), "start one more process in the container", request=True, result=PID),
    Message(C.T_SIGNAL, HOST, (
        CID, EXEC,
        F("signal", INT, "signal number", lo=1, hi=MAX_SIGNAL),
        F("all", BOOL, "every process of the container", default=False, null=True),
    ), "send a signal", request=True, result=()),
    Message(C.T_CLOSE_STDIN, HOST, (CID, EXEC), "close the process's stdin", request=True, result=()),
    Message(C.T_RESIZE, HOST, (
        CID, EXEC,
        F("height", INT, "rows", **TTY_DIM),
        F("width", INT, "columns", **TTY_DIM),
    ), "set the window size of the process's terminal", request=True, result=()),
    Message(C.T_PS, HOST, (CID,), "list the container's processes", request=True, result=(
        F("processes", LIST, "one object per process", max_len=65536, items=F("process", OBJECT, fields=PS_ENTRY)),
    )),
    Message(C.T_DESTROY_CONTAINER, HOST, (CID,), "kill its processes, unmount, forget it", request=True,
            result=()),
    Message(C.T_SHUTDOWN, HOST, (), "power the guest off (after the reply)", request=True, result=()),
    Message(C.T_SYNC, HOST, (), "flush every filesystem of the guest (sync(2)): what its processes "
            "wrote reaches the host's disks before the VM is killed", request=True, result=()),
    Message(C.T_CONFIGURE_NETWORK, HOST, (
        F("interfaces", LIST, "the NICs", default=[], max_len=8, items=F("interface", OBJECT, fields=INTERFACE)),
        F("routes", LIST, "routes to add", default=[], max_len=64, items=F("route", OBJECT, fields=ROUTE)),
        F("dns_relay", LIST, "loopback IPv4 addresses to serve DNS on (relayed to the host)", default=[],
          max_len=4, items=F("address", STR, max_len=15)),
    ), "bring up loopback, the NICs, routes and DNS relay listeners", request=True, result=(
        F("interfaces", LIST, "names of the configured NICs", items=F("name", STR, max_len=15)),
        F("dns_relay", LIST, '"addr:port" of each relay listener', items=F("listener", STR, max_len=64)),
    )),
    Message(C.T_RESTORED, HOST, (
        F("seed", B64, "fresh random bytes: mixed into the kernel's pool, which then reseeds",
          min_len=C.RESTORE_SEED_BYTES, max_len=4096),
        F("time_ns", INT, "the host's CLOCK_REALTIME (ns since the epoch) to set", lo=0, hi=1 << 63),
        F("hostname", STR, "the VM's own hostname", pattern=HOSTNAME_REGEX),
    ), "the VM is a clone of a template, just resumed: reseed the RNG, set the clock and the "
       "hostname (the first request to a clone, before any container)", request=True, result=()),
    # --- host -> guest events
    Message(C.T_STDIN, HOST, (
        CID, EXEC,
        F("data", BYTES, "bytes for the process's stdin", max_len=MAX_DATA_CHUNK),
        F("offset", INT, "where `data` starts in the process's stdin (bytes sent before it); what the "
          "agent took already is dropped (a resend after the host reconnected)", default=None, lo=0, hi=1 << 62),
    ), "input for a process (a data frame)", data=True),
    Message(C.T_DNS_ANSWER, HOST, (
        F("qid", INT, "the `dns_query` answered", lo=0, hi=1 << 31),
        F("data", B64, "the DNS answer", max_len=MAX_DATA_CHUNK),
    ), "the answer to a `dns_query`"),
    # --- guest -> host
    Message(C.T_REPLY, GUEST, (
        F("id", INT, "the request's id", lo=1, hi=1 << 53),
        F("ok", BOOL, "success"),
        F("result", OBJECT, "the request's result (ok)", default=None),
        F("error", OBJECT, "why it failed (not ok)", default=None, fields=(
            F("code", STR, "error code", choices=ERROR_CODES),
            F("message", STR, "what happened", max_len=MAX_TEXT))),
    ), "the one answer to a request"),
    Message(C.T_READY, GUEST, (
        F("agent_version", STR, "the agent's version", max_len=64),
        F("kernel", STR, "`uname -r`", max_len=256),
    ), "sent once when the agent starts (informational)"),
    Message(C.T_OUTPUT, GUEST, (
        CID, _id("exec_id", "the process"),
        F("stream", STR, f"{STREAM_STDOUT} or {STREAM_STDERR} (a terminal: {STREAM_STDOUT})",
          choices=(STREAM_STDOUT, STREAM_STDERR)),
        F("data", BYTES, "the bytes read", max_len=MAX_DATA_CHUNK),
        SEQ,
    ), "output of a process (a data frame)", data=True),
    Message(C.T_EXIT, GUEST, (
        CID, _id("exec_id", "the process"),
        F("exit_code", INT, "its exit code (null when killed)", default=None, lo=0, hi=255),
        F("signal", INT, "the signal that killed it (or null)", default=None, lo=1, hi=MAX_SIGNAL),
        SEQ,
    ), "a process ended, after all its output"),
    Message(C.T_OOM, GUEST, (
        CID,
        F("oom_kills", INT, "the `oom_kill` count of the container's cgroup (memory.events): grows by "
          "one per process the guest's OOM killer ended", lo=1, hi=(1 << 63) - 1),
        SEQ,
    ), "the guest's OOM killer ended a process of the container (sent before that process's `exit`)"),
    Message(C.T_DNS_QUERY, GUEST, (
        F("qid", INT, "query id for the answer", lo=0, hi=1 << 31),
        F("server", STR, "the relay address it was sent to", pattern=LOOPBACK_V4),
        F("data", B64, "one DNS query", min_len=12, max_len=MAX_DNS),
        F("tcp", BOOL, "it came over TCP", default=False),
    ), "a DNS query a container sent to a relay address"),
    Message(C.T_PROTOCOL_ERROR, GUEST, (
        F("message", STR, "what was wrong", default="", max_len=MAX_TEXT),
    ), "the agent read a corrupt frame or a request without an integer id"),
)
MESSAGES: dict[str, Message] = {m.type: m for m in _MESSAGES}
REQUESTS = frozenset(m.type for m in _MESSAGES if m.request)
HOST_EVENTS = frozenset(m.type for m in _MESSAGES if m.sender == HOST and not m.request)
GUEST_MESSAGES = frozenset(m.type for m in _MESSAGES if m.sender == GUEST)


def check_message(msg: Any, sender: str) -> dict[str, Any]:
    """The fields of one received message from ``sender`` (its ``type`` included, its
    request ``id`` left to the caller), checked; WireError if it does not fit."""
    if not isinstance(msg, dict):
        raise WireError("a message must be an object")
    mtype = msg.get("type")
    spec = MESSAGES.get(mtype) if isinstance(mtype, str) else None
    if spec is None or spec.sender != sender:
        shown = mtype[:32] if isinstance(mtype, str) else type(mtype).__name__
        raise WireError(f"unknown message type {shown!r}")
    fields = check(spec.fields, msg)
    if mtype == C.T_REPLY:
        if fields["ok"] and fields["error"] is not None:
            raise WireError("a successful reply carries an error")
        if not fields["ok"] and fields["error"] is None:
            raise WireError("a failed reply without an error")
    fields["type"] = mtype
    return fields


def check_result(request: str, result: Any) -> dict[str, Any]:
    """The result of a reply to ``request``, checked against its definition."""
    spec = MESSAGES[request]
    assert spec.result is not None, request
    if result is None:
        result = {}
    if not isinstance(result, dict):
        raise WireError(f"the result of {request} must be an object")
    return check(spec.result, result)


def request(mtype: str, **fields: Any) -> dict[str, Any]:
    """A request (or host event) to send: ``fields`` as given, with ``type``, checked as
    the agent will check them, so a host-side mistake fails here (WireError), and a field
    missing from the definition too (the agent would drop it)."""
    spec = MESSAGES[mtype]
    assert spec.sender == HOST, mtype
    unknown = sorted(set(fields) - {f.name for f in spec.fields})
    if unknown:
        raise WireError(f"{mtype} has no field {', '.join(unknown)} (hanabi_wire.messages)")
    check(spec.fields, fields)
    return {**fields, "type": mtype}


def ping_fields() -> dict[str, Any]:
    """The fields of the host's first request (version negotiation)."""
    return {"protocol": PROTOCOL_VERSION}


def version_mismatch(host: int, agent: int) -> str | None:
    """Why a host speaking ``host`` and an agent speaking ``agent`` cannot talk (None: they can)."""
    if host == agent:
        return None
    return (f"protocol version mismatch: the host speaks version {host}, the guest agent "
            f"version {agent} (rebuild the guest image or update the host)")
