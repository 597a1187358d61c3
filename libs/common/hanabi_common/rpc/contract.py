"""A daemon's RPC contract, declared once: what it serves and how it is called.

One table per daemon (a `Contract` subclass in the daemon's `contract.py`) lists every method:
its wire name, request model, reply model and whether a retry is harmless. The attribute
name is the Python name on both sides: the service's handler and the typed client's
method (`handler=` or `client=` where one differs). The table drives

- the server: `Contract.register(server, service)` registers each method with its handler,
  request model and reply model (a handler's result is checked against the reply model);
- the client: `ContractClient.call(VMMD.get, request)` sends it with the method's name, its
  idempotency (only idempotent calls are retried) and parses the reply model.

A unit test checks both sides against the tables (tests/unit/test_daemon_contracts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from hanabi_common.rpc.client import RpcClient
    from hanabi_common.rpc.server import RpcServer

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)


@dataclass
class Rpc(Generic[Req, Rep]):
    """One method of a daemon: `name` on the wire, `request` in, `reply` out."""

    name: str
    request: type[Req]
    reply: type[Rep]
    idempotent: bool = False
    handler: str = ""  # the service's method (default: the attribute's name; "part.method" for one of its parts)
    client: str = ""  # the typed client's method (default: the attribute's name)
    doc: str = ""
    attr: str = field(default="", init=False)

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr
        self.handler = self.handler or attr
        self.client = self.client or attr


class Contract:
    """Base of a daemon's table: subclass with one `Rpc` class attribute per method."""

    daemon: ClassVar[str] = ""

    @classmethod
    def methods(cls) -> list[Rpc[Any, Any]]:
        """Every method of the table, in declaration order."""
        return [v for v in vars(cls).values() if isinstance(v, Rpc)]

    @classmethod
    def by_name(cls, name: str) -> Rpc[Any, Any]:
        """The method called `name` on the wire (KeyError if the table has none)."""
        for rpc in cls.methods():
            if rpc.name == name:
                return rpc
        raise KeyError(f"{cls.daemon} declares no method {name!r}")

    @classmethod
    def register(cls, server: RpcServer, service: object) -> None:
        """Serve every method of the table with `service`'s handler of the same name."""
        for rpc in cls.methods():
            handler: Any = service
            for part in rpc.handler.split("."):  # "devices.attach_disk": a part the service holds
                handler = getattr(handler, part)
            server.register(rpc.name, rpc.request, handler, rpc.doc, reply=rpc.reply,
                            idempotent=rpc.idempotent)


class ContractClient:
    """Base of a typed client: calls go through the table's entries."""

    contract: ClassVar[type[Contract]]
    rpc: RpcClient

    def call(self, method: Rpc[Any, Rep], request: BaseModel, *, timeout: float | None = None) -> Rep:
        """Call `method` with `request`; its reply model back (typed errors raised)."""
        reply = self.rpc.call(method.name, request, method.reply, timeout=timeout, idempotent=method.idempotent)
        assert isinstance(reply, method.reply)
        return reply
