"""hanabi_wire is the one definition of the host <-> guest protocol: the doc's tables are
its message table, both sides use its constants and validator instead of their own, and
the guest image carries it (stdlib only)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import sys

import pytest

import hanabi_wire as W
from hanabi_wire import SYNC, FrameDecoder, constants, doc, messages, encode_frame
from hanabi_wire.schema import WireError

ROOT = pathlib.Path(__file__).resolve().parents[2]
WIRE_DIR = ROOT / "libs/wire/hanabi_wire"
SIDES = [ROOT / "guest/hanabi_guest", ROOT / "services", ROOT / "libs/common/hanabi_common"]
# agentd's io socket (agentd <-> stand-in) is another protocol that reuses some type names.
OTHER_PROTOCOL = {"io_server.py", "iostream.py", "observe.py"}  # agentd's io socket; runc's `events` records


def _sources() -> list[pathlib.Path]:
    return sorted(p for side in SIDES for p in side.rglob("*.py"))


def _code_nodes(tree: ast.AST):
    """Every node but docstrings (a string expression statement is documentation)."""
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [n for n in ast.walk(tree) if id(n) not in docstrings]


# --- the document -------------------------------------------------------------------------
def test_the_doc_tables_are_generated_from_the_definitions():
    text = (ROOT / "docs/agent-protocol.md").read_text(encoding="utf-8")
    assert doc.splice(text) == text, "run: python -m hanabi_wire.doc --write docs/agent-protocol.md"
    # ...so every message and field is in the doc, and the doc names no other message or field.
    headings = re.findall(r"^#### `([a-z_]+)`", text, re.M)
    assert headings == list(messages.MESSAGES)
    rows = set(re.findall(r"^\| `([A-Za-z_.\[\]]+)` \|", text, re.M))

    def names(fields, prefix=""):
        for f in fields:
            yield prefix + f.name
            sub = f.fields if f.kind == "object" else (f.items.fields if f.items is not None else None)
            if sub:
                yield from names(sub, prefix + f.name + ("[]." if f.kind == "list" else "."))
    defined = {n for m in messages.MESSAGES.values() for fs in (m.fields, m.result or ()) for n in names(fs)}
    assert rows == defined


# --- the validator ------------------------------------------------------------------------
def test_requests_are_checked_strictly_with_defaults():
    sig = W.check_message({"type": "signal", "id": 3, "container_id": "c1", "signal": 9, "extra": 1}, W.HOST)
    assert sig == {"type": "signal", "container_id": "c1", "exec_id": "init", "signal": 9, "all": False}
    for bad in ({"signal": "9"}, {"signal": True}, {"signal": 0}, {"signal": 65}, {"container_id": "../x"},
                {"container_id": "c\n"}, {"exec_id": 5}, {"all": 1}):
        with pytest.raises(WireError) as info:
            W.check_message({"type": "signal", "container_id": "c1", "signal": 9, **bad}, W.HOST)
        assert next(iter(bad)) in str(info.value) and info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(WireError, match="unknown message type"):
        W.check_message({"type": "reply", "id": 1, "ok": True}, W.HOST)  # the host sends no replies
    with pytest.raises(WireError, match="unknown message type"):
        W.check_message({"type": "ping"}, W.GUEST)


def test_host_side_requests_name_a_field_the_definition_lacks():
    assert W.request(W.T_START, container_id="c1") == {"type": "start", "container_id": "c1"}
    with pytest.raises(WireError, match="has no field selinux"):
        W.request(W.T_CREATE_CONTAINER, container_id="c1", rootfs={"serial": "s"}, process={}, selinux={})
    with pytest.raises(WireError, match="height"):
        W.request(W.T_RESIZE, container_id="c1", height=0, width=80)


def test_version_mismatch_names_both_versions():
    assert W.version_mismatch(2, 2) is None
    why = W.version_mismatch(2, 1)
    assert "version 2" in why and "version 1" in why


# --- one definition -----------------------------------------------------------------------
def _modules() -> list[str]:
    names = []
    for p in _sources():
        rel = p.relative_to(ROOT)
        parts = rel.with_suffix("").parts
        pkg = next(i for i, part in enumerate(parts) if part.startswith("hanabi_"))
        if parts[-1] != "__init__" and parts[-1] != "__main__":
            names.append(".".join(parts[pkg:]))
    return names


def test_both_sides_use_the_wire_constants_not_copies():
    """Importing both sides: every module attribute named like a wire constant is the wire's
    own object (imported), and the few renamed ones are too."""
    shared = [n for n in constants.__all__ if not n.startswith("T_")] + [n for n in constants.__all__ if n.startswith("T_")]
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # pragma: no cover - a module needing something absent here
            pytest.fail(f"{name}: {exc}")
        for const in shared:
            if const in vars(module):
                assert vars(module)[const] is getattr(constants, const), f"{name}.{const} is a copy"
    from hanabi_common import ids
    from hanabi_guest import channel
    from hanabi_image import image
    from hanabi_vmmd import qemu_cmdline
    from hanabi_vmmd.firecracker import process as fc
    assert ids.ID_PATTERN is W.ID_RE and channel.VSOCK_PORT is W.VSOCK_PORT
    assert fc.AGENT_VSOCK_PORT is W.VSOCK_PORT and qemu_cmdline.BASE_KERNEL_CMDLINE is W.KERNEL_CMDLINE
    assert image.KERNEL_CMDLINE is W.KERNEL_CMDLINE
    assert W.cmdline_word(W.CMDLINE_CHANNEL, W.CHANNEL_VSOCK) in fc.kernel_args("")


def test_no_message_is_named_as_the_sync_marker():
    """FrameDecoder yields a SYNC marker as a message of type T_SYNC, which both ends take as
    a stream restart: a message of that type would never reach its handler (a `sync` request
    once went unanswered, and every delete of a running container waited 5 s for it)."""
    assert constants.T_SYNC not in messages.MESSAGES
    decoded = FrameDecoder().feed(SYNC + encode_frame({"type": constants.T_SYNC_FS}))
    assert [m["type"] for m in decoded] == [constants.T_SYNC, constants.T_SYNC_FS]


def test_no_source_spells_a_wire_constant_itself():
    """The sources of both sides never write a wire value as a literal: not the channel name,
    id or serial patterns, kernel command line or its words; no `NAME = literal` for a wire
    constant's name; no message built as a dict with a literal message type."""
    literal = {constants.SERIAL_PORT_NAME, constants.ID_REGEX, constants.SERIAL_REGEX, constants.HOSTNAME_REGEX,
               constants.KERNEL_CMDLINE, constants.CMDLINE_CHANNEL, constants.CMDLINE_POWEROFF}
    pieces = ("[A-Za-z0-9_.-]{0,127}", "rdinit=", f"{constants.CMDLINE_CHANNEL}=", f"{constants.CMDLINE_POWEROFF}=")
    types = set(messages.MESSAGES) | {constants.T_SYNC}
    names = set(constants.__all__)
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(ROOT)
        for node in _code_nodes(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in literal or any(p in node.value for p in pieces):
                    found.append(f"{where}:{node.lineno}: {node.value[:50]!r}")
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                found += [f"{where}:{node.lineno}: {t.id} = {node.value.value!r}" for t in node.targets
                          if isinstance(t, ast.Name) and t.id in names]
            elif isinstance(node, ast.Dict) and path.name not in OTHER_PROTOCOL:
                for key, value in zip(node.keys, node.values, strict=True):
                    if (isinstance(key, ast.Constant) and key.value == "type" and isinstance(value, ast.Constant)
                            and value.value in types):
                        found.append(f"{where}:{node.lineno}: {{'type': {value.value!r}}}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("request", "send_event", "_submit") and node.args
                  and isinstance(node.args[0], ast.Constant) and node.args[0].value in types):
                found.append(f"{where}:{node.lineno}: {node.func.attr}({node.args[0].value!r})")
    assert not found, "use hanabi_wire's constants:\n" + "\n".join(found)


def test_message_fields_are_defined_only_in_the_wire_table():
    """The host's guest-message classes define no fields (they wrap the wire validator); the
    agent has one handler per request type; agentd's RPC models that it forwards to the guest
    hold no field the wire definition lacks."""
    from hanabi_agentd import guest_messages as gm
    from hanabi_common.models.agentd import ConfigureNetwork, CreateContainer
    from hanabi_guest.handlers import Handlers
    for cls in (gm.GuestReply, gm.GuestReady, gm.GuestOutput, gm.GuestExit, gm.GuestDnsQuery,
                gm.GuestProtocolError, gm.PingResult, gm.PidResult, gm.PsResult):
        assert set(getattr(cls, "__annotations__", {})) <= {"TYPE", "REQUEST"}, cls
    assert set(gm.KNOWN_TYPES) == W.GUEST_MESSAGES
    table = Handlers.handlers(object.__new__(type("H", (Handlers,), {})))
    assert set(table) == W.REQUESTS
    for model, mtype, local in ((CreateContainer, W.T_CREATE_CONTAINER, {"sandbox_id"}),
                                (ConfigureNetwork, W.T_CONFIGURE_NETWORK, {"sandbox_id", "dns_netns"})):
        wire = {f.name for f in messages.MESSAGES[mtype].fields}
        assert set(model.model_fields) - local <= wire, f"{model.__name__} forwards fields {mtype} lacks"


# --- the guest image carries it -----------------------------------------------------------
def test_the_image_carries_every_wire_module_and_they_import_only_the_stdlib():
    from hanabi_image import image
    modules = sorted(p.name for p in WIRE_DIR.glob("*.py") if p.name != "doc.py")
    assert sorted(image.WIRE_FILES) == modules
    assert "hanabi_wire/doc.py" not in image.sources()
    for name in modules:
        tree = ast.parse((WIRE_DIR / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                tops = [] if node.level else [(node.module or "").split(".")[0]]
            else:
                continue
            for top in tops:
                assert top in sys.stdlib_module_names, f"{name} imports {top}"
