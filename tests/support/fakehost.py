"""An in-memory `peerd.host.Host` for driving extensions without a broker or a daemon.

Real keys (a `Keystore` in a temporary directory) and a real sqlite trust store; the sessions
and the broker are in memory: `FakeHost.transmit` hands an application payload to the other
host's extensions on the next turn of the event loop (as a session would, in order), and
`FakeBroker` delivers a publish to the handlers subscribed to exactly that topic.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerd.config import Config, default_config
from peerd.errors import PeerdError
from peerd.host import Extension
from peerd.keystore import Keystore
from peerd.mqtt import LinkLimits, Message, Topics
from peerd.mqtt.topics import topic_matches
from peerd.store import Store, open_store
from protocol.identity import fingerprint
from protocol.messaging import decode_app


@dataclass(eq=False)
class _Subscription:
    broker: FakeBroker
    topic: str
    handler: Callable[[Message], None]
    closed: bool = False

    async def close(self) -> None:
        self.closed = True
        self.broker.subs[self.topic].remove(self.handler)


@dataclass(eq=False)
class FakeBroker:
    """Publish/subscribe in memory (MQTT filters, wildcards included); `drop` decides which
    publishes are lost."""

    subs: dict[str, list[Callable[[Message], None]]] = field(default_factory=dict)
    published: int = 0
    drop: Callable[[str, bytes], bool] = lambda topic, payload: False

    def deliver(self, topic: str, payload: bytes) -> None:
        self.published += 1
        if self.drop(topic, payload):
            return
        for topic_filter, handlers in list(self.subs.items()):
            if topic_matches(topic_filter, topic):
                for handler in list(handlers):
                    handler(Message(topic, payload, 0, False, False))


class FakeLink:
    """One host's view of the `FakeBroker`."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.limits = LinkLimits(max_packet_size=1 << 20)  # as the real default

    @property
    def connected(self) -> bool:
        return True

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        qos: int = 0,
        retain: bool = False,
    ) -> None:
        self.broker.deliver(topic, bytes(payload))

    async def subscribe(
        self,
        topic_filter: str,
        *,
        qos: int = 1,
        handler: Callable[[Message], None] | None = None,
    ) -> _Subscription:
        assert handler is not None
        self.broker.subs.setdefault(topic_filter, []).append(handler)
        return _Subscription(self.broker, topic_filter, handler)

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        return None

    async def settled(self, timeout: float) -> LinkLimits:  # noqa: ASYNC109
        return self.limits  # nothing to probe: the fake broker carries every size

    def reprobe(self) -> None:
        self.reprobes = getattr(self, "reprobes", 0) + 1


class FakeHost:
    """A node: real keys and store, in-memory sessions (`pair`) and broker."""

    def __init__(self, config: Config, keys: Keystore, store: Store, broker: FakeBroker) -> None:
        self.config = config
        self.keys = keys
        self.store = store
        self.link = FakeLink(broker)
        self.topics = Topics(config.node.network)
        self.extensions: list[Extension] = []
        self.sessions: dict[str, FakeHost] = {}  # peer id -> the host at the other end
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.rejections: Counter[str] = Counter()
        self.connects: list[str] = []
        self.revocations: list[bytes] = []
        self.stopped = False
        self.stopped_with: PeerdError | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deferred: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self._worker = self.spawn(self._work(), name="deferred")

    @classmethod
    async def create(
        cls, directory: Path, broker: FakeBroker, name: str, *, direct_writes: bool = True
    ) -> FakeHost:
        config = default_config(
            directory,
            {"node": {"name": name, "network": "lab"}, "receive": {"direct_writes": direct_writes}},
        )
        config.node.inbox_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        keys = Keystore.create(config.keys.dir, now=now, certificate_days=30)
        store = await open_store(config, create=True)
        await store.init_identity(
            peer_id=keys.peer_id,
            name=name,
            identity_public=keys.identity_public,
            certificate=keys.certificate,
            now=now,
        )
        return cls(config, keys, store, broker)

    @property
    def peer_id(self) -> str:
        return self.keys.peer_id

    # -- Host --------------------------------------------------------------------------------

    def transmit(self, peer: str, payload: bytes) -> bool:
        other = self.sessions.get(peer)
        if other is None:
            return False
        app = decode_app(payload)
        asyncio.get_running_loop().call_soon(other.on_app, self.peer_id, app)
        return True

    def connect(self, peer: str) -> None:
        self.connects.append(peer)

    def connected_peers(self) -> list[str]:
        return list(self.sessions)

    def has_trusted_session(self, peer: str) -> bool:
        return peer in self.sessions and self.store.view().is_trusted(peer)

    def identity_changed(self, *, rehandshake: bool) -> None:
        return None

    def publish_event(self, name: str, payload: Mapping[str, Any]) -> None:
        self.events.append((name, dict(payload)))

    def publish_revocation(self, statement: bytes) -> None:
        self.revocations.append(statement)

    def count_rejection(self, reason: str, message: str | None = None, *args: object) -> None:
        self.rejections[reason] += 1

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def defer(self, work: Callable[[], Awaitable[None]]) -> bool:
        self._deferred.put_nowait(work)
        return True

    def stop(self, error: PeerdError | None = None) -> None:
        self.stopped = True
        self.stopped_with = error

    # -- the test's side ---------------------------------------------------------------------

    def on_app(self, peer: str, app: Any) -> None:
        for ext in self.extensions:
            ext.on_app(peer, app)

    async def _work(self) -> None:
        while True:
            work = await self._deferred.get()
            await work()

    async def close(self) -> None:
        for ext in self.extensions:
            await ext.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()


async def pair(a: FakeHost, b: FakeHost) -> None:
    """Each trusts the other (as a compared fingerprint and a first handshake would make it)
    and has a session with it."""
    now = time.time()
    for me, other in ((a, b), (b, a)):
        await me.store.add_pending(other.peer_id, fingerprint(other.keys.identity_public), now=now)
        auth = me.store.view().authenticate(other.keys.credentials(), other.keys.static.public, now)
        await me.store.record_authenticated(auth, now=now)
        me.sessions[other.peer_id] = other
    for me, other in ((a, b), (b, a)):
        for ext in me.extensions:
            await ext.session_up(other.peer_id)
