"""peerd.client.SyncClient: blocking calls and subscriptions, with the server on its own loop
in another thread (as a daemon would be in another process)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from peerd.client import Client, ConnectionLost, DaemonNotRunning, SyncClient, Timeout
from peerd.control import ControlServer, MethodNotFound
from peerd.errors import ConfigError
from tests.peerd.test_control_support import make_server, short_dir

T = TypeVar("T")


class ServerThread:
    """A control server running on an event loop of its own thread."""

    def __init__(self, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: ControlServer = self.run(self._start(path))

    async def _start(self, path: str) -> ControlServer:
        server = make_server(path)

        async def fail(params: dict[str, Any], conn: Any) -> Any:
            raise ConfigError("no broker configured")

        async def forever(params: dict[str, Any], conn: Any) -> Any:
            await asyncio.Event().wait()

        server.register("v1.fail", fail)
        server.register("v1.forever", forever)
        await server.start()
        return server

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def in_loop() -> T:
            return fn(*args)

        result: T = self.run(in_loop())
        return result

    def publish(self, name: str, payload: Any) -> int:
        return self.call(self.server.publish_event, name, payload)

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def daemon() -> Iterator[ServerThread]:
    with short_dir() as d:
        thread = ServerThread(os.path.join(d, "control.sock"))
        try:
            yield thread
        finally:
            thread.stop()


def test_blocking_calls(daemon: ServerThread) -> None:
    with SyncClient(daemon.server.path) as client:
        assert client.server_info["server"] == "peerd"
        assert client.call("v1.echo", text="sync") == {"echo": "sync"}
        assert client.request("v1.echo", {"text": "req"}) == {"echo": "req"}
        assert client.call_as(dict, "v1.echo", text="t") == {"echo": "t"}
        with pytest.raises(ConfigError, match="no broker"):
            client.call("v1.fail")
        with pytest.raises(MethodNotFound):
            client.call("v1.absent")
        with pytest.raises(Timeout):
            client.request("v1.forever", timeout=0.05)
        client.notify("v1.echo", text="n")
        assert client.call("v1.echo", text="still") == {"echo": "still"}
    assert client.closed
    client.close()  # closing twice is harmless


def test_typed_methods_of_client_are_mirrored(
    daemon: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Typed one-liners added to Client later appear on SyncClient without being written twice.
    async def shout(self: Client, text: str) -> str:
        result = await self.call_as(dict, "v1.echo", text=text)
        return str(result["echo"]).upper()

    monkeypatch.setattr(Client, "shout", shout, raising=False)
    with SyncClient(daemon.server.path) as client:
        assert client.shout("quiet") == "QUIET"
        with pytest.raises(AttributeError):
            _ = client.no_such_method
        with pytest.raises(AttributeError):
            _ = client._reader_task


def test_blocking_subscription(daemon: ServerThread) -> None:
    with SyncClient(daemon.server.path) as client:
        with client.subscribe(["session.*"]) as events:
            assert events.id is not None
            daemon.publish("session.up", {"peer": "a"})
            daemon.publish("trust.changed", {"peer": "a"})
            daemon.publish("session.down", {"peer": "a"})
            received = []
            for event in events:
                received.append((event.name, event.data))
                if len(received) == 2:
                    break
            assert received == [("session.up", {"peer": "a"}), ("session.down", {"peer": "a"})]
            with pytest.raises(Timeout):
                events.get(timeout=0.05)
        assert daemon.call(lambda: daemon.server.stats()["subscriptions"]) == 0


def test_daemon_going_away_ends_blocking_iteration(daemon: ServerThread) -> None:
    client = SyncClient(daemon.server.path)
    with client.subscribe("message") as events:
        daemon.run(daemon.server.close())
        with pytest.raises(ConnectionLost):
            next(iter(events))
    with pytest.raises(ConnectionLost):
        client.call("v1.echo", text="x")
    client.close()


def test_not_running() -> None:
    with short_dir() as d:
        with pytest.raises(DaemonNotRunning, match="no socket"):
            SyncClient(os.path.join(d, "control.sock"))
        # The failed constructor left no loop thread behind.
        assert not [t for t in threading.enumerate() if t.name == "peerd-client-loop"]


async def test_usable_where_an_event_loop_already_runs(daemon: ServerThread) -> None:
    # As in a Jupyter notebook: this thread's loop is busy running this very coroutine.
    with SyncClient(daemon.server.path) as client:
        assert client.call("v1.echo", text="notebook") == {"echo": "notebook"}


def test_blocking_messages_acknowledge_after_the_loop_body(daemon: ServerThread) -> None:
    # The daemon's side of v1.msg.recv / v1.msg.ack as its tests pin it: every unacknowledged
    # message of the channel, oldest first; an ack removes ids.
    inbox = [
        {"id": i, "peer": "p", "channel": "fl", "seq": i, "data_b64": data}
        for i, data in ((1, "b25l"), (2, "dHdv"), (3, "dGhyZWU="))
    ]
    acked: list[int] = []

    async def recv(params: dict[str, Any], conn: Any) -> Any:
        assert params["channel"] == "fl"
        return [m for m in inbox if m["id"] not in acked]

    async def ack(params: dict[str, Any], conn: Any) -> Any:
        acked.extend(params["ids"])
        return {"acked": len(params["ids"])}

    daemon.call(daemon.server.register, "v1.msg.recv", recv)
    daemon.call(daemon.server.register, "v1.msg.ack", ack)
    with SyncClient(daemon.server.path) as client:
        seen = []
        for message in client.messages("fl"):
            seen.append((message.seq, message.data, list(acked)))
            if len(seen) == 2:
                break  # the body did not finish for message 2: it stays unacknowledged
        assert seen == [(1, b"one", []), (2, b"two", [1])]
        assert acked == [1]
        again = []
        for message in client.messages("fl"):
            again.append(message.data)
            if message.seq == 3:
                break
        assert again == [b"two", b"three"]
        assert acked == [1, 2]
