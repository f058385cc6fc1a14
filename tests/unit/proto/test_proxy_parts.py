"""HTTP CONNECT proxy helper: URL parsing, no_proxy, precedence, and the CONNECT exchange
against a scripted proxy on loopback (the real tinyproxy runs in test_fieldnet)."""

from __future__ import annotations

import socket
import threading
from typing import Iterator

import pytest

from dpanel_proto.proxy import (
    Proxy,
    ProxyError,
    bypasses,
    open_connection,
    parse_proxy,
    select_proxy,
)
from dpanel_proto.wire import DecodeError


def test_parse_proxy_and_redaction() -> None:
    p = parse_proxy("http://us%40er:p%3Ass@proxy.example:8080")
    assert (p.host, p.port, p.username, p.password) == ("proxy.example", 8080, "us@er", "p:ss")
    assert "p:ss" not in str(p) and "p%3Ass" not in repr(p)
    assert parse_proxy("10.0.0.1").port == 3128
    with pytest.raises(DecodeError, match="only http://"):
        parse_proxy("socks5://h:1080")
    with pytest.raises(DecodeError) as exc:
        parse_proxy("http://u:secret@h:1/path")
    assert "secret" not in str(exc.value)


@pytest.mark.parametrize(("host", "no_proxy", "direct"), [
    ("broker.example.com", "*", True),
    ("broker.example.com", "example.com", True),
    ("broker.example.com", ".example.com", True),
    ("example.com", ".example.com", True),
    ("badexample.com", "example.com", False),
    ("10.1.2.3", "10.0.0.0/8", True),
    ("10.1.2.3", "10.1.2.3:443", True),
    ("10.1.2.3", "192.168.0.0/16, localhost", False),
    ("::1", "[::1]", True),
    ("broker", "", False),
])
def test_no_proxy(host: str, no_proxy: str, direct: bool) -> None:
    assert bypasses(host, no_proxy) is direct


def test_select_proxy_precedence() -> None:
    env = {"https_proxy": "http://envproxy:1"}
    assert select_proxy("b", env=env) == Proxy("envproxy", 1)
    assert select_proxy("b", env={"HTTPS_PROXY": "http://up:2"}) == Proxy("up", 2)
    assert select_proxy("b", from_token="http://tok:3", env=env) == Proxy("tok", 3)
    assert select_proxy("b", configured="http://cfg:4", from_token="http://tok:3",
                        env=env) == Proxy("cfg", 4)
    assert select_proxy("b", configured="none", from_token="http://tok:3", env=env) is None
    assert select_proxy("b.lan", env={**env, "no_proxy": ".lan"}) is None
    assert select_proxy("b.lan", env={**env, "NO_PROXY": "*"}) is None
    assert select_proxy("b", env={}) is None


@pytest.fixture
def scripted() -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """A one-shot proxy: records the request, sends the scripted answer."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    answers: list[bytes] = []
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            seen.append(buf)
            if answers and answers[0]:
                conn.sendall(answers[0])
            conn.recv(1)  # hold until the client is done

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], answers, seen
    srv.close()


def test_connect_ok_keeps_the_first_server_bytes(
        scripted: tuple[int, list[bytes], list[bytes]]) -> None:
    port, answers, seen = scripted
    answers.append(b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\nSSH-2.0-srv\r\n")
    sock = open_connection(Proxy("127.0.0.1", port, "u", "pw"), "broker", 443, 5)
    with sock:
        assert sock.recv(100) == b"SSH-2.0-srv\r\n"
    assert seen[0].startswith(b"CONNECT broker:443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dTpwdw==" in seen[0]


def test_connect_refused_with_407_names_proxy_not_password(
        scripted: tuple[int, list[bytes], list[bytes]]) -> None:
    port, answers, _ = scripted
    answers.append(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    with pytest.raises(ProxyError) as exc:
        open_connection(Proxy("127.0.0.1", port, "u", "hunter2"), "broker", 443, 5)
    msg = str(exc.value)
    assert f"http://u@127.0.0.1:{port}" in msg and "credentials" in msg
    assert "hunter2" not in msg and "\n" not in msg


def test_silent_proxy_times_out(scripted: tuple[int, list[bytes], list[bytes]]) -> None:
    port, answers, _ = scripted
    answers.append(b"")  # accepts, reads the request, never answers
    with pytest.raises(ProxyError, match="did not answer"):
        open_connection(Proxy("127.0.0.1", port), "broker", 443, 0.5)


def test_unreachable_proxy() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ProxyError, match="cannot reach proxy"):
        open_connection(Proxy("127.0.0.1", port), "broker", 443, 2)
