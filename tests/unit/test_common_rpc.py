"""The RPC layer end to end over a real ZeroMQ ipc socket (no root needed)."""

from __future__ import annotations

import threading

import pytest
import zmq
from pydantic import BaseModel

from hanabi_common.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.envelope import PROTOCOL, decode_reply, decode_request, encode_request
from hanabi_common.rpc.server import RpcServer, after_reply


class Echo(BaseModel):
    text: str


@pytest.fixture
def server(tmp_path):
    endpoint = f"ipc://{tmp_path}/t.sock"
    srv = RpcServer("testd", endpoint, max_message_bytes=64 * 1024, workers=2)
    release = threading.Event()

    def echo(req: Echo) -> dict:
        return {"text": req.text}

    def fail(req: Echo) -> dict:
        raise NotFound(f"no {req.text}")

    def boom(_req: Echo) -> dict:
        raise RuntimeError("a bug")

    def slow(_req: Echo) -> dict:
        release.wait(5)
        return {}

    srv.register("echo", Echo, echo)
    srv.register("fail", Echo, fail)
    srv.register("boom", Echo, boom)
    srv.register("slow", Echo, slow)

    def later(req: Echo) -> dict:
        # Runs once the reply is out: it waits for the test to have received it.
        after_reply(lambda: AFTER.append(("ran", GOT.wait(5))))
        return {"text": req.text}

    srv.register("later", Echo, later)
    ready = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"ready": ready.set}, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield endpoint
    release.set()
    srv.stop()
    thread.join(10)


AFTER: list[tuple[str, bool]] = []
GOT = threading.Event()


def test_after_reply_runs_once_the_reply_is_sent(server):
    """What a handler hands to after_reply (a release worker's wake-up) runs after its reply
    went out: here it waits for the client to have the reply, which it could not have if
    the callback ran first (the loop thread sends the replies and runs the callbacks)."""
    AFTER.clear()
    GOT.clear()
    client = RpcClient("testd", server, timeout=5)
    assert client.call("later", {"text": "x"}) == {"text": "x"}
    GOT.set()
    assert client.call("echo", {"text": "y"}) == {"text": "y"}  # served after the callback returned
    assert AFTER == [("ran", True)]
    ran: list[int] = []
    after_reply(lambda: ran.append(1))  # outside a handler: at once
    assert ran == [1]


def test_call_and_typed_errors(server):
    client = RpcClient("testd", server, timeout=5)
    assert client.call("echo", {"text": "hi"}) == {"text": "hi"}
    assert client.ping()["daemon"] == "testd"
    with pytest.raises(NotFound, match="no x"):
        client.call("fail", {"text": "x"})
    with pytest.raises(NotFound, match="no method 'nope'"):
        client.call("nope", {})
    with pytest.raises(InvalidArgument, match="text"):
        client.call("echo", {"txt": 1})
    with pytest.raises(Exception, match="RuntimeError: a bug"):
        client.call("boom", {"text": "x"})
    assert "echo" in client.call("describe")["methods"]


def test_deadline(server):
    client = RpcClient("testd", server, timeout=0.3)
    with pytest.raises(DeadlineExceeded):
        client.call("slow", {"text": "x"})


def test_garbage_and_oversized_frames_get_error_replies(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server)
    try:
        for frames in ([b"garbage"], [PROTOCOL, b"{not json", b"{}"], [b"OTHER", b"{}", b"{}"],
                       [PROTOCOL, b'{"version": 99}', b"{}"], [PROTOCOL, b"x" * 70000, b"{}"]):
            sock.send_multipart([b""] + frames)
            assert sock.poll(3000), f"no reply to {frames[0][:10]!r}"
            reply = sock.recv_multipart()
            header, body = decode_reply(reply[1:])
            assert header.status == "error" and body["code"] == "INVALID_ARGUMENT"
    finally:
        sock.close(0)
    assert RpcClient("testd", server, timeout=5).ping()["daemon"] == "testd"


def test_unavailable_without_socket(tmp_path):
    with pytest.raises(Unavailable, match="not running"):
        RpcClient("ghost", f"ipc://{tmp_path}/none.sock", timeout=1).call("ping")


def test_envelope_round_trip():
    header, frames = encode_request("vm.create", {"a": 1}, 5.0)
    decoded, body = decode_request(frames, 1 << 20)
    assert decoded.method == "vm.create" and decoded.msg_id == header.msg_id and body == {"a": 1}
    with pytest.raises(InvalidArgument):
        decode_request(frames, 10)
    bad = list(frames)
    bad[1] = bad[1].replace(b"vm.create", b"VM CREATE")
    with pytest.raises(InvalidArgument, match="header"):
        decode_request(bad, 1 << 20)


def test_a_killed_daemon_is_unavailable_fast(tmp_path):
    """A daemon killed with SIGKILL leaves its socket file; the call fails at once with
    UNAVAILABLE naming it, not after its deadline; one dying during a call is seen too."""
    import socket as sockets
    import time as clock

    path = tmp_path / "dead.sock"
    left = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    left.bind(str(path))
    left.close()  # the file stays, nobody listens
    started = clock.monotonic()
    with pytest.raises(Unavailable, match=r"deadd is not running: nothing listens"):
        RpcClient("deadd", f"ipc://{path}", timeout=20).call("ping")
    assert clock.monotonic() - started < 2

    path.unlink()
    listener = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)  # accepts, never answers
    listener.bind(str(path))
    listener.listen(4)
    import threading
    threading.Timer(0.3, listener.close).start()  # ...then dies
    started = clock.monotonic()
    with pytest.raises(Unavailable, match="went away during ping"):
        RpcClient("deadd", f"ipc://{path}", timeout=20).call("ping")
    assert clock.monotonic() - started < 3
