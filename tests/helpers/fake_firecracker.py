"""A stand-in `firecracker` executable for testing vmmd's process management and snapshots
(not a VMM: it boots nothing). `install(dir)` writes it as an executable script; its
behaviour comes from the environment it inherits:

- FAKE_FC_VERSION: what `--version` prints (default "Firecracker v1.16.1");
- FAKE_FC_MODE: `serve` (default: answer the API on --api-sock), `exit` (print to stderr
  and exit 1 at once), `nosock` (print to stderr and never create the socket),
  `die_on_start` (serve, but exit 3 when InstanceStart arrives), `ignore_cad` (serve, and
  ignore SendCtrlAltDel);
- FAKE_FC_RECORD: a file where each request is appended as one JSON line
  ({"method", "path", "body", "pid"}); the argv goes there first as {"argv": [...]}, a
  refusal after its request as {"refused", "fault_message"}, each request the guest agent
  answered as {"agent": type, "pid"};
- FAKE_FC_FAIL: "METHOD PATH" answered 400 with a fault_message;
- FAKE_FC_AGENT: `serve` (default: a stand-in guest agent answers on vsock port 1024 once
  the guest runs), `none` (nothing listens in the guest), `old` (an agent that refuses
  `restored`, as one built before templates).

It refuses what Firecracker v1.16.1 refuses, as the vendored spec states it: a method or path
the spec lacks, a body the spec's schema rejects (an unknown field included: Firecracker's
structs deny them), a "Pre-boot only." operation once the VM started (InstanceStart or a
snapshot load), a "Post-boot only." one (or PATCH /vm) before, `PUT /snapshot/load` after any resource other
than the logger and metrics, `PUT /snapshot/create` unless Paused, a drive or memory file that
does not exist, a vsock socket path already in use. GET / reports the state ("Not started",
"Running" after InstanceStart, "Paused"/"Running" after PATCH /vm or a load); SendCtrlAltDel
makes a running VM exit 0 after the reply (a guest that powers off), a paused one ignores it.

Snapshots: `PUT /snapshot/create` writes the state file as JSON (the machine config, the
drives' paths, the NICs, the vsock device: what a real snapshot records) and the memory file
(sparse, the VM's size); `PUT /snapshot/load` reads them back, reopens the recorded drives,
applies the vsock and network overrides (an interface the snapshot lacks is refused), and
leaves the VM Paused unless resume_vm. The guest side of the hybrid vsock is
tests/helpers/hybrid_vsock.py's relay, its agent tests/helpers/fake_agent.py's.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the fake imports the spec, the wire and these helpers
SCRIPT = r'''
import json, os, socketserver, sys, threading, time
from http.server import BaseHTTPRequestHandler

argv = sys.argv[1:]
if "--version" in argv:
    print(os.environ.get("FAKE_FC_VERSION", "Firecracker v1.16.1"))
    print()
    print("Supported snapshot data format versions: v5.0.0")
    sys.exit(0)
mode = os.environ.get("FAKE_FC_MODE", "serve")
record = os.environ.get("FAKE_FC_RECORD")
fail = os.environ.get("FAKE_FC_FAIL", "")
agent_mode = os.environ.get("FAKE_FC_AGENT", "serve")


def note(entry):
    if record:
        with open(record, "a") as f:
            f.write(json.dumps(entry) + "\n")


note({"argv": sys.argv, "cwd": os.getcwd(), "netns": os.readlink("/proc/self/ns/net"), "pid": os.getpid()})
sock = argv[argv.index("--api-sock") + 1]
print("fake firecracker starting", flush=True)
if mode == "exit":
    print("Error: fake firecracker cannot start: bad configuration", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "nosock":
    print("fake firecracker: stuck before the API socket", file=sys.stderr, flush=True)
    while True:
        time.sleep(60)

sys.path.insert(0, REPO)
import jsonschema  # noqa: E402
from hanabi_vmmd.firecracker.spec import load_spec  # noqa: E402
from hanabi_wire import PROTOCOL_VERSION, T_PING, T_RESTORED  # noqa: E402
from tests.helpers.fake_agent import FakeAgent, ListeningFakeAgent  # noqa: E402
from tests.helpers.hybrid_vsock import HybridVsockRelay  # noqa: E402
from tests.helpers.firecracker_spec import body_schema, spec_path_for  # noqa: E402

SPEC = load_spec()
SNAPSHOT_FORMAT = "fake-firecracker-snapshot/1"
AGENT_PORT = 1024
state = {"state": "Not started"}
config = {"drives": {}, "nics": {}, "vsock": None, "machine": None, "boot": None, "configured": set()}
lock = threading.Lock()
running = threading.Event()  # the guest's vCPUs run: its agent answers
relay = {}


class Refused(Exception):
    pass


def agent_behaviour(agent, msg):
    running.wait()
    note({"agent": msg.get("type"), "pid": os.getpid()})
    if msg.get("type") == T_PING:
        agent.reply(msg, {"protocol": PROTOCOL_VERSION})
    elif msg.get("type") == T_RESTORED and agent_mode != "old":
        agent.reply(msg, {})
    else:
        agent.fail(msg, "UNSUPPORTED", f"unknown request type {msg.get('type')!r}")


def guest_listens():
    # the guest's agent listens on vsock port 1024 once the guest has booted
    if agent_mode == "none" or "relay" not in relay:
        return
    inner = f"\0fake-fc-agent-{os.getpid()}"
    if "agent" not in relay:
        relay["agent"] = ListeningFakeAgent(inner, lambda s: FakeAgent(s, agent_behaviour))
    relay["relay"].ports[AGENT_PORT] = inner


def bind_vsock(path):
    path = os.environ.get("FAKE_FC_ROOT", "") + path
    if os.path.exists(path):
        raise Refused(f"Cannot create backend for vsock device: UnixBind(Os {{ code: 98, kind: AddrInUse }}) {path}")
    relay["relay"] = HybridVsockRelay(path, {})


def set_state(name):
    state["state"] = name
    (running.set if name == "Running" else running.clear)()


def need_file(path, what):
    # under the stand-in jailer (no chroot) Firecracker's paths are relative to the jail root
    path = os.environ.get("FAKE_FC_ROOT", "") + path
    if not os.path.isfile(path):
        raise Refused(f"{what}: No such file or directory (os error 2): {path}")


def operation(method, path):
    template = None
    try:
        template = spec_path_for(SPEC, path)
    except AssertionError:
        pass
    op = SPEC["paths"].get(template, {}).get(method.lower()) if template else None
    if op is None:
        raise Refused(f"Invalid request method and/or path: {method} {path}")
    return template, op


def check(method, path, body):
    template, op = operation(method, path)
    if any(p.get("in") == "body" for p in op.get("parameters", [])):
        try:
            jsonschema.Draft4Validator(body_schema(SPEC, method, template)).validate(body)
        except jsonschema.ValidationError as exc:
            raise Refused(f"An error occurred when deserializing the json body of a request: {exc.message}")
    started = state["state"] != "Not started"
    summary = op.get("summary", "")
    if "Pre-boot only." in summary and started:
        raise Refused("The requested operation is not supported after starting the microVM.")
    # PATCH /vm has no "Post-boot only." in its summary, but Firecracker's pre-boot controller
    # refuses pause and resume (OperationNotSupportedPreBoot), as it refuses every post-boot call
    if ("Post-boot only." in summary or (method, template) == ("PATCH", "/vm")) and not started:
        raise Refused("The requested operation is not supported before starting the microVM.")
    return template


def apply(method, path, template, body):
    if (method, template) == ("PUT", "/actions"):
        action = body["action_type"]
        if action == "InstanceStart":
            if state["state"] != "Not started":
                raise Refused("The requested operation is not supported after starting the microVM.")
            if config["boot"] is None:
                raise Refused("Cannot start microvm without kernel configuration.")
            if mode == "die_on_start":
                print("fake firecracker: guest kernel panicked", file=sys.stderr, flush=True)
                os._exit(3)
            set_state("Running")
            guest_listens()
        elif action == "SendCtrlAltDel":
            if state["state"] == "Not started":
                raise Refused("The requested operation is not supported before starting the microVM.")
            if state["state"] == "Running" and mode != "ignore_cad":
                threading.Timer(0.05, lambda: os._exit(0)).start()
        return
    if method == "PUT" and template not in ("/logger", "/metrics", "/snapshot/load", "/snapshot/create"):
        config["configured"].add(template)
    if (method, template) == ("PUT", "/boot-source"):
        need_file(body["kernel_image_path"], "kernel")
        config["boot"] = body
    elif (method, template) == ("PUT", "/machine-config"):
        config["machine"] = body
    elif (method, template) == ("PUT", "/drives/{drive_id}"):
        need_file(body["path_on_host"], f"drive {body['drive_id']}")
        config["drives"][body["drive_id"]] = body["path_on_host"]
    elif (method, template) == ("PATCH", "/drives/{drive_id}"):
        if body["drive_id"] not in config["drives"]:
            raise Refused(f"Invalid block device ID: {body['drive_id']}")
        if "path_on_host" in body:
            need_file(body["path_on_host"], f"drive {body['drive_id']}")
            config["drives"][body["drive_id"]] = body["path_on_host"]
    elif (method, template) == ("PUT", "/network-interfaces/{iface_id}"):
        config["nics"][body["iface_id"]] = body
    elif (method, template) == ("PUT", "/vsock"):
        bind_vsock(body["uds_path"])
        config["vsock"] = body
    elif (method, template) == ("PATCH", "/vm"):
        set_state("Paused" if body["state"] == "Paused" else "Running")
    elif (method, template) == ("PUT", "/snapshot/create"):
        if state["state"] != "Paused":
            raise Refused("Cannot create a snapshot: the microVM is not paused.")
        if body.get("snapshot_type", "Full") != "Full":
            raise Refused("Diff snapshots need dirty page tracking, not enabled.")
        with open(body["snapshot_path"], "w") as f:
            json.dump({"format": SNAPSHOT_FORMAT, "machine": config["machine"], "drives": config["drives"],
                       "nics": config["nics"], "vsock": config["vsock"]}, f)
        with open(body["mem_file_path"], "wb") as f:
            f.truncate((config["machine"] or {}).get("mem_size_mib", 128) << 20)
    elif (method, template) == ("PUT", "/snapshot/load"):
        if config["configured"]:
            raise Refused("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
        if ("mem_backend" in body) == ("mem_file_path" in body):
            raise Refused("Exactly one of mem_backend and mem_file_path must be given.")
        try:
            with open(body["snapshot_path"]) as f:
                snap = json.load(f)
            assert snap["format"] == SNAPSHOT_FORMAT
        except (OSError, ValueError, KeyError, AssertionError) as exc:
            raise Refused(f"Cannot deserialize the microVM state: {exc}")
        backend = body.get("mem_backend") or {"backend_type": "File", "backend_path": body["mem_file_path"]}
        if backend["backend_type"] != "File":
            raise Refused("only File memory backends here (no UFFD handler)")
        need_file(backend["backend_path"], "guest memory")
        want = (snap["machine"] or {}).get("mem_size_mib", 128) << 20
        if os.path.getsize(backend["backend_path"]) != want:
            raise Refused("Cannot restore the guest memory: the memory file's size is not the VM's")
        for drive_id, drive_path in snap["drives"].items():
            need_file(drive_path, f"Unable to restore block device {drive_id}")
        nics = dict(snap["nics"])
        for override in body.get("network_overrides") or []:
            if override["iface_id"] not in nics:
                raise Refused(f"Invalid network interface ID - not found: {override['iface_id']}")
            nics[override["iface_id"]] = {**nics[override["iface_id"]], "host_dev_name": override["host_dev_name"]}
        vsock = snap["vsock"]
        if vsock is not None:
            vsock = {**vsock, **(body.get("vsock_override") or {})}
            bind_vsock(vsock["uds_path"])
        elif body.get("vsock_override"):
            raise Refused("Cannot override the vsock device: the snapshot has none.")
        config.update(drives=dict(snap["drives"]), nics=nics, vsock=vsock, machine=snap["machine"])
        set_state("Running" if body.get("resume_vm") else "Paused")
        guest_listens()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()  # the client may hang up as soon as it has these (204)
        if data:
            self.wfile.write(data)

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        note({"method": self.command, "path": self.path, "body": body, "pid": os.getpid()})
        if fail and fail == f"{self.command} {self.path}":
            return self._reply(400, {"fault_message": f"fake refuses {self.command} {self.path}"})
        if self.command == "GET" and self.path == "/":
            return self._reply(200, {"app_name": "Firecracker", "id": "fake", "state": state["state"],
                                     "vmm_version": "1.16.1"})
        try:
            with lock:
                template = check(self.command, self.path, body)
                apply(self.command, self.path, template, body)
        except Refused as exc:
            note({"refused": f"{self.command} {self.path}", "fault_message": str(exc), "pid": os.getpid()})
            return self._reply(400, {"fault_message": str(exc)})
        return self._reply(204)

    do_GET = do_PUT = do_PATCH = _handle

    def log_message(self, *args):
        pass

    def address_string(self):
        return "unix"


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


server = Server(sock, Handler)
server.serve_forever()
'''


def install(directory: Path, name: str = "firecracker") -> Path:
    """Write the fake as an executable `name` in `directory`; return its path."""
    path = Path(directory) / name
    path.write_text(f"#!{sys.executable}\nREPO = {str(REPO)!r}\n" + SCRIPT)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_guest(directory: Path, initrd: bytes = b"i") -> Path:
    """A guest image directory for the stand-in (an ELF-looking vmlinux and an initrd: the
    stand-in boots nothing); return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    (directory / "initrd.img").write_bytes(initrd)
    return directory


def read_record(path: Path) -> list[dict]:
    """The entries the fake appended to FAKE_FC_RECORD ([] if none)."""
    import json

    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


JAILER = r'''
import json, os, sys
argv = sys.argv[1:]
split = argv.index("--")
opts = dict(zip(argv[:split:2], argv[1:split:2]))
fc_args = argv[split + 1:]
record = os.environ.get("FAKE_FC_RECORD")
if record:
    with open(record, "a") as f:
        f.write(json.dumps({"jailer_argv": sys.argv}) + "\n")
root = os.path.join(opts["--chroot-base-dir"], os.path.basename(opts["--exec-file"]), opts["--id"], "root")
os.makedirs(root, exist_ok=True)
# No chroot here: the stand-in firecracker gets its socket path inside the jail's root.
at = fc_args.index("--api-sock")
fc_args[at + 1] = root + fc_args[at + 1]
os.chdir(root)
os.environ["FAKE_FC_ROOT"] = root
os.execv(opts["--exec-file"], [opts["--exec-file"], *fc_args])
'''


def install_jailer(directory: Path, name: str = "jailer") -> Path:
    """A stand-in `jailer`: makes <base>/<exec name>/<id>/root and runs the exec file in it
    (no chroot, no uid switch: it checks our argv and file staging, not isolation)."""
    path = Path(directory) / name
    path.write_text(f"#!{sys.executable}\n" + JAILER)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
