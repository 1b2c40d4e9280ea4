"""The /metrics endpoint's HTTP side (peerd/metrics_http.py) over real sockets, and the
[metrics] configuration. The metrics themselves are checked against real daemons in
tests/e2e/test_operations.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from peerd.config import config_from_mapping
from peerd.errors import ConfigError, DaemonError
from peerd.metrics_http import MAX_CONNECTIONS, MAX_HEAD, MetricsServer

BODY = b"# HELP peerd_up 1\npeerd_up 1.0\n"


async def _render() -> bytes:
    return BODY


async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""  # closed unread: the kernel answers the request with a reset
    finally:
        writer.close()


async def test_serves_metrics_and_nothing_else() -> None:
    server = MetricsServer("127.0.0.1", 0, _render)
    await server.start()
    try:
        got = await _request(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert f"Content-Length: {len(BODY)}".encode() in head
        assert body == BODY
        head_only = await _request(server.port, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.0 200 OK")
        assert head_only.endswith(b"\r\n\r\n")
        assert (await _request(server.port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.0 404")
        assert (await _request(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.0 405"
        )
        assert (await _request(server.port, b"junk\r\n\r\n")).startswith(b"HTTP/1.0 400")
        # A request head beyond the bound is not answered at all.
        huge = b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n"
        assert await _request(server.port, huge) == b""
    finally:
        await server.close()


async def test_idle_connections_beyond_the_bound_are_closed_unanswered() -> None:
    server = MetricsServer("127.0.0.1", 0, _render)
    await server.start()
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(await asyncio.open_connection("127.0.0.1", server.port))
        for _ in range(100):  # until the server has accepted all of them
            if server._active == MAX_CONNECTIONS:
                break
            await asyncio.sleep(0.01)
        assert server._active == MAX_CONNECTIONS
        assert await _request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
        assert server.refused == 1
        _reader, writer = held.pop()
        writer.close()  # one slot frees: served again
        for _ in range(100):
            if server._active < MAX_CONNECTIONS:
                break
            await asyncio.sleep(0.01)
        got = await _request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert got.startswith(b"HTTP/1.0 200 OK")
    finally:
        for _, writer in held:
            writer.close()
        await server.close()


async def test_a_taken_address_is_one_clear_error() -> None:
    first = MetricsServer("127.0.0.1", 0, _render)
    await first.start()
    try:
        with pytest.raises(DaemonError, match=r"cannot serve metrics on 127\.0\.0\.1:\d+"):
            await MetricsServer("127.0.0.1", first.port, _render).start()
    finally:
        await first.close()


@pytest.mark.parametrize("bad", ["9464", "localhost", "127.0.0.1:0", "h:port", "u@h:1", ""])
def test_metrics_listen_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"\[metrics\] listen"):
        config_from_mapping({"metrics": {"listen": bad}}, origin="t", base=Path("/"))


def test_metrics_are_off_by_default_and_take_ipv6() -> None:
    assert config_from_mapping({}, origin="t", base=Path("/")).metrics.listen is None
    cfg = config_from_mapping(
        {"metrics": {"listen": "[::1]:9464", "per_peer": True}, "log": {"format": "json"}},
        origin="t",
        base=Path("/"),
    )
    assert (cfg.metrics.host, cfg.metrics.port, cfg.metrics.per_peer) == ("::1", 9464, True)
    assert cfg.log.format == "json"
    with pytest.raises(ConfigError, match=r"\[log\] format"):
        config_from_mapping({"log": {"format": "xml"}}, origin="t", base=Path("/"))
