"""agentd transports: the Firecracker hybrid vsock handshake against a fake listener."""

from __future__ import annotations

import os
import socket
import tempfile
import threading

import pytest

from hanabi_common.hybrid_vsock import HandshakeError
from hanabi_agentd.channel import (HybridVsockChannel, UnixChannel,
                                   VsockChannel, make_channel)
from hanabi_common.errors import InvalidArgument


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="hagch") as directory:
        yield directory


class FakeFirecracker:
    """Listens like Firecracker's vsock Unix socket; `answer` decides the handshake reply."""

    def __init__(self, path: str, answer: bytes | None, after: bytes = b"") -> None:
        self.path = path
        self.answer = answer
        self.after = after
        self.request = b""
        self.received = b""
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            while not self.request.endswith(b"\n"):
                chunk = conn.recv(1)
                if not chunk:
                    return
                self.request += chunk
            if self.answer is None:
                return  # no listener on that port: Firecracker closes the connection
            conn.sendall(self.answer + self.after)
            conn.settimeout(2)
            try:
                self.received = conn.recv(100)
            except OSError:
                pass

    def close(self) -> None:
        self.thread.join(timeout=5)
        self.server.close()


def test_hybrid_handshake_ok_keeps_bytes_after_the_line(sock_dir):
    path = os.path.join(sock_dir, "v.sock")
    fake = FakeFirecracker(path, b"OK 1073741824\n", after=b"\x00\x00\x00\x02{}")
    channel = HybridVsockChannel(path, 1024)
    channel.connect(timeout=2)
    assert fake.request == b"CONNECT 1024\n"
    assert channel.host_port == 1073741824
    got = b""
    while len(got) < 6:
        got += channel.recv()
    assert got == b"\x00\x00\x00\x02{}"  # guest bytes right after OK are not swallowed
    channel.send(b"ping")
    channel.close()
    fake.close()
    assert fake.received == b"ping"


@pytest.mark.parametrize("answer", [b"NO 1\n", b"OK abc\n", b"OK 1 2\n", b"X" * 100 + b"\n"])
def test_hybrid_handshake_rejects_bad_answers(sock_dir, answer):
    path = os.path.join(sock_dir, "v.sock")
    fake = FakeFirecracker(path, answer)
    with pytest.raises(HandshakeError):
        HybridVsockChannel(path, 52).connect(timeout=2)
    fake.close()


def test_hybrid_handshake_connection_closed(sock_dir):
    path = os.path.join(sock_dir, "v.sock")
    fake = FakeFirecracker(path, None)
    with pytest.raises(HandshakeError, match="no listener"):
        HybridVsockChannel(path, 52).connect(timeout=2)
    fake.close()


def test_hybrid_handshake_times_out(sock_dir):
    path = os.path.join(sock_dir, "v.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)  # accepts (backlog) but never answers
    with pytest.raises(socket.timeout):
        HybridVsockChannel(path, 52).connect(timeout=0.3)
    server.close()


def test_unix_channel_missing_socket_is_retryable(sock_dir):
    with pytest.raises(FileNotFoundError):
        UnixChannel(os.path.join(sock_dir, "nope.sock")).connect(timeout=0.5)
    assert UnixChannel("/x").recv() == b""  # not connected: end of stream, no crash


def test_unix_channel_roundtrip_and_close_wakes_reader(sock_dir):
    path = os.path.join(sock_dir, "u.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    channel = UnixChannel(path)
    channel.connect(timeout=1)
    peer, _ = server.accept()
    channel.send(b"abc")
    assert peer.recv(10) == b"abc"
    result = []
    reader = threading.Thread(target=lambda: result.append(channel.recv()))
    reader.start()
    channel.close()
    reader.join(timeout=2)
    assert result == [b""] and not channel.connected
    peer.close()
    server.close()


def test_make_channel_addresses():
    assert isinstance(make_channel("/run/vm/agent.sock"), UnixChannel)
    assert make_channel("unix:///run/a.sock").path == "/run/a.sock"
    hybrid = make_channel("hvsock:///run/fc/v.sock:1024")
    assert isinstance(hybrid, HybridVsockChannel) and hybrid.port == 1024 and hybrid.path == "/run/fc/v.sock"
    vsock = make_channel("vsock://3:1024")
    assert isinstance(vsock, VsockChannel) and (vsock.cid, vsock.port) == (3, 1024)
    for bad in ("relative.sock", "vsock://2:1024", "hvsock://x:1", "tcp://1.2.3.4:5", "vsock://3:0"):
        with pytest.raises(InvalidArgument):
            make_channel(bad)
