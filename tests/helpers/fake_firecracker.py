"""A stand-in `firecracker` executable for testing vmmd's process management (not a VMM:
it boots nothing). `install(dir)` writes it as an executable script; its behaviour comes
from the environment it inherits:

- FAKE_FC_VERSION: what `--version` prints (default "Firecracker v1.16.1");
- FAKE_FC_MODE: `serve` (default: answer the API on --api-sock), `exit` (print to stderr
  and exit 1 at once), `nosock` (print to stderr and never create the socket),
  `die_on_start` (serve, but exit 3 when InstanceStart arrives), `ignore_cad` (serve, and
  ignore SendCtrlAltDel);
- FAKE_FC_RECORD: a file where each request is appended as one JSON line
  ({"method", "path", "body"}); the argv goes there first as {"argv": [...]};
- FAKE_FC_FAIL: "METHOD PATH" answered 400 with a fault_message.

In `serve` mode, GET / reports the state ("Not started", then "Running" after
InstanceStart, "Paused"/"Running" after PATCH /vm), and SendCtrlAltDel makes it exit 0
after the reply, as a guest that powers off would.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

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


def note(entry):
    if record:
        with open(record, "a") as f:
            f.write(json.dumps(entry) + "\n")


note({"argv": sys.argv, "cwd": os.getcwd(), "netns": os.readlink("/proc/self/ns/net")})
sock = argv[argv.index("--api-sock") + 1]
print("fake firecracker starting", flush=True)
if mode == "exit":
    print("Error: fake firecracker cannot start: bad configuration", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "nosock":
    print("fake firecracker: stuck before the API socket", file=sys.stderr, flush=True)
    while True:
        time.sleep(60)

state = {"state": "Not started"}


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
        note({"method": self.command, "path": self.path, "body": body})
        if fail and fail == f"{self.command} {self.path}":
            return self._reply(400, {"fault_message": f"fake refuses {self.command} {self.path}"})
        if self.command == "GET" and self.path == "/":
            return self._reply(200, {"app_name": "Firecracker", "id": "fake", "state": state["state"],
                                     "vmm_version": "1.16.1"})
        if self.path == "/actions":
            action = (body or {}).get("action_type")
            if action == "InstanceStart":
                if mode == "die_on_start":
                    print("fake firecracker: guest kernel panicked", file=sys.stderr, flush=True)
                    os._exit(3)
                state["state"] = "Running"
            if action == "SendCtrlAltDel" and mode != "ignore_cad":
                threading.Timer(0.05, lambda: os._exit(0)).start()
                return self._reply(204)
        if self.command == "PATCH" and self.path == "/vm":
            state["state"] = "Paused" if body["state"] == "Paused" else "Running"
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
    path.write_text(f"#!{sys.executable}\n" + SCRIPT)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


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
os.execv(opts["--exec-file"], [opts["--exec-file"], *fc_args])
'''


def install_jailer(directory: Path, name: str = "jailer") -> Path:
    """A stand-in `jailer`: makes <base>/<exec name>/<id>/root and runs the exec file in it
    (no chroot, no uid switch: it checks our argv and file staging, not isolation)."""
    path = Path(directory) / name
    path.write_text(f"#!{sys.executable}\n" + JAILER)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
