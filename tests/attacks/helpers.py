"""Support for attacks on running daemons: fast control calls, a raw MQTT client for rogue
traffic, a rogue peer that speaks the session protocol with whatever keys it is given, frame
surgery, and the daemon's resident memory.

Everything here talks to real daemons (`tests/support/cluster.py`) through a real Mosquitto,
possibly behind the hostile proxy (`tests/support/hostile.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from peerd.client import SyncClient
from peerd.errors import PeerdError
from peerd.keystore import Keystore
from peerd.mqtt import BrokerQueueFull, BrokerSettings, Message, MqttLink, Topics, statement_id
from protocol import frames
from protocol.identity import issue_revocation, new_identity_seed, peer_id_for
from protocol.noise import KeyPair
from protocol.session import Message as SessionMessage
from protocol.session import (
    Output,
    SendFrame,
    SessionLimits,
    SessionManager,
    SessionUp,
)
from protocol.transfer import Offer, decode_message
from tests.support.cluster import Node, wait_until

T = TypeVar("T")

# Generous: what must happen does, even on a loaded CI machine; nothing measures speed.
SOON = 30.0


# -- control calls ----------------------------------------------------------------------------


class Api:
    """Control calls to a node's daemon over one kept connection (the CLI costs a Python start
    per call). Reconnects after the daemon restarted."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._client: SyncClient | None = None

    def call(self, method: str, **params: Any) -> Any:
        # A call that waits on the daemon's side (`timeout` param) gets that long and more.
        limit = SOON + float(params.get("timeout") or 0.0)
        for attempt in (1, 2):
            if self._client is None:
                self._client = SyncClient(socket_path=self.node.socket, timeout=SOON)
            try:
                return self._client.request(method, params, timeout=limit)
            except PeerdError:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("v1.status")
        return result

    def rejections(self) -> dict[str, int]:
        result: dict[str, int] = self.status()["rejections"]
        return result

    def rejected(self, label: str) -> int:
        return self.rejections().get(label, 0)

    def wait_rejected(self, label: str, at_least: int = 1, timeout: float = SOON) -> int:
        return int(
            wait_until(
                lambda: self.rejected(label) >= at_least and self.rejected(label),
                timeout,
                what=f"{self.node.name} to count {at_least} x {label!r} (has {self.rejections()})",
            )
        )

    def connected(self, peer: Node) -> bool:
        return any(p["peer"] == peer.peer_id and p["connected"] for p in self.call("v1.peers"))

    def handshakes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("v1.handshakes")
        return result

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except PeerdError:
                pass
            self._client = None


def rss(node: Node) -> int:
    """The daemon's resident set size in bytes (Linux /proc)."""
    assert node.proc is not None
    with open(f"/proc/{node.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def behind(proxy_url: str, broker_url: str, *nodes: Node) -> None:
    """Point nodes (before they start) at the hostile proxy instead of the broker."""
    for node in nodes:
        node.config.write_text(node.config.read_text().replace(broker_url, proxy_url))
        node.broker_url = proxy_url


def keys(node: Node, *, copy_to: Path | None = None) -> Keystore:
    """The node's keys as they are on disk now (optionally copied first: a stolen backup)."""
    directory = node.dir / "keys"
    if copy_to is not None:
        import shutil  # noqa: PLC0415

        shutil.copytree(directory, copy_to)
        directory = copy_to
    return Keystore.load(directory, now=time.time())


# -- frame surgery ------------------------------------------------------------------------------


def frame_type(payload: bytes) -> int | None:
    """The inbox frame type (1 HELLO .. 5 DATA), or None for something that is not a frame."""
    return payload[1] if len(payload) >= 2 and payload[0] == frames.VERSION else None


def with_reply_to(hello: bytes, peer_id: str) -> bytes:
    """The HELLO claiming another reply peer (same length: peer ids are 20 characters)."""
    frame = frames.decode(hello)
    assert isinstance(frame, frames.Hello)
    return frames.encode_hello(frame.sender_index, peer_id, frame.noise, frame.invite_id)


# -- a raw MQTT client on a loop of its own ----------------------------------------------------


class Wire:
    """An MQTT client for rogue traffic, with any client id, running in a thread of its own.
    It can publish anything (up to `max_packet` bytes) anywhere the broker lets it."""

    def __init__(
        self,
        broker_url: str,
        *,
        client_id: str | None = None,
        max_packet: int = 4 << 20,
        password: str | None = None,
    ):
        # With a password, the client id is also the username (the shipped broker's accounts).
        client_id = client_id or "rogue" + secrets.token_hex(6)
        settings = BrokerSettings.from_url(
            broker_url,
            client_id=client_id,
            username=client_id if password is not None else None,
            password=password,
        )
        self.settings = dataclasses.replace(settings, max_packet_size=max_packet)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.link = MqttLink(self.settings, max_queued=100_000, max_queued_bytes=1 << 30)
        self.received: list[Message] = []
        self.run(self._start())

    async def _start(self) -> None:
        await self.link.__aenter__()
        await self.link.wait_connected(timeout=SOON)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def go() -> T:
            return fn()

        return self.run(go())

    def subscribe(self, topic: str, handler: Callable[[Message], None] | None = None) -> None:
        async def go() -> None:
            await self.link.subscribe(topic, qos=0, handler=handler or self.received.append)

        self.run(go())

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        async def go() -> None:
            await self.link.publish(topic, payload, qos=qos, retain=retain, timeout=SOON)

        self.run(go())

    def flood(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """Publish as fast as the link takes them (QoS 0); returns how many."""

        async def go() -> int:
            n = 0
            for topic, payload in messages:
                while True:
                    try:
                        self.link.publish_nowait(topic, payload, qos=0)
                        break
                    except BrokerQueueFull:
                        await asyncio.sleep(0.005)
                n += 1
                if n % 256 == 0:
                    await asyncio.sleep(0)
            await self.link.drain(timeout=SOON * 4)
            return n

        return self.run(go(), timeout=600)

    def close(self) -> None:
        try:
            self.run(self.link.close(), timeout=SOON)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


# -- a rogue peer -----------------------------------------------------------------------------


class _AcceptAnyone:
    """A rogue's trust policy: whoever answers is fine."""

    def authenticate(self, credentials: bytes, remote_static: bytes, now: float, **_: Any) -> Any:
        from protocol.identity import Credentials  # noqa: PLC0415

        return type("Peer", (), {"peer_id": Credentials.decode(credentials).certificate.peer_id})()

    def refuse_hello(self, peer_id: str) -> str | None:
        return None

    def invite_psk(self, invite_id: bytes, now: float) -> bytes | None:
        return None

    def closed_invite(self, invite_id: bytes) -> str | None:
        return None


class Rogue:
    """A participant that speaks the session protocol with the identity it is given: any
    claimed peer id, any static key pair (even one whose private half does not match its
    public half), any credentials bytes. It listens on the claimed peer's inbox (the test
    broker has no ACL) through a client id of its own, so the real node stays connected."""

    def __init__(
        self,
        broker_url: str,
        *,
        network: str,
        claim: str,
        static: KeyPair,
        credentials: bytes,
        client_id: str | None = None,
        prologue: bytes | None = None,
    ) -> None:
        self.topics = Topics(network)
        self.manager = SessionManager(
            peer_id=claim,
            network=network,
            static=static,
            credentials=credentials,
            trust=_AcceptAnyone(),
            limits=SessionLimits(handshake_timeout=1.0, handshake_attempts=2),
        )
        if prologue is not None:  # another protocol version, network or suite
            self.manager._prologue = prologue
        self.outputs: list[Output] = []
        self.messages: list[tuple[str, bytes]] = []
        self.on_message: Callable[[str, bytes], None] | None = None
        self.wire = Wire(broker_url, client_id=client_id)
        self.wire.subscribe(self.topics.inbox(claim), self._inbox)
        self.wire.call(self._arm_timer)

    @classmethod
    def of(cls, node: Node, broker_url: str, keystore: Keystore, **kw: Any) -> Rogue:
        """A rogue holding `keystore` (a stolen copy of a node's keys)."""
        return cls(
            broker_url,
            network=node.network,
            claim=keystore.peer_id,
            static=keystore.static,
            credentials=keystore.credentials(),
            **kw,
        )

    def _arm_timer(self) -> None:
        self._handle(self.manager.on_timer(time.time()))
        self.wire.loop.call_later(0.1, self._arm_timer)

    def _inbox(self, msg: Message) -> None:
        self._handle(self.manager.receive(msg.payload, time.time()))

    def _handle(self, outputs: list[Output]) -> None:
        for out in outputs:
            self.outputs.append(out)
            if isinstance(out, SendFrame):
                self.wire.link.publish_nowait(self.topics.inbox(out.peer_id), out.frame)
            elif isinstance(out, SessionMessage):
                self.messages.append((out.peer_id, out.payload))
                if self.on_message is not None:
                    self.on_message(out.peer_id, out.payload)

    def connect(self, target: str) -> None:
        """A fresh handshake with `target` (whatever the last attempt left behind)."""

        def go() -> None:
            now = time.time()
            self.manager.close(target, "again", now, notify=False)
            self._handle(self.manager.connect(target, now))

        self.wire.call(go)

    def send(self, peer: str, payload: bytes) -> None:
        self.wire.call(lambda: self._handle(self.manager.send(peer, payload, time.time())))

    def sessions_up(self) -> list[SessionUp]:
        return [o for o in list(self.outputs) if isinstance(o, SessionUp)]

    def close(self) -> None:
        self.wire.close()


def catch_offer(rogue: Rogue) -> list[Offer]:
    """The first transfer Offer the rogue receives, once it has (a list: empty until then).
    An Offer carries the content key: a rogue receiver can then forge or refuse chunks."""
    offers: list[Offer] = []

    def on_message(peer: str, payload: bytes) -> None:
        message = decode_message(payload)
        if isinstance(message, Offer) and not offers:
            offers.append(message)

    rogue.on_message = on_message
    return offers


def responder(
    node: Node, *, claim: str, static: KeyPair, credentials: bytes, prologue: bytes | None = None
) -> SessionManager:
    """A rogue responder for a man in the middle (driven synchronously, e.g. inside a proxy
    `Rewrite`): answers a HELLO with a REPLY made with the given identity."""
    manager = SessionManager(
        peer_id=claim,
        network=node.network,
        static=static,
        credentials=credentials,
        trust=_AcceptAnyone(),
    )
    if prologue is not None:
        manager._prologue = prologue
    return manager


def counted(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What was counted between two snapshots of `rejections`."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}


def statement_topic(node: Node, issuer: str, statement: bytes) -> str:
    return Topics(node.network).revocation(issuer, statement)


def state_dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- revocation statements a rogue account retains ---------------------------------------------


def made_up_peer_id(seed: bytes | None = None) -> str:
    """The peer id of an identity key nobody met (of `seed`, or a fresh one)."""
    from nacl.signing import SigningKey  # noqa: PLC0415

    return peer_id_for(SigningKey(seed or new_identity_seed()).verify_key.encode())


class RevocationJunk:
    """What one account can retain under its own `rev/<name>/`, until `stop` is set (and at
    least `at_least` messages went out; or take a burst with itertools.islice): random
    bytes (wrong statement id), junk under its right id, statements of made-up identities
    (wrong issuer) and statements of itself signed by keys nobody knows (they pass every cheap
    check)."""

    def __init__(
        self,
        network: str,
        publisher: str,
        seed: int,
        *,
        at_least: int = 0,
        rate: float | None = None,
    ) -> None:
        self.prefix = f"{Topics(network).prefix}rev/{publisher}/"
        self.at_least = at_least
        self.rate = rate  # messages per second at most (None: as fast as the link takes them)
        self.rng = random.Random(seed)
        now = time.time()
        self.own = [
            issue_revocation(
                new_identity_seed(), peer_id=publisher, kind="identity", now=now
            ).encode()
            for _ in range(400)
        ]
        # Self-signed statements of made-up identities: each verifies, and a node would keep
        # it (up to its limit of revocations of peers never met) if it took them from anyone.
        self.others = []
        for _ in range(50):
            seed = new_identity_seed()
            made_up = made_up_peer_id(seed)
            self.others.append(
                issue_revocation(seed, peer_id=made_up, kind="identity", now=now).encode()
            )
        self.sent = 0
        self.stop = threading.Event()

    def _topic(self, payload: bytes) -> str:
        return self.prefix + statement_id(payload)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        rng = self.rng
        started = time.monotonic()
        while self.sent < 2_000_000 and not (self.stop.is_set() and self.sent >= self.at_least):
            if self.rate is not None and self.sent % 256 == 0:
                # Paced in the flooding thread itself (Wire.flood yields every 256 messages).
                ahead = self.sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            kind = self.sent % 4
            if kind == 0:
                yield self.prefix + rng.randbytes(16).hex(), rng.randbytes(rng.randrange(1, 200))
            elif kind == 1:
                junk = b"\x98" + rng.randbytes(rng.randrange(1, 200))
                yield self._topic(junk), junk
            elif kind == 2:
                other = self.others[self.sent % len(self.others)]
                yield self._topic(other), other
            else:
                own = self.own[(self.sent // 4) % len(self.own)]
                yield self._topic(own), own
            self.sent += 1
