"""Through firewalls: MQTT over WebSocket (ws://, wss://) and mqtts:// with client certificates,
for both clients, against Mosquitto's own websockets and TLS listeners (a private broker per
test, its certificates from a throwaway CA)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from peerd.mqtt import (
    CLIENTS,
    Backoff,
    BrokerError,
    BrokerLink,
    BrokerRefused,
    BrokerSettings,
    BrokerSettingsError,
    MqttLink,
    open_link,
)
from tests.peerd.test_mqtt import eventually, next_msg
from tests.support.broker import Broker, free_port, wait_for_port
from tests.support.tls import TestCA


def cid() -> str:
    return ("w" + os.urandom(6).hex())[:23]


class Listeners:
    """One private Mosquitto with a ws:// listener, a wss:// one and an mqtts:// one, both TLS
    listeners requiring a client certificate from the test CA."""

    def __init__(self, tmp: Path) -> None:
        self.ca = TestCA(tmp / "certs")
        self.ws_port, self.wss_port, self.mtls_port = free_port(), free_port(), free_port()
        extra = (
            # Mosquitto 2.0.11 (Debian 12) starts a websockets listener only beside a TCP one,
            # which Broker always has.
            f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\n"
            + self.ca.listener(self.wss_port, websockets=True)
            + self.ca.listener(self.mtls_port)
        )
        self.broker = Broker(tmp / "broker", extra_conf=extra)

    def start(self) -> Listeners:
        self.broker.start()
        for port in (self.ws_port, self.wss_port, self.mtls_port):
            wait_for_port(port)
        return self

    def settings(self, url: str, *, cert: str = "good", **kw: object) -> BrokerSettings:
        files: dict[str, object] = {}
        if url.startswith(("wss", "mqtts")):
            files["ca_file"] = self.ca.ca
            if cert == "good":
                files |= {"cert_file": self.ca.client_crt, "key_file": self.ca.client_key}
            elif cert == "stranger":
                files |= {"cert_file": self.ca.stranger_crt, "key_file": self.ca.stranger_key}
        return BrokerSettings.from_url(url, client_id=cid(), **files, **kw)  # type: ignore[arg-type]

    @property
    def urls(self) -> dict[str, str]:
        return {
            "ws": f"ws://127.0.0.1:{self.ws_port}/mqtt",
            "wss": f"wss://127.0.0.1:{self.wss_port}/mqtt",
            "mqtts": f"mqtts://127.0.0.1:{self.mtls_port}",
        }


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listeners]:
    ls = Listeners(tmp_path_factory.mktemp("firewall"))
    try:
        yield ls.start()
    finally:
        ls.broker.close()


def open_for(settings: BrokerSettings, client: str) -> BrokerLink:
    return open_link(settings, client=client, backoff=Backoff(initial=0.05, maximum=0.2))


# --- settings (no broker) ------------------------------------------------------------------------


def test_websocket_urls() -> None:
    s = BrokerSettings.from_url("wss://broker.example.org/mqtt", client_id="n1")
    assert (s.tls, s.port, s.websocket_path) == (True, 443, "/mqtt")
    assert s.url == "wss://broker.example.org:443/mqtt"
    s = BrokerSettings.from_url("ws://127.0.0.1:9001", client_id="n1")
    assert (s.tls, s.port, s.websocket_path) == (False, 9001, "/mqtt")  # the usual default
    s = BrokerSettings.from_url("ws://h/ws?x=1", client_id="n1")
    assert (s.port, s.websocket_path) == (80, "/ws?x=1")
    assert BrokerSettings.from_url("mqtt://h", client_id="n1").websocket_path is None
    with pytest.raises(BrokerSettingsError, match="must not have a path"):
        BrokerSettings.from_url("mqtt://h/mqtt", client_id="n1")
    with pytest.raises(BrokerSettingsError, match=r"ws://host:port/path"):
        BrokerSettings.from_url("http://h/mqtt", client_id="n1")
    with pytest.raises(BrokerSettingsError, match="needs an mqtts:// or wss://"):
        BrokerSettings.from_url("ws://h", client_id="n1", ca_file="/etc/hostname")


def test_a_client_key_other_users_can_read_is_refused(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    kw = {"client_id": "n1", "cert_file": ca.client_crt, "key_file": ca.client_key}
    BrokerSettings.from_url("wss://h", **kw)  # type: ignore[arg-type] # 0600: fine
    ca.client_key.chmod(0o640)
    BrokerSettings.from_url("mqtts://h", **kw)  # type: ignore[arg-type] # a group: the daemon's
    ca.client_key.chmod(0o644)
    with pytest.raises(BrokerSettingsError, match=r"accessible to other users \(mode 0644\)") as e:
        BrokerSettings.from_url("mqtts://h", **kw)  # type: ignore[arg-type]
    assert f"chmod 600 {ca.client_key}" in (e.value.hint or "")
    assert "\n" not in str(e.value)
    ca.client_key.unlink()
    with pytest.raises(BrokerSettingsError, match="cannot be read: No such file"):
        BrokerSettings.from_url("mqtts://h", **kw)  # type: ignore[arg-type]


# --- against Mosquitto's listeners --------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind", ["ws", "wss", "mqtts"])
async def test_round_trip_through_each_listener(
    listeners: Listeners, client: str, kind: str
) -> None:
    link = open_for(listeners.settings(listeners.urls[kind]), client)
    async with link:
        topic = f"peerd/v1/t/in/{link.settings.client_id}"
        sub = await link.subscribe(topic, timeout=10)
        # Many reads and frames; small because Mosquitto 2.0.11 reads a websockets client 4 KiB
        # per main-loop tick (~40 KB/s, docs/brokers.md), whatever the client.
        big = os.urandom(20_000)
        await link.publish(topic, b"small", qos=1)
        await link.publish(topic, big, qos=1)
        link.publish_nowait(topic, b"qos0")
        got = [(await next_msg(sub)).payload for _ in range(3)]
        assert got == [b"small", big, b"qos0"]
        assert link.stats.connects == 1
    assert link.settings.url == listeners.urls[kind]


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_slow_websocket_listener_is_no_packet_limit(
    listeners: Listeners, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto 2.0.11's websockets listener reads ~40 KB/s, so a large probe comes back after
    the probe's deadline, or is not even written by then. That is a slow broker, not a limit:
    the probe must not lower the limit in force (it took a 256 KiB probe for a 128 KiB limit)."""
    from peerd.mqtt import probe  # noqa: PLC0415

    monkeypatch.setattr(probe, "PROBE_TIMEOUT", 1.0)  # 256 KiB at ~40 KB/s takes ~6 s
    link = open_for(listeners.settings(listeners.urls["ws"]), client)
    topic = f"peerd/v1/t/x/{link.settings.client_id}/{'0' * 32}"
    link.probe_plan = probe.ProbePlan(topic, (16384, 262144))
    async with link:
        await link.wait_connected(10)
        await eventually(lambda: link._probing is None, "the probe ran", limit=20)  # type: ignore[attr-defined]
        limits = await link.settled(10)
        assert limits.source != "probe"
        assert limits.max_payload(topic) >= 262144


async def test_builtin_websocket_sets_nodelay_and_closes_cleanly(listeners: Listeners) -> None:
    link = MqttLink(listeners.settings(listeners.urls["wss"]))
    async with link:
        await link.wait_connected(10)
        conn = link._conn
        assert conn is not None
        assert conn.transport is not None
        assert conn.transport.get_extra_info("ssl_object") is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        closed = conn.closed
    assert closed.done()  # close() waited for the WebSocket and TCP close, not its timeout
    assert link.stats.protocol_errors == 0


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind", ["wss", "mqtts"])
@pytest.mark.parametrize("cert", ["none", "stranger"])
async def test_a_missing_or_wrong_client_certificate_is_one_clear_line(
    listeners: Listeners, client: str, kind: str, cert: str
) -> None:
    link = open_for(listeners.settings(listeners.urls[kind], cert=cert), client)
    async with link:
        with pytest.raises(BrokerError) as info:
            await link.wait_connected(10)
        assert not link.connected
    err = info.value
    assert err.permanent  # retrying with the same certificate cannot help: said at once
    assert listeners.urls[kind] in str(err)
    assert "\n" not in str(err)
    if cert == "none":
        assert "requires a client certificate" in str(err)
        assert "cert_file" in (err.hint or "")
    else:
        assert "refused the client certificate" in str(err)


async def test_a_refused_websocket_upgrade_is_one_clear_line() -> None:
    async def not_mqtt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_mqtt, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"ws://127.0.0.1:{port}/nope"
        async with MqttLink(BrokerSettings.from_url(url, client_id=cid())) as link:
            with pytest.raises(BrokerRefused, match=r"refused the WebSocket upgrade \(HTTP 404\)"):
                await link.wait_connected(10)
    finally:
        server.close()


@contextlib.asynccontextmanager
async def not_a_broker(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    mqtt_version: int = 4,
) -> AsyncIterator[BrokerSettings]:
    """Settings for a TCP server on loopback that runs `handler` per connection, with a connect
    timeout far beyond any wait of a test: only an attempt that ends early ends in time."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield BrokerSettings.from_url(
            f"mqtt://127.0.0.1:{port}",
            client_id=cid(),
            connect_timeout=600,
            mqtt_version=mqtt_version,
        )
    finally:
        server.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_close_before_the_connack_ends_the_attempt_at_once(client: str) -> None:
    """A broker that closes after reading CONNECT (as a TLS 1.3 broker refusing a certificate
    may, with its alert lost to the reset) fails the attempt now, and the link retries: not a
    silent wait for `connect_timeout` (aiomqtt on its own ignores a close before CONNACK)."""
    attempts = 0

    async def close_after_connect(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal attempts
        attempts += 1
        await reader.read(1)
        writer.close()

    async with not_a_broker(close_after_connect) as settings, open_for(settings, client) as link:
        await eventually(lambda: link.stats.connect_failures >= 3, "three failed attempts", 20)
        assert not link.connected
        err = link.last_error
        assert isinstance(err, BrokerError)
        assert not err.permanent
        assert f"the broker at {settings.url} closed the connection before accepting it" in str(err)
    assert attempts >= 3


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_close_before_the_connack_ends_the_fallback_attempt_too(client: str) -> None:
    """A broker that refuses MQTT 5 with a CONNACK and then closes the 3.1.1 attempt before its
    CONNACK: the fallback attempt ends at once as well (the aiomqtt link once took the v5
    refusal's CONNACK for the 3.1.1 attempt's and waited out `connect_timeout`)."""
    levels: list[int] = []

    async def refuse_v5_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.read(64)
        at = head.find(b"MQTT")
        levels.append(head[at + 4] if at >= 0 and len(head) > at + 4 else 0)
        if levels[-1] == 5:
            writer.write(b"\x20\x03\x00\x84\x00")  # CONNACK: unsupported protocol version
            await writer.drain()
        writer.close()

    async with (
        not_a_broker(refuse_v5_then_close, mqtt_version=0) as settings,
        open_for(settings, client) as link,
    ):
        await eventually(lambda: 4 in levels and link.stats.connect_failures >= 2, "fallbacks", 20)
        err = link.last_error
        assert isinstance(err, BrokerError)
        assert "closed the connection before accepting it" in str(err)
    assert 5 in levels


@pytest.mark.parametrize("client", CLIENTS)
async def test_close_ends_an_attempt_the_broker_leaves_unanswered(client: str) -> None:
    """close() does not wait out `connect_timeout` behind a broker that never answers CONNECT
    (the aiomqtt link once did)."""
    seen = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read(1)
        seen.set()

    try:
        async with not_a_broker(never_answer) as settings:
            link = open_for(settings, client)
            await link.__aenter__()
            async with asyncio.timeout(10):
                await seen.wait()
            async with asyncio.timeout(30):  # far below connect_timeout: the attempt was cut short
                await link.close()
            assert not link.connected
            assert link.last_error is None  # closing is no failure of the broker
    finally:
        for w in held:
            w.close()
