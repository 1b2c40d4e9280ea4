"""The control socket server against real Unix sockets: JSON-RPC semantics, errors, bounds,
subscriptions, and the socket file's lifecycle."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from typing import Any

import pytest

from peerd.control import (
    DROPPED_METHOD,
    EVENT_METHOD,
    MAX_LINE,
    Connection,
    ControlError,
    ControlServer,
    InvalidParams,
    Params,
    only,
    optional,
    require,
)
from peerd.errors import ConfigError, PeerdError, RemoteProtocolError, UsageError
from tests.peerd.test_control_support import Raw, make_server, running, short_dir


@pytest.fixture
async def server() -> AsyncIterator[ControlServer]:
    with short_dir() as d:
        async with running(os.path.join(d, "control.sock")) as srv:
            yield srv


def exists(path: str) -> bool:
    return os.path.lexists(path)


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


async def connect(server: ControlServer) -> Raw:
    return await Raw.connect(server.path)


# --- calls ---------------------------------------------------------------------------------------


async def test_call_returns_result_with_the_request_id(server: ControlServer) -> None:
    raw = await connect(server)
    for request_id in (1, "abc", 2.5, None):
        reply = await raw.call("v1.echo", {"text": "héllo"}, request_id=request_id)
        assert reply == {"jsonrpc": "2.0", "id": request_id, "result": {"echo": "héllo"}}
    hello = await raw.call("v1.hello")
    assert hello["result"]["server"] == "peerd"
    assert hello["result"]["caller"]["uid"] == os.geteuid()
    assert "v1.echo" in hello["result"]["methods"]
    await raw.close()


async def test_socket_file_is_0660_and_takes_the_configured_group() -> None:
    with short_dir() as d:
        path = os.path.join(d, "control.sock")
        async with running(path):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert st.st_uid == os.geteuid()
            # Nothing else was left behind by the private bind directory.
            assert sorted(os.listdir(d)) == ["control.sock", "control.sock.lock"]
        if os.geteuid() == 0:
            async with running(path, group=4242):
                st = os.lstat(path)
                assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 4242)


async def test_concurrent_calls_on_one_connection_answer_out_of_order(
    server: ControlServer,
) -> None:
    # v1.wait blocks until v1.release runs: if one connection's requests were served one after
    # another, the release would never be read and this would hang.
    raw = await connect(server)
    await raw.send({"jsonrpc": "2.0", "id": "w", "method": "v1.wait"})
    await raw.send({"jsonrpc": "2.0", "id": "r", "method": "v1.release"})
    first, second = await raw.recv(), await raw.recv()
    assert (first["id"], first["result"]) == ("r", "ok")
    assert (second["id"], second["result"]) == ("w", "released")
    await raw.close()


async def test_requests_in_flight_per_connection_are_bounded() -> None:
    started = 0
    most = 0
    gate = asyncio.Event()

    async def block(params: Params, conn: Connection) -> Any:
        nonlocal started, most
        started += 1
        most = max(most, started)
        await gate.wait()
        started -= 1
        return None

    with short_dir() as d:
        async with running(os.path.join(d, "c.sock"), max_inflight=2) as srv:
            srv.register("v1.block", block)
            raw = await connect(srv)
            for i in range(5):
                await raw.send({"jsonrpc": "2.0", "id": i, "method": "v1.block"})
            await raw.wait_for(lambda: started == 2)
            for _ in range(20):  # give a third request every chance to start (it must not)
                await asyncio.sleep(0)
            assert started == 2
            gate.set()
            ids = sorted([(await raw.recv())["id"] for _ in range(5)])
            assert ids == [0, 1, 2, 3, 4]
            assert most == 2
            await raw.close()


async def test_notification_runs_and_gets_no_reply(server: ControlServer) -> None:
    raw = await connect(server)
    await raw.send({"jsonrpc": "2.0", "method": "v1.release"})
    await raw.send({"jsonrpc": "2.0", "method": "v1.no_such_method"})  # errors are silent too
    reply = await raw.call("v1.echo", {"text": "next"}, request_id=7)
    assert reply["id"] == 7  # the first line back answers the request, not the notifications
    assert server.gate.is_set()  # type: ignore[attr-defined]
    await raw.close()


async def test_batch(server: ControlServer) -> None:
    raw = await connect(server)
    await raw.send(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "v1.echo", "params": {"text": "a"}},
            {"jsonrpc": "2.0", "method": "v1.echo", "params": {"text": "notification"}},
            {"jsonrpc": "2.0", "id": 2, "method": "v1.nope"},
            42,
            {"jsonrpc": "2.0", "id": 3, "method": "v1.echo", "params": {"text": "c"}},
        ]
    )
    replies = await raw.recv()
    assert isinstance(replies, list)
    assert len(replies) == 4
    by_id = {r["id"]: r for r in replies if r["id"] is not None}
    assert by_id[1]["result"] == {"echo": "a"}
    assert by_id[2]["error"]["code"] == -32601
    assert by_id[3]["result"] == {"echo": "c"}
    assert [r["error"]["code"] for r in replies if r["id"] is None] == [-32600]

    # A batch of notifications only: no reply at all.
    await raw.send([{"jsonrpc": "2.0", "method": "v1.echo", "params": {"text": "x"}}] * 3)
    assert (await raw.call("v1.echo", {"text": "after"}, request_id=9))["id"] == 9

    await raw.send([])
    empty = await raw.recv()
    assert (empty["id"], empty["error"]["code"]) == (None, -32600)

    await raw.send([{"jsonrpc": "2.0", "id": i, "method": "v1.hello"} for i in range(65)])
    too_big = await raw.recv()
    assert (too_big["id"], too_big["error"]["code"]) == (None, -32600)
    await raw.close()


# --- errors --------------------------------------------------------------------------------------


class QuotaExceeded(PeerdError):
    hint = "free some space"


class NotTrusted(RemoteProtocolError):
    reason = "unknown-peer"


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", -32700),
        (b"\xff\xfe{}", -32700),  # not UTF-8
        (b'{"jsonrpc": "2.0", "id": 1, "method": "v1.hello", "x": NaN}', -32700),
        (b"[" * 100_000 + b"]" * 100_000, -32700),  # nested beyond the parser's recursion
        (b"42", -32600),
        (b'"a string"', -32600),
        (b'{"id": 1, "method": "v1.hello"}', -32600),  # no "jsonrpc": "2.0"
        (b'{"jsonrpc": "1.0", "id": 1, "method": "v1.hello"}', -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "v1.hello", "params": "x"}', -32600),
        (b'{"jsonrpc": "2.0", "id": true, "method": "v1.hello"}', -32600),
        (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "v1.hello"}', -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "v1.hello", "extra": 1}', -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "v1.nope"}', -32601),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "v1.echo"}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "v1.echo", "params": {"text": 5}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "v1.echo", "params": {"txt": "a"}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "v1.echo", "params": ["a"]}', -32602),
    ],
)
async def test_protocol_errors(server: ControlServer, line: bytes, code: int) -> None:
    raw = await connect(server)
    await raw.send(line + b"\n")
    reply = await raw.recv()
    assert reply["jsonrpc"] == "2.0"
    assert reply["error"]["code"] == code
    assert "result" not in reply
    # The connection is still served afterwards.
    assert (await raw.call("v1.echo", {"text": "ok"}))["result"] == {"echo": "ok"}
    assert server.stats()["errors"][str(code)] >= 1
    await raw.close()


async def test_application_errors_carry_type_hint_and_reason(server: ControlServer) -> None:
    async def fail(params: Params, conn: Connection) -> Any:
        kind = require(params, "kind", str)
        if kind == "config":
            raise ConfigError("peerd.toml: [broker] url is missing")
        if kind == "quota":
            raise QuotaExceeded("inbox full")
        if kind == "trust":
            raise NotTrusted("peer abc is unknown", hint="pair first")
        raise UsageError("bad kind")

    server.register("v1.fail", fail)
    raw = await connect(server)
    config = (await raw.call("v1.fail", {"kind": "config"}))["error"]
    assert config["code"] == -32004
    assert config["message"] == "peerd.toml: [broker] url is missing"
    assert config["data"] == {
        "type": "ConfigError",
        "bases": [],
        "hint": ConfigError.hint,
    }
    quota = (await raw.call("v1.fail", {"kind": "quota"}))["error"]
    assert (quota["code"], quota["data"]["type"], quota["data"]["hint"]) == (
        -32000,
        "QuotaExceeded",
        "free some space",
    )
    trust = (await raw.call("v1.fail", {"kind": "trust"}))["error"]
    assert trust["code"] == -32006  # a ProtocolError
    assert trust["data"] == {
        "type": "NotTrusted",
        "bases": ["RemoteProtocolError", "ProtocolError"],
        "hint": "pair first",
        "reason": "unknown-peer",
    }
    assert all(-32099 <= e["code"] <= -32000 for e in (config, quota, trust))
    await raw.close()


async def test_internal_errors_never_put_a_traceback_on_the_wire(
    server: ControlServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash(params: Params, conn: Connection) -> Any:
        raise RuntimeError("secret detail /var/lib/peerd/key")

    async def unserialisable(params: Params, conn: Connection) -> Any:
        return {"when": object()}

    server.register("v1.crash", crash)
    server.register("v1.unserialisable", unserialisable)
    raw = await connect(server)
    for method in ("v1.crash", "v1.unserialisable"):
        reply = await raw.call(method, request_id=method)
        assert reply["id"] == method
        assert reply["error"]["code"] == -32603
        text = json.dumps(reply)
        assert "secret" not in text
        assert "Traceback" not in text
        assert "object at" not in text
    assert "secret detail" in caplog.text  # ... but the daemon's log has it
    assert (await raw.call("v1.echo", {"text": "alive"}))["result"] == {"echo": "alive"}
    await raw.close()


async def test_oversize_line_is_refused_and_the_connection_goes_on(
    server: ControlServer,
) -> None:
    raw = await connect(server)
    other = await connect(server)
    huge = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "v1.echo", "params": {"text": ""}})
    filler = "x" * (MAX_LINE + 10)
    huge = huge.replace('"text": ""', f'"text": "{filler}"')
    # Sent in pieces, interleaved with another client's calls: the server answers both.
    data = huge.encode() + b"\n"
    for i in range(0, len(data), 200_000):
        raw.writer.write(data[i : i + 200_000])
        await raw.writer.drain()
        reply = await other.call("v1.echo", {"text": str(i)}, request_id=i)
        assert reply["result"] == {"echo": str(i)}
    refused = await raw.recv()
    assert (refused["id"], refused["error"]["code"]) == (None, -32600)
    assert "longer than" in refused["error"]["message"]
    # Only one error for the whole line, and the next request on the same connection works.
    assert (await raw.call("v1.echo", {"text": "after"}, request_id=2)) == {
        "jsonrpc": "2.0",
        "id": 2,
        "result": {"echo": "after"},
    }
    # A line of exactly the limit is accepted.
    prefix = '{"jsonrpc":"2.0","id":3,"method":"v1.echo","params":{"text":"'
    suffix = '"}}'
    exact = prefix + "y" * (MAX_LINE - len(prefix) - len(suffix)) + suffix
    assert len(exact) == MAX_LINE
    await raw.send(exact.encode() + b"\n")
    assert (await raw.recv())["id"] == 3
    await raw.close()
    await other.close()


async def test_garbage_connection_is_closed_after_the_bound() -> None:
    with short_dir() as d:
        async with running(os.path.join(d, "c.sock"), max_garbage=5) as srv:
            bad = await Raw.connect(srv.path)
            good = await Raw.connect(srv.path)
            # Valid requests reset the count: 4 bad lines, a good one, 4 bad lines is fine.
            for _ in range(4):
                await bad.send(b"garbage\n")
                assert (await bad.recv())["error"]["code"] == -32700
            assert (await bad.call("v1.echo", {"text": "ok"}))["result"] == {"echo": "ok"}
            for _ in range(4):
                await bad.send(b"\x00\x01\x02\n")
                assert (await bad.recv())["error"]["code"] == -32700
            await bad.send(b"more garbage\n")
            assert (await bad.recv())["error"]["code"] == -32700
            assert await bad.at_eof()
            assert srv.stats()["closed_for_garbage"] == 1
            assert (await good.call("v1.echo", {"text": "still"}))["result"] == {"echo": "still"}
            await bad.close()
            await good.close()


async def test_too_many_connections_are_refused() -> None:
    with short_dir() as d:
        async with running(os.path.join(d, "c.sock"), max_connections=2) as srv:
            a, b = await Raw.connect(srv.path), await Raw.connect(srv.path)
            assert (await a.call("v1.hello"))["result"]["server"] == "peerd"
            assert (await b.call("v1.hello"))["result"]["server"] == "peerd"
            c = await Raw.connect(srv.path)
            refused = await c.recv()
            assert refused["id"] is None
            assert refused["error"]["data"]["type"] == "Overloaded"
            assert await c.at_eof()
            assert srv.stats()["refused"] == {"too-many-connections": 1}
            await a.close()
            await b.wait_for(lambda: len(srv.connections) == 1)
            d2 = await Raw.connect(srv.path)
            assert (await d2.call("v1.hello"))["result"]["server"] == "peerd"
            for r in (b, c, d2):
                await r.close()


# --- subscriptions -------------------------------------------------------------------------------


async def test_subscriptions_deliver_matching_events_only(server: ControlServer) -> None:
    raw = await connect(server)
    sub = (await raw.call("v1.subscribe", {"events": ["session.up"]}))["result"]
    assert sub["events"] == ["session.up"]
    assert server.publish_event("session.down", {"peer": "a"}) == 0
    assert server.publish_event("session.up", {"peer": "b"}) == 1
    note = await raw.recv()
    assert note == {
        "jsonrpc": "2.0",
        "method": EVENT_METHOD,
        "params": {
            "subscription": sub["subscription"],
            "event": "session.up",
            "data": {"peer": "b"},
        },
    }
    assert "id" not in note

    patterns = (await raw.call("v1.subscribe", {"events": ["transfer.*"]}, request_id=2))["result"]
    server.publish_event("transfer.progress", {"done": 1})
    assert (await raw.recv())["params"]["subscription"] == patterns["subscription"]

    filtered = await raw.call(
        "v1.subscribe", {"events": ["message"], "filter": {"channel": "fl"}}, request_id=3
    )
    fid = filtered["result"]["subscription"]
    server.publish_event("message", {"channel": "other", "n": 1})
    server.publish_event("message", {"channel": "fl", "n": 2})
    got = await raw.recv()
    assert (got["params"]["subscription"], got["params"]["data"]["n"]) == (fid, 2)

    assert (await raw.call("v1.unsubscribe", {"subscription": fid}, request_id=4))["result"] == {
        "unsubscribed": True
    }
    server.publish_event("message", {"channel": "fl", "n": 3})
    # The next line is the reply below, not the event for the cancelled subscription.
    assert (await raw.call("v1.echo", {"text": "x"}, request_id=5))["id"] == 5
    await raw.close()


@pytest.mark.parametrize(
    "params",
    [
        {"events": ["no.such.event"]},
        {"events": []},
        {"events": "session.up"},
        {"events": [5]},
        {"events": ["session.up"], "filter": {"a": {"nested": 1}}},
        {"events": ["session.up"], "extra": 1},
    ],
)
async def test_bad_subscriptions_are_invalid_params(
    server: ControlServer, params: dict[str, Any]
) -> None:
    raw = await connect(server)
    assert (await raw.call("v1.subscribe", params))["error"]["code"] == -32602
    await raw.close()


async def test_a_daemon_method_can_subscribe_its_caller(server: ControlServer) -> None:
    # How a `v1.msg.listen {"channel": ...}` would be written by the daemon.
    async def listen(params: Params, conn: Connection) -> Any:
        only(params, "channel")
        sub = conn.subscribe(["message"], {"channel": require(params, "channel", str)})
        return {"subscription": sub.id}

    server.register("v1.listen", listen)
    raw = await connect(server)
    sid = (await raw.call("v1.listen", {"channel": "rounds"}))["result"]["subscription"]
    server.publish_event("message", {"channel": "other"})
    server.publish_event("message", {"channel": "rounds", "body": "go"})
    event = await raw.recv()
    assert event["params"]["subscription"] == sid
    assert event["params"]["data"]["body"] == "go"
    await raw.close()


async def test_slow_subscriber_is_dropped_and_memory_stays_bounded() -> None:
    max_queue = 32
    payload = {"transfer": "t" * 16, "pad": "p" * 1000}
    with short_dir() as d:
        async with running(os.path.join(d, "c.sock"), max_queue=max_queue) as srv:
            slow = await Raw.connect(srv.path)
            await slow.call("v1.subscribe", {"events": ["transfer.progress"]})
            (conn,) = srv.connections
            fast = await Raw.connect(srv.path)
            await fast.call("v1.subscribe", {"events": ["session.up"]})
            published = 0
            # The slow client reads nothing: the kernel buffer, then the transport buffer, then
            # the bounded queue fill up, and the next event drops it.
            while not conn.closed:
                srv.publish_event("transfer.progress", {**payload, "n": published})
                published += 1
                assert conn.queued <= max_queue
                await asyncio.sleep(0)
                assert published < 1_000_000, "never dropped"
            assert conn.max_queued <= max_queue
            stats = srv.stats()
            assert stats["subscribers_dropped"] == 1
            # The other subscriber and ordinary calls are unaffected.
            assert srv.publish_event("session.up", {"peer": "x"}) == 1
            assert (await fast.recv())["params"]["event"] == "session.up"
            assert (await fast.call("v1.echo", {"text": "ok"}, request_id=2))["id"] == 2
            # The slow client finds the events that fitted, then why it was dropped, then EOF.
            received = []
            while True:
                message = await slow.recv()
                if message.get("method") == DROPPED_METHOD:
                    break
                assert message["method"] == EVENT_METHOD
                received.append(message["params"]["data"]["n"])
            assert message["params"]["reason"] == "slow-subscriber"
            assert received == list(range(len(received)))  # in order, no gaps before the drop
            assert len(received) < published
            assert await slow.at_eof()
            await fast.close()
            await slow.close()


# --- socket lifecycle ----------------------------------------------------------------------------


async def test_stale_socket_is_replaced() -> None:
    with short_dir() as d:
        path = os.path.join(d, "control.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # the file stays, nothing listens: what a crashed daemon leaves
        old_inode = os.lstat(path).st_ino
        async with running(path) as srv:
            assert os.lstat(path).st_ino != old_inode
            raw = await Raw.connect(srv.path)
            assert (await raw.call("v1.hello"))["result"]["server"] == "peerd"
            await raw.close()


async def test_live_socket_is_never_replaced() -> None:
    with short_dir() as d:
        path = os.path.join(d, "control.sock")
        async with running(path) as first:
            inode = os.lstat(path).st_ino
            with pytest.raises(ControlError, match="another peerd daemon"):
                await make_server(path).start()
            assert os.lstat(path).st_ino == inode
            raw = await Raw.connect(first.path)
            assert (await raw.call("v1.hello"))["result"]["server"] == "peerd"
            await raw.close()
        # Another program listening on the path (no lock of ours): refused as well.
        foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        foreign.bind(path)
        foreign.listen(1)
        try:
            with pytest.raises(ControlError, match="another process answers") as info:
                await make_server(path).start()
            assert "systemctl stop peerd" in info.value.one_line()
            assert exists(path)
        finally:
            foreign.close()


async def test_a_file_that_is_not_a_socket_is_not_replaced() -> None:
    with short_dir() as d:
        path = os.path.join(d, "control.sock")
        write(path, "precious")
        with pytest.raises(ControlError, match="not a socket"):
            await make_server(path).start()
        assert read(path) == "precious"


async def test_missing_directory_and_overlong_path_are_clear_errors() -> None:
    with pytest.raises(ControlError, match="does not exist"):
        await make_server("/tmp/peerd-no-such-dir/control.sock").start()
    with pytest.raises(ControlError, match="too long"):
        await make_server("/tmp/" + "d" * 120 + "/control.sock").start()


async def test_close_removes_the_socket_and_ends_connections() -> None:
    with short_dir() as d:
        path = os.path.join(d, "control.sock")
        srv = make_server(path)
        await srv.start()
        raw = await Raw.connect(path)
        await raw.call("v1.subscribe", {"events": ["*"]})
        await raw.send({"jsonrpc": "2.0", "id": 2, "method": "v1.wait"})  # in flight
        await srv.close()
        assert not exists(path)
        assert await raw.at_eof()
        await raw.close()
        # The path is free again for the next daemon.
        srv2 = make_server(path)
        await srv2.start()
        raw2 = await Raw.connect(path)
        assert (await raw2.call("v1.hello"))["result"]["server"] == "peerd"
        await raw2.close()
        await srv2.close()


async def test_close_does_not_remove_a_successors_socket() -> None:
    with short_dir() as d:
        path = os.path.join(d, "control.sock")
        srv = make_server(path)
        await srv.start()
        os.unlink(path)  # e.g. an admin cleaned up, and something else now owns the path
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(path)
        try:
            await srv.close()
            assert exists(path)
        finally:
            other.close()


# --- registration and parameter helpers ----------------------------------------------------------


def test_method_names_are_versioned_and_unique() -> None:
    srv = ControlServer("/tmp/unused.sock")

    async def handler(params: Params, conn: Connection) -> Any:
        return None

    for bad in ("status", "V1.status", "v1.", "v1.Status", "v1.status-x", "rpc.discover"):
        with pytest.raises(UsageError):
            srv.register(bad, handler)
    srv.register("v1.msg.send", handler)
    with pytest.raises(UsageError, match="already"):
        srv.register("v1.msg.send", handler)
    with pytest.raises(UsageError, match="already"):
        srv.register("v1.subscribe", handler)
    with pytest.raises(UsageError, match="not registered"):
        srv.publish_event("no.such", {})


def test_param_helpers() -> None:
    params = {"s": "x", "i": 3, "b": True, "f": 2, "l": [1], "n": None}
    assert require(params, "s", str) == "x"
    assert require(params, "i", int) == 3
    assert require(params, "f", float) == 2.0
    assert isinstance(require(params, "f", float), float)
    assert require(params, "b", bool) is True
    assert optional(params, "missing", int) is None
    assert optional(params, "n", int, 7) == 7
    assert optional(params, "i", int, 7) == 3
    with pytest.raises(InvalidParams, match="missing parameter 'n'"):
        require(params, "n", str)
    with pytest.raises(InvalidParams, match="must be an integer"):
        require(params, "b", int)  # JSON true is not a number
    with pytest.raises(InvalidParams, match="must be a string"):
        require(params, "i", str)
    with pytest.raises(InvalidParams, match="'zz'"):
        only({"s": 1, "zz": 2}, "s")
    only({"s": 1}, "s", "t")
