"""Each daemon's RPC contract is one table (hanabi_<daemon>.contract) and both sides follow it:
every method in the table has a server handler and a typed-client method that calls it, no
client calls a method outside its table, the lean runtime's calls agree with it, and the
server serves a table as declared (reply model checked, the caller's deadline visible)."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import threading
import time
import typing
from pathlib import Path

import pytest

from hanabi_common.errors import Internal
from hanabi_common.models.base import Done, NoArgs, Reply, Request, SandboxRef
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.context import current_call
from hanabi_common.rpc.contract import Contract, ContractClient, Rpc
from hanabi_common.rpc.server import RpcServer

from hanabi_agentd.client import AgentdClient
from hanabi_agentd.contract import AGENTD
from hanabi_agentd.service import AgentService
from hanabi_blockd.client import BlockdClient
from hanabi_blockd.contract import BLOCKD
from hanabi_blockd.service import BlockService
from hanabi_netd.client import NetdClient
from hanabi_netd.contract import NETD
from hanabi_netd.service import NetworkService
from hanabi_vmmd.client import VmmdClient
from hanabi_vmmd.contract import VMMD
from hanabi_vmmd.service import VmService

ROOT = Path(__file__).resolve().parents[2]
SIDES = [(VMMD, VmService, VmmdClient), (NETD, NetworkService, NetdClient),
         (BLOCKD, BlockService, BlockdClient), (AGENTD, AgentService, AgentdClient)]
IDS = [t.daemon for t, _, _ in SIDES]


def _part_type(service: type, part: str) -> type | None:
    """The class of a part the service makes in __init__ (`self.devices = Devices(self)`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(service.__init__)))
    for node in ast.walk(tree):
        for target in getattr(node, "targets", []):
            if (isinstance(target, ast.Attribute) and target.attr == part and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name)):
                return inspect.getmodule(service).__dict__.get(node.value.func.id)
    return None


@pytest.mark.parametrize("table,service,client", SIDES, ids=IDS)
def test_every_method_has_a_handler_taking_its_request(table, service, client):
    names = [rpc.name for rpc in table.methods()]
    assert names and len(names) == len(set(names)) and all(n.split(".")[0] for n in names)
    for rpc in table.methods():
        assert issubclass(rpc.request, Request) and issubclass(rpc.reply, Reply), rpc.name
        handler = service
        for part in rpc.handler.split("."):  # a part the service holds: its declared type's method
            owner = handler
            handler = getattr(owner, part, None)
            if handler is None and isinstance(owner, type):
                handler = _part_type(owner, part)
        assert callable(handler), f"{service.__name__} has no handler {rpc.handler} for {rpc.name}"
        hints = typing.get_type_hints(handler)
        params = [p for p in inspect.signature(handler).parameters if p != "self"]
        assert len(params) >= 1, f"{rpc.handler} takes no request"
        took = hints.get(params[0])
        accepted = set(typing.get_args(took)) or {took}
        assert rpc.request in accepted or object in accepted or any(
            isinstance(t, type) and issubclass(rpc.request, t) for t in accepted if t is not type(None)), (
            f"{service.__name__}.{rpc.handler} takes {took}, the table says {rpc.request.__name__}")
        returns = hints.get("return")
        if returns is not None and returns is not dict:
            assert returns is rpc.reply, f"{rpc.handler} returns {returns}, the table says {rpc.reply.__name__}"
        elif returns is dict:
            assert rpc.reply is Done, f"{rpc.handler} returns a bare dict, the table says {rpc.reply.__name__}"


@pytest.mark.parametrize("table,service,client", SIDES, ids=IDS)
def test_every_method_has_a_client_call_and_the_client_calls_nothing_else(table, service, client):
    assert issubclass(client, ContractClient) and client.contract is table
    for rpc in table.methods():
        method = getattr(client, rpc.client, None)
        assert callable(method), f"{client.__name__} has no method {rpc.client} for {rpc.name}"
        assert f"{table.__name__}.{rpc.attr}," in inspect.getsource(method), (
            f"{client.__name__}.{rpc.client} does not call {rpc.name}")
    tree = ast.parse(inspect.getsource(inspect.getmodule(client)))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "call" and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "rpc":
                pytest.fail(f"{client.__name__} calls self.rpc.call directly (line {node.lineno}): use the table")
            if node.func.attr == "call" and node.args and isinstance(node.args[0], ast.Attribute):
                ref = node.args[0]
                assert isinstance(ref.value, ast.Name) and ref.value.id == table.__name__, ast.unparse(ref)
                used.add(ref.attr)
    assert used == {rpc.attr for rpc in table.methods()}, "the client calls methods outside its table"


def test_the_lean_runtime_calls_only_declared_methods_as_declared():
    """hanabi_runtime.lean (no pydantic) names methods as strings: each one is in a table,
    with the table's idempotency."""
    tables = {rpc.name: rpc for table, _, _ in SIDES for rpc in table.methods()}
    seen = 0
    for path in (ROOT / "services/runtime-cli/hanabi_runtime/lean").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"):
                continue
            if not (node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                continue
            name = node.args[0].value
            if not re.fullmatch(r"[a-z]+\.[a-z_]+", name):
                continue
            seen += 1
            flag = next((k.value for k in node.keywords if k.arg == "idempotent"), ast.Constant(False))
            assert name in tables, f"{path.name}: {name} is in no daemon's table"
            assert isinstance(flag, ast.Constant) and flag.value == tables[name].idempotent, (
                f"{path.name}:{node.lineno}: {name} idempotent={ast.unparse(flag)}, the table says "
                f"{tables[name].idempotent}")
    # vm.pause/vm.resume go through a helper that passes the name in a variable
    assert seen >= 4


def test_the_runtimes_teardown_steps_are_declared_idempotent_methods():
    """delete's release RPCs (hanabi_runtime.teardown, shared with the lean CLI) are retried:
    each is in its daemon's table, idempotent."""
    from hanabi_runtime.teardown import STEPS

    tables = {table.daemon: table for table, _, _ in SIDES}
    for daemon, method, _ in STEPS:
        assert tables[daemon].by_name(method).idempotent, method


# --- the table drives a real server and client -------------------------------------------
class Item(Reply):
    name: str


class Named(Request):
    name: str


class Sample(Contract):
    daemon = "sampled"
    get = Rpc("item.get", Named, Item, idempotent=True)
    touch = Rpc("item.touch", SandboxRef, Done)
    wrong = Rpc("item.wrong", NoArgs, Item)
    left = Rpc("item.left", NoArgs, Done, handler="time_left")


class SampleService:
    def __init__(self) -> None:
        self.touched: list[str] = []
        self.deadline_seen: list[float] = []

    def get(self, request: Named) -> Item:
        return Item(name=request.name.upper())

    def touch(self, request: SandboxRef) -> dict:
        self.touched.append(request.sandbox_id)
        return {}

    def wrong(self, _: NoArgs) -> dict:
        return {"nom": "not an Item"}

    def time_left(self, _: NoArgs) -> dict:
        call = current_call()
        assert call is not None and call.header.method == "item.left"
        self.deadline_seen.append(call.remaining)
        return {}


class SampleClient(ContractClient):
    contract = Sample

    def __init__(self, endpoint: str, timeout: float = 5) -> None:
        self.rpc = RpcClient("sampled", endpoint, timeout=timeout)


@pytest.fixture
def sample(tmp_path):
    endpoint = f"ipc://{tmp_path}/s.sock"
    srv = RpcServer("sampled", endpoint, workers=2)
    service = SampleService()
    Sample.register(srv, service)
    ready = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"ready": ready.set}, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield SampleClient(endpoint), service, srv
    srv.stop()
    thread.join(10)


def test_a_table_registers_its_handlers_and_types_the_replies(sample):
    client, service, srv = sample
    assert client.call(Sample.get, Named(name="x")) == Item(name="X")
    assert client.call(Sample.touch, SandboxRef(sandbox_id="sb1")) == Done() and service.touched == ["sb1"]
    assert srv._methods["item.get"].idempotent and not srv._methods["item.touch"].idempotent
    assert srv._methods["item.get"].reply is Item


def test_a_reply_that_breaks_the_contract_is_an_internal_error(sample):
    client, _, _ = sample
    with pytest.raises(Internal, match="ValidationError"):
        client.call(Sample.wrong, NoArgs())


def test_the_handler_sees_the_callers_deadline(sample):
    client, service, _ = sample
    started = time.monotonic()
    client.call(Sample.left, NoArgs(), timeout=3.0)
    assert service.deadline_seen and 0 < service.deadline_seen[0] <= 3.0 + 0.05
    assert time.monotonic() - started < 3.0
