"""peerd.client against a real control server on a real socket."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from peerd.cli.common import EXIT_DENIED, EXIT_NOT_RUNNING, EXIT_TIMEOUT, EXIT_USAGE, exit_code_for
from peerd.client import (
    DEFAULT_SOCKET_PATH,
    AccessDenied,
    Client,
    ConnectionLost,
    DaemonNotRunning,
    EventStream,
    RemoteCallError,
    SubscriberDropped,
    Timeout,
    error_from_wire,
    socket_path_from_config,
)
from peerd.control import (
    Connection,
    ControlServer,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    Params,
    require,
)
from peerd.errors import ConfigError, PeerdError, RemoteProtocolError
from tests.peerd.test_control_support import make_server, running, short_dir


class InboxFull(PeerdError):
    """A daemon-side error class (the client process knows it too, here)."""

    hint = "free space in the inbox"

    def __init__(self, path: str, free: int) -> None:  # a signature of its own
        super().__init__(f"inbox {path} has {free} bytes free")


class Replayed(RemoteProtocolError):
    reason = "replay"


@pytest.fixture
async def server() -> AsyncIterator[ControlServer]:
    with short_dir() as d:
        async with running(os.path.join(d, "control.sock")) as srv:

            async def fail(params: Params, conn: Connection) -> Any:
                kind = require(params, "kind", str)
                if kind == "config":
                    raise ConfigError("bad [broker] url", hint="use mqtt:// or mqtts://")
                if kind == "inbox":
                    raise InboxFull("/var/lib/peerd/inbox", 12)
                if kind == "replay":
                    raise Replayed("frame 7 seen twice")
                if kind == "denied":
                    raise AccessDenied("peer x is blocked")
                raise RuntimeError("a bug")

            async def forever(params: Params, conn: Connection) -> Any:
                await asyncio.Event().wait()

            srv.register("v1.fail", fail)
            srv.register("v1.forever", forever)
            yield srv


async def test_calls_and_concurrency(server: ControlServer) -> None:
    async with await Client.connect(server.path) as client:
        assert client.server_info["server"] == "peerd"
        assert client.socket_path == server.path
        assert await client.call("v1.echo", text="hi") == {"echo": "hi"}
        assert await client.request("v1.echo", {"text": "x"}) == {"echo": "x"}
        # A call that waits does not hold up the ones behind it on the same connection.
        waiting = asyncio.create_task(client.call("v1.wait"))
        assert await client.call("v1.release") == "ok"
        assert await waiting == "released"
        many = await asyncio.gather(*(client.call("v1.echo", text=str(i)) for i in range(50)))
        assert many == [{"echo": str(i)} for i in range(50)]
        assert await client.call_as(dict, "v1.echo", text="typed") == {"echo": "typed"}
        with pytest.raises(RemoteCallError, match="expected list"):
            await client.call_as(list, "v1.echo", text="typed")
        await client.notify("v1.echo", text="fire and forget")
    assert client.closed


async def test_errors_are_raised_as_their_own_class(server: ControlServer) -> None:
    async with await Client.connect(server.path) as client:
        with pytest.raises(ConfigError) as config:
            await client.call("v1.fail", kind="config")
        assert config.value.one_line() == "bad [broker] url (use mqtt:// or mqtts://)"

        with pytest.raises(InboxFull) as inbox:
            await client.call("v1.fail", kind="inbox")
        assert str(inbox.value) == "inbox /var/lib/peerd/inbox has 12 bytes free"
        assert inbox.value.hint == "free space in the inbox"

        with pytest.raises(Replayed) as replay:
            await client.call("v1.fail", kind="replay")
        assert replay.value.reason == "replay"

        with pytest.raises(AccessDenied) as denied:
            await client.call("v1.fail", kind="denied")
        assert exit_code_for(denied.value) == EXIT_DENIED

        with pytest.raises(MethodNotFound):
            await client.call("v9.nothing")
        with pytest.raises(InvalidParams) as bad:
            await client.call("v1.echo", txt="typo")
        assert exit_code_for(bad.value) == EXIT_USAGE

        with pytest.raises(RemoteCallError) as internal:
            await client.call("v1.fail", kind="bug")
        assert internal.value.code == -32603
        assert "a bug" not in str(internal.value)
        # The connection survives every one of these.
        assert await client.call("v1.echo", text="still") == {"echo": "still"}


def test_unknown_error_classes_become_named_stand_ins() -> None:
    # What a daemon-only class looks like to a client that cannot import it.
    exc = error_from_wire(
        {
            "code": -32001,
            "message": "peer abc is revoked",
            "data": {
                "type": "PeerRevoked",
                "bases": ["NotInThisProcess", "AccessDenied"],
                "hint": "pair again",
                "reason": "revoked",
            },
        }
    )
    assert type(exc).__name__ == "PeerRevoked"
    assert isinstance(exc, RemoteCallError)
    assert isinstance(exc, AccessDenied)  # the nearest ancestor this process knows
    assert exc.one_line() == "peer abc is revoked (pair again)"
    assert exc.reason == "revoked"  # type: ignore[attr-defined]
    assert exit_code_for(exc) == EXIT_DENIED
    # The same remote class maps to the same stand-in class every time.
    again = error_from_wire({"code": -32001, "message": "m", "data": exc.data})  # type: ignore[attr-defined]
    assert type(again) is type(exc)
    # By name alone, the CLI's exit code table still applies ("Timeout" is known here, but a
    # daemon might raise its own class of a name in the table).
    stand_in = error_from_wire({"code": -32000, "message": "slow", "data": {"type": "TrustError"}})
    assert exit_code_for(stand_in) == EXIT_DENIED
    # Malformed or hostile error objects still give a PeerdError, never a crash.
    for junk in (None, 5, {"code": "x"}, {"data": {"type": "not an identifier!"}}):
        assert isinstance(error_from_wire(junk), RemoteCallError)
    assert isinstance(error_from_wire({"code": -32602, "message": "m"}), InvalidParams)


async def test_daemon_not_running() -> None:
    with short_dir() as d:
        missing = os.path.join(d, "control.sock")
        with pytest.raises(DaemonNotRunning) as info:
            await Client.connect(missing)
        assert missing in str(info.value)
        assert "systemctl start peerd" in info.value.one_line()
        assert "peerd run" in info.value.one_line()
        assert exit_code_for(info.value) == EXIT_NOT_RUNNING

        # A stale socket file: nothing listens.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(missing)
        stale.close()
        with pytest.raises(DaemonNotRunning, match="nothing listens"):
            await Client.connect(missing)


async def test_a_socket_that_is_not_peerd_is_not_taken_for_it() -> None:
    with short_dir() as d:
        path = os.path.join(d, "other.sock")

        async def not_peerd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b'{"jsonrpc": "2.0", "id": 1, "result": {"server": "nginx"}}\n')
            await writer.drain()
            writer.close()

        other = await asyncio.start_unix_server(not_peerd, path)
        try:
            with pytest.raises(DaemonNotRunning, match="not a peerd control socket"):
                await Client.connect(path)
        finally:
            other.close()
            await other.wait_closed()


async def test_timeout_leaves_the_connection_usable(server: ControlServer) -> None:
    async with await Client.connect(server.path) as client:
        with pytest.raises(Timeout) as info:
            await client.request("v1.forever", timeout=0.05)
        assert exit_code_for(info.value) == EXIT_TIMEOUT
        assert "v1.forever" in str(info.value)
        assert await client.call("v1.echo", text="after") == {"echo": "after"}
    async with await Client.connect(server.path, timeout=0.05) as client:
        with pytest.raises(Timeout):
            await client.call("v1.forever")


async def test_daemon_stopping_fails_pending_calls_and_streams() -> None:
    with short_dir() as d:
        srv = await _started(os.path.join(d, "control.sock"))
        client = await Client.connect(srv.path)
        pending = asyncio.create_task(client.call("v1.wait"))
        async with client.subscribe("session.up") as stream:
            await asyncio.sleep(0)
            await srv.close()
            with pytest.raises(ConnectionLost) as info:
                await pending
            assert isinstance(info.value, DaemonNotRunning)
            with pytest.raises(ConnectionLost):
                await stream.get(timeout=20)
        with pytest.raises(ConnectionLost):
            await client.call("v1.echo", text="x")
        await client.close()


async def _started(path: str) -> ControlServer:
    srv = make_server(path)
    await srv.start()
    return srv


async def test_subscriptions(server: ControlServer) -> None:
    async with await Client.connect(server.path) as client:
        async with (
            client.subscribe(["session.up", "session.down"]) as sessions,
            client.subscribe("message", filter={"channel": "fl"}) as messages,
        ):
            assert sessions.id != messages.id
            server.publish_event("session.up", {"peer": "a"})
            server.publish_event("message", {"channel": "other", "n": 0})
            server.publish_event("message", {"channel": "fl", "n": 1})
            server.publish_event("session.down", {"peer": "a"})
            first, second = await sessions.get(timeout=20), await sessions.get(timeout=20)
            assert [(first.name, first.data), (second.name, second.data)] == [
                ("session.up", {"peer": "a"}),
                ("session.down", {"peer": "a"}),
            ]
            message = await messages.get(timeout=20)
            assert (message.name, message.data) == ("message", {"channel": "fl", "n": 1})
            with pytest.raises(Timeout):
                await messages.get(timeout=0.05)
        # Leaving the blocks unsubscribed on the daemon's side.
        assert server.stats()["subscriptions"] == 0
        # async for ends when the stream is closed by its owner.
        async with client.subscribe("*") as everything:
            server.publish_event("trust.changed", {"peer": "b"})
            seen = []
            async for event in everything:
                seen.append(event.name)
                await everything.close()
            assert seen == ["trust.changed"]


async def test_events_right_after_the_subscribe_reply_are_not_lost(
    server: ControlServer,
) -> None:
    # The daemon publishes as soon as the subscription exists: the event follows the reply
    # on the wire and the client reads both at once. It must reach the stream all the same.
    async with await Client.connect(server.path) as client:
        (conn,) = server.connections

        async def publish_when_subscribed() -> None:
            while not conn.subscriptions:  # noqa: ASYNC110 (server state, no event to wait on)
                await asyncio.sleep(0)
            server.publish_event("session.up", {"n": 1})

        publisher = asyncio.create_task(publish_when_subscribed())
        async with client.subscribe("session.up") as stream:
            assert (await stream.get(timeout=20)).data == {"n": 1}
        await publisher


async def test_a_slow_reader_of_a_stream_gets_subscriber_dropped(server: ControlServer) -> None:
    async with await Client.connect(server.path) as client:
        async with client.subscribe("transfer.progress", max_pending=10) as stream:
            for n in range(25):
                server.publish_event("transfer.progress", {"n": n})
            await client.call("v1.echo", text="sync")  # every event above has been read
            got = [(await stream.get(timeout=20)).data["n"] for _ in range(10)]
            assert got == list(range(10))
            with pytest.raises(SubscriberDropped) as info:
                await stream.get(timeout=20)
            assert isinstance(info.value, Overloaded)
        assert await client.call("v1.echo", text="fine") == {"echo": "fine"}


async def read_to_the_end(stream: EventStream) -> None:
    while True:
        await stream.get(timeout=20)


async def test_a_client_dropped_by_the_daemon_learns_why() -> None:
    with short_dir() as d:
        async with running(os.path.join(d, "c.sock"), max_queue=4) as srv:
            client = await Client.connect(srv.path)
            async with client.subscribe("transfer.progress") as stream:
                (conn,) = srv.connections
                # Published faster than anything can be written: the daemon's queue overflows.
                n = 0
                while not conn.closed:
                    srv.publish_event("transfer.progress", {"n": n, "pad": "x" * 4096})
                    n += 1
                with pytest.raises(SubscriberDropped) as info:
                    await read_to_the_end(stream)
                assert "dropped" in str(info.value)
            with pytest.raises(SubscriberDropped):
                await client.call("v1.echo", text="x")
            await client.close()


def test_socket_path_from_config(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEERD_CONFIG", raising=False)
    config = tmp_path / "peerd.toml"
    config.write_text('[node]\nsocket = "/srv/peerd/ctl.sock"\n')
    assert socket_path_from_config(config) == "/srv/peerd/ctl.sock"
    config.write_text('[node]\nruntime_dir = "/run/peerd-test"\n')
    assert socket_path_from_config(config) == "/run/peerd-test/peerd.sock"
    config.write_text('[node]\nruntime_dir = "run"\n')  # relative to the file's directory
    assert socket_path_from_config(config) == str(tmp_path / "run" / "peerd.sock")
    config.write_text("[broker]\nurl = 'mqtt://localhost'\n")
    assert socket_path_from_config(config) == DEFAULT_SOCKET_PATH == "/run/peerd/peerd.sock"
    monkeypatch.setenv("PEERD_CONFIG", str(config))
    config.write_text('[node]\nsocket = "/from/env.sock"\n')
    assert socket_path_from_config() == "/from/env.sock"
    config.write_text("[node\nbroken")
    with pytest.raises(ConfigError, match="not valid TOML"):
        socket_path_from_config()
    config.write_text("[node]\nsockett = '/x'\n")
    with pytest.raises(ConfigError, match="unknown key"):
        socket_path_from_config()
    # A file named explicitly must exist; the default location need not.
    with pytest.raises(ConfigError, match="no configuration file"):
        socket_path_from_config(tmp_path / "missing.toml")
    monkeypatch.delenv("PEERD_CONFIG")
    if not os.path.exists("/etc/peerd/peerd.toml"):
        assert socket_path_from_config() == DEFAULT_SOCKET_PATH


async def test_connect_reads_the_socket_path_from_the_config(
    server: ControlServer, tmp_path: Any
) -> None:
    config = tmp_path / "peerd.toml"
    config.write_text(f'[node]\nsocket = "{server.path}"\n')
    async with await Client.connect(config_path=config) as client:
        assert client.socket_path == server.path
        assert await client.call("v1.echo", text="via config") == {"echo": "via config"}


async def test_requests_the_daemon_would_refuse_fail_locally(server: ControlServer) -> None:
    async with await Client.connect(server.path) as client:
        with pytest.raises(PeerdError, match="not JSON"):
            await client.call("v1.echo", text=object())
        with pytest.raises(PeerdError, match="at most"):
            await client.call("v1.echo", text="x" * (2 << 20))
        assert await client.call("v1.echo", text="ok") == {"echo": "ok"}
