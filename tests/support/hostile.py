"""A hostile broker for tests: an MQTT-parsing TCP proxy in front of a real Mosquitto.

Clients (daemons, usually subprocesses) connect to the proxy's port; the proxy connects each one
to the real broker and forwards both directions byte for byte, except PUBLISH packets that match
a rule of the test's script, which it can drop, delay, duplicate, hold and release (reorder),
swap with a neighbour, bit-flip, truncate, mutate, rewrite (into any packets on any topics:
`Rewrite`, e.g. a man in the middle), record for replay, or swap the payloads between two
topics (`swap_payloads`) or across any two topics matching a filter (`swap_across`). It can
also inject forged PUBLISH packets toward a client or the broker,
replay recorded ones (in the same connection, after the client reconnected, or after the broker
restarted), cut every connection at once, or stall them all (`freeze_connections`: nothing
passes, nothing closes).

The MQTT stream stays valid, so a test measures the daemon's behaviour and not a broken
connection: a dropped QoS 1 PUBLISH is acknowledged to its sender by the proxy (unless the rule
says `Drop(ack=False)`), and everything the proxy adds - duplicates, injections, replays - goes
out at QoS 0, which needs no packet id and no acknowledgement. Held and delayed packets keep their
packet id; their sender keeps waiting for the PUBACK, as it would behind a slow broker.

    async with HostileProxy(broker.port) as proxy:            # in a pytest-asyncio test
        proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", BitFlip(count=1), skip=3, count=1)
        ... start a daemon with proxy.url as its broker ...
        assert proxy.stats["flipped"] == 1

    with HostileProxy(broker.port) as proxy:                  # from a sync test: runs in a thread
        rule = proxy.add_rule(TO_BROKER, "peerd/v1/+/in/#", Hold())
        ...
        proxy.release(rule, order="reverse")

This parser is written independently of protocol/mqtt/ on purpose: a shared bug would hide itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, TypeVar

__all__ = [
    "TO_BROKER",
    "TO_CLIENT",
    "Action",
    "BitFlip",
    "Delay",
    "Direction",
    "Drop",
    "Duplicate",
    "Hold",
    "HostileProxy",
    "Mutate",
    "Packet",
    "Record",
    "Rewrite",
    "Rule",
    "SwapAcrossTopics",
    "SwapAdjacent",
    "SwapPayloads",
    "Truncate",
]

Direction = Literal["to_broker", "to_client"]
TO_BROKER: Direction = "to_broker"
TO_CLIENT: Direction = "to_client"
_OTHER: dict[Direction, Direction] = {TO_BROKER: TO_CLIENT, TO_CLIENT: TO_BROKER}
T = TypeVar("T")


def topic_matches(topic_filter: str, topic: str) -> bool:
    if topic_filter == "#":
        return not topic.startswith("$")
    f = topic_filter.split("/")
    t = topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or level not in ("+", t[i]):
            return False
    return len(f) == len(t)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet off a stream: its first byte and its body."""
    first = (await reader.readexactly(1))[0]
    length = shift = 0
    while True:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    return first, await reader.readexactly(length)


def _puback(mid: int) -> bytes:
    return b"\x40\x02" + mid.to_bytes(2, "big")


@dataclasses.dataclass
class Packet:
    """A PUBLISH the proxy saw (or will send). `raw` is its exact bytes until it is changed."""

    direction: Direction
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    mid: int | None = None
    client_id: str | None = None
    session: int = 0  # which client connection (1, 2, ... in accept order) it travelled in
    at: float = 0.0  # time.monotonic() when the proxy read it
    raw: bytes | None = dataclasses.field(default=None, repr=False)

    def changed(self, **fields: Any) -> Packet:
        """A copy with some fields replaced, to be re-encoded."""
        return dataclasses.replace(self, raw=None, **fields)

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        topic = self.topic.encode()
        body = len(topic).to_bytes(2, "big") + topic
        if self.qos:
            assert self.mid is not None
            body += self.mid.to_bytes(2, "big")
        body += self.payload
        first = 0x30 | (self.dup << 3) | (self.qos << 1) | self.retain
        return bytes((first,)) + _varint(len(body)) + body

    def as_qos0(self) -> Packet:
        return self.changed(qos=0, mid=None, dup=False)


# --- actions ------------------------------------------------------------------------------------


class Action:
    """What a rule does to a matching packet: returns the packets to pass on now, in order."""

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        raise NotImplementedError


@dataclasses.dataclass
class Drop(Action):
    """Drop it. With `ack` a QoS 1 packet is acknowledged to its sender, as if delivered."""

    ack: bool = True

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        proxy.stats["dropped"] += 1
        if self.ack and pkt.qos == 1 and pkt.mid is not None:
            proxy._send_raw(pkt.session, _OTHER[pkt.direction], _puback(pkt.mid))
            proxy.stats["acked"] += 1
        return []


@dataclasses.dataclass
class Delay(Action):
    """Pass it on after `seconds`; packets behind it are not held up (so this also reorders)."""

    seconds: float

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        proxy.stats["delayed"] += 1
        proxy._later(self.seconds, pkt)
        return []


@dataclasses.dataclass
class Duplicate(Action):
    """Pass it on, then `copies` more copies (at QoS 0, so no packet id is reused)."""

    copies: int = 1

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        proxy.stats["duplicated"] += self.copies
        return [pkt] + [pkt.as_qos0() for _ in range(self.copies)]


@dataclasses.dataclass
class Hold(Action):
    """Hold it until `HostileProxy.release(rule, ...)` (in any order) or forever."""

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        proxy.stats["held"] += 1
        rule.held.append(pkt)
        return []


@dataclasses.dataclass
class SwapAdjacent(Action):
    """Hold a matching packet until the next one matches, then pass the later one first.

    A packet left alone is released after `timeout` seconds.
    """

    timeout: float = 1.0
    _waiting: Packet | None = dataclasses.field(default=None, repr=False)
    _timer: asyncio.TimerHandle | None = dataclasses.field(default=None, repr=False)

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        if self._waiting is None:
            self._waiting = pkt
            self._timer = proxy._loop_call_later(self.timeout, self._expire, proxy)
            return []
        first, self._waiting = self._waiting, None
        if self._timer is not None:
            self._timer.cancel()
        proxy.stats["swapped"] += 1
        return [pkt, first]

    def _expire(self, proxy: HostileProxy) -> None:
        if self._waiting is not None:
            pkt, self._waiting = self._waiting, None
            proxy._forward(pkt)


@dataclasses.dataclass
class SwapPayloads(Action):
    """Pair a packet on `topic_a` with the next on `topic_b` (same direction) and swap payloads.

    Use `HostileProxy.swap_payloads()`, which builds the rule matching both filters. Each packet
    keeps its own topic, QoS and packet id. One left unpaired is released after `timeout`.
    """

    topic_a: str
    topic_b: str
    timeout: float = 2.0
    _waiting: dict[str, Packet] = dataclasses.field(default_factory=dict, repr=False)

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        side = "a" if topic_matches(self.topic_a, pkt.topic) else "b"
        other = "b" if side == "a" else "a"
        partner = self._waiting.pop(other, None)
        if partner is None:
            if side in self._waiting:  # a second one on the same side: pass the first on
                proxy._forward(self._waiting.pop(side))
            self._waiting[side] = pkt
            proxy._loop_call_later(self.timeout, self._expire, proxy, pkt)
            return []
        proxy.stats["swapped"] += 1
        return [partner.changed(payload=pkt.payload), pkt.changed(payload=partner.payload)]

    def _expire(self, proxy: HostileProxy, pkt: Packet) -> None:
        for side, waiting in list(self._waiting.items()):
            if waiting is pkt:
                del self._waiting[side]
                proxy._forward(pkt)


@dataclasses.dataclass
class SwapAcrossTopics(Action):
    """Pair a packet with the next one on a *different* topic matching the rule (two transfers'
    chunk topics, whatever their names) and swap their payloads. Use
    `HostileProxy.swap_across()`. One left unpaired is released after `timeout`."""

    timeout: float = 1.0
    pairs: int | None = None  # swap at most this many pairs, then pass everything on
    _waiting: Packet | None = dataclasses.field(default=None, repr=False)

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        if self.pairs is not None and self.pairs <= 0:
            return [pkt]
        first = self._waiting
        if first is None or first.topic == pkt.topic:
            if first is not None:
                proxy._forward(first)
            self._waiting = pkt
            proxy._loop_call_later(self.timeout, self._expire, proxy, pkt)
            return []
        self._waiting = None
        proxy.stats["swapped"] += 1
        if self.pairs is not None:
            self.pairs -= 1
        return [first.changed(payload=pkt.payload), pkt.changed(payload=first.payload)]

    def _expire(self, proxy: HostileProxy, pkt: Packet) -> None:
        if self._waiting is pkt:
            self._waiting = None
            proxy._forward(pkt)


@dataclasses.dataclass
class BitFlip(Action):
    """Flip bits of the payload: at `positions` (byte offsets, negative from the end; the bit
    given by `bit`) or else at `count` random byte offsets and bits (seeded by the proxy)."""

    positions: Iterable[int] | None = None
    count: int = 1
    bit: int | None = None

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        if not pkt.payload:
            return [pkt]
        data = bytearray(pkt.payload)
        rng = proxy.rng
        if self.positions is not None:
            offsets = [p % len(data) for p in self.positions]
        else:
            offsets = [rng.randrange(len(data)) for _ in range(self.count)]
        for off in offsets:
            bit = self.bit if self.bit is not None else rng.randrange(8)
            data[off] ^= 1 << bit
            proxy.stats["flipped"] += 1
        return [pkt.changed(payload=bytes(data))]


@dataclasses.dataclass
class Truncate(Action):
    """Keep the first `keep` payload bytes, or else cut `cut` bytes off its end."""

    keep: int | None = None
    cut: int = 1

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        n = self.keep if self.keep is not None else max(0, len(pkt.payload) - self.cut)
        proxy.stats["truncated"] += 1
        return [pkt.changed(payload=pkt.payload[:n])]


@dataclasses.dataclass
class Mutate(Action):
    """Replace the payload by `fn(payload)` (a forged or re-signed frame, say)."""

    fn: Callable[[bytes], bytes]

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        proxy.stats["mutated"] += 1
        return [pkt.changed(payload=self.fn(pkt.payload))]


@dataclasses.dataclass
class Rewrite(Action):
    """Replace the packet by whatever `fn(proxy, packet)` returns: zero or more packets, on any
    topic (`packet.changed(topic=..., payload=...)`), passed on in the packet's connection. `fn`
    may also `inject` answers elsewhere: a man in the middle that terminates a handshake, say.
    It runs on the proxy's loop; exceptions it raises drop the packet and are kept in
    `HostileProxy.errors` for the test to check."""

    fn: Callable[[HostileProxy, Packet], list[Packet]]

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        proxy.stats["rewritten"] += 1
        try:
            return list(self.fn(proxy, pkt))
        except Exception as exc:
            proxy.errors.append(exc)
            return []


@dataclasses.dataclass
class Record(Action):
    """Pass it on unchanged and keep a copy in `HostileProxy.recorded` (for `replay`)."""

    def apply(self, proxy: HostileProxy, rule: Rule, pkt: Packet) -> list[Packet]:
        proxy.stats["recorded"] += 1
        proxy.recorded.append(pkt)
        return [pkt]


@dataclasses.dataclass
class Rule:
    """Applies `action` to PUBLISH packets going `direction` on topics matching `topic`.

    `client` restricts it to one client id; `where(packet)` is an extra predicate. The first
    `skip` matches pass untouched; then at most `count` (None: all) get the action.
    """

    direction: Direction | Literal["both"]
    topic: str
    action: Action
    where: Callable[[Packet], bool] | None = None
    client: str | None = None
    skip: int = 0
    count: int | None = None
    matched: int = 0  # packets that matched (including skipped ones)
    applied: int = 0  # packets the action was applied to
    held: list[Packet] = dataclasses.field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.count is None or self.applied < self.count

    def matches(self, pkt: Packet) -> bool:
        return (
            (self.direction == "both" or self.direction == pkt.direction)
            and (self.client is None or self.client == pkt.client_id)
            and topic_matches(self.topic, pkt.topic)
            and (self.where is None or self.where(pkt))
        )


# --- connections --------------------------------------------------------------------------------


class _Side(asyncio.Protocol):
    """One TCP side of a proxied connection: the client's or the broker's."""

    def __init__(self, session: _Session, direction: Direction) -> None:
        # `direction`: where the bytes this side receives go.
        self.session = session
        self.direction = direction
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.session.side_up(self)

    def data_received(self, data: bytes) -> None:
        self.session.feed(self.direction, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.side_down(self)

    def pause_writing(self) -> None:
        self.session.pause_from(_OTHER[self.direction])

    def resume_writing(self) -> None:
        self.session.resume_from(_OTHER[self.direction])


class _Session:
    """A client connection and its connection to the broker."""

    def __init__(self, proxy: HostileProxy, index: int) -> None:
        self.proxy = proxy
        self.index = index
        self.client_id: str | None = None
        self.sides: dict[Direction, _Side] = {}  # keyed by the direction its writes go
        self.early: list[bytes] = []  # client bytes before the broker side is up
        self.bufs: dict[Direction, bytearray] = {TO_BROKER: bytearray(), TO_CLIENT: bytearray()}
        self.opaque: set[Direction] = set()  # stopped parsing (malformed): pass bytes through
        self.closed = False
        self.frozen = False  # a stalled path: nothing passes either way, nothing is closed

    @property
    def alive(self) -> bool:
        return not self.closed

    def writer(self, direction: Direction) -> asyncio.Transport | None:
        side = self.sides.get(direction)
        return side.transport if side is not None else None

    def side_up(self, side: _Side) -> None:
        if self.closed:  # refused, or the other side is already gone
            assert side.transport is not None
            side.transport.abort()
            return
        # The client side receives bytes to_broker and writes to_client, and vice versa.
        self.sides[_OTHER[side.direction]] = side
        if side.direction == TO_CLIENT:  # the broker side just connected
            t = side.transport
            assert t is not None
            for data in self.early:
                t.write(data)
            self.early.clear()

    def side_down(self, side: _Side) -> None:
        if self.closed:
            return
        self.closed = True
        for other in self.sides.values():
            if other is not side and other.transport is not None:
                other.transport.close()
        self.proxy._session_closed(self)

    def abort(self) -> None:
        for side in list(self.sides.values()):
            if side.transport is not None:
                side.transport.abort()

    def pause_from(self, direction: Direction) -> None:
        """The flow going `direction` backs up in its writer: stop reading its source."""
        src = self.sides.get(_OTHER[direction])
        if src is not None and src.transport is not None:
            with contextlib.suppress(RuntimeError):
                src.transport.pause_reading()

    def resume_from(self, direction: Direction) -> None:
        if self.frozen:
            return
        src = self.sides.get(_OTHER[direction])
        if src is not None and src.transport is not None:
            with contextlib.suppress(RuntimeError):
                src.transport.resume_reading()

    def freeze(self) -> None:
        """Stop both directions without closing anything: what is in flight is lost, and both
        ends' writes back up in their kernel buffers, as behind a dead NAT or a stalled link."""
        self.frozen = True
        for side in self.sides.values():
            if side.transport is not None:
                with contextlib.suppress(RuntimeError):
                    side.transport.pause_reading()

    def send(self, direction: Direction, data: bytes) -> None:
        if self.closed or self.frozen:
            return
        t = self.writer(direction)
        if t is None:
            if direction == TO_BROKER:
                self.early.append(data)
            return
        if not t.is_closing():
            t.write(data)

    def feed(self, direction: Direction, data: bytes) -> None:
        if direction in self.opaque:
            self.send(direction, data)
            return
        buf = self.bufs[direction]
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            length = 0
            shift = 0
            i = pos + 1
            complete_header = False
            while i < end and i - pos <= 4:
                b = buf[i]
                length |= (b & 0x7F) << shift
                shift += 7
                i += 1
                if b < 0x80:
                    complete_header = True
                    break
            if not complete_header:
                if i - pos > 4:  # not MQTT: stop interpreting, keep forwarding
                    self.opaque.add(direction)
                    self.send(direction, bytes(buf[pos:]))
                    buf.clear()
                    return
                break
            total = i - pos + length
            if end - pos < total:
                break
            raw = bytes(buf[pos : pos + total])
            self._packet(direction, raw, i - pos)
            pos += total
        if pos:
            del buf[:pos]

    def _packet(self, direction: Direction, raw: bytes, hdr: int) -> None:
        kind = raw[0] >> 4
        if kind == 1 and direction == TO_BROKER:
            self._connect(raw, hdr)
        if kind != 3:
            self.send(direction, raw)
            return
        pkt = self._decode(direction, raw, hdr)
        if pkt is None:
            self.send(direction, raw)
            return
        self.proxy._publish(pkt)

    def _connect(self, raw: bytes, hdr: int) -> None:
        with contextlib.suppress(IndexError, UnicodeDecodeError):
            vh = hdr + 2 + int.from_bytes(raw[hdr : hdr + 2], "big") + 4  # name, level, flags, ka
            n = int.from_bytes(raw[vh : vh + 2], "big")
            self.client_id = raw[vh + 2 : vh + 2 + n].decode()

    def _decode(self, direction: Direction, raw: bytes, hdr: int) -> Packet | None:
        first = raw[0]
        qos = (first >> 1) & 3
        if len(raw) < hdr + 2:
            return None
        tlen = int.from_bytes(raw[hdr : hdr + 2], "big")
        off = hdr + 2 + tlen
        mid = None
        if qos:
            if len(raw) < off + 2:
                return None
            mid = int.from_bytes(raw[off : off + 2], "big")
            off += 2
        if off > len(raw):
            return None
        try:
            topic = raw[hdr + 2 : hdr + 2 + tlen].decode()
        except UnicodeDecodeError:
            return None
        return Packet(
            direction=direction,
            topic=topic,
            payload=raw[off:],
            qos=qos,
            retain=bool(first & 1),
            dup=bool(first & 8),
            mid=mid,
            client_id=self.client_id,
            session=self.index,
            at=time.monotonic(),
            raw=raw,
        )


# --- the proxy ----------------------------------------------------------------------------------


class HostileProxy:
    """A scripted MQTT proxy in front of a real broker; see the module docstring."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        port: int = 0,
        seed: int | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.rng = random.Random(seed)
        self.rules: list[Rule] = []
        self.recorded: list[Packet] = []
        self.errors: list[Exception] = []  # raised by `Rewrite` functions
        self.stats: Counter[str] = Counter()
        self.log: deque[tuple[Direction, str, int]] = deque(maxlen=1000)
        self.refuse_connections = False
        self.accepted = 0
        self._sessions: dict[int, _Session] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._timers: set[asyncio.TimerHandle] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Client connections currently open."""
        return len(self._sessions)

    # -- lifecycle --

    async def start(self) -> HostileProxy:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in list(self._sessions.values()):
            session.abort()
        await asyncio.sleep(0)

    async def __aenter__(self) -> HostileProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __enter__(self) -> HostileProxy:
        """Run the proxy on an event loop of its own, in a thread (for sync tests)."""
        started: Future[None] = Future()
        loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name="hostile-proxy", daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._loop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the proxy's loop (from a test thread) or directly (on the loop)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        assert self._loop is not None
        result: Future[T] = Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return result.result(timeout=10)

    # -- scripting --

    def add_rule(
        self,
        direction: Direction | Literal["both"],
        topic: str,
        action: Action,
        *,
        where: Callable[[Packet], bool] | None = None,
        client: str | None = None,
        skip: int = 0,
        count: int | None = None,
    ) -> Rule:
        rule = Rule(direction, topic, action, where=where, client=client, skip=skip, count=count)
        self._call(lambda: self.rules.append(rule))
        return rule

    def swap_payloads(
        self,
        direction: Direction,
        topic_a: str,
        topic_b: str,
        *,
        count: int | None = None,
        timeout: float = 2.0,
    ) -> Rule:
        """Swap the payloads of packets on two topics (e.g. two transfers' chunks), pairwise."""
        action = SwapPayloads(topic_a, topic_b, timeout)
        return self.add_rule(
            direction,
            "#",
            action,
            where=lambda p: topic_matches(topic_a, p.topic) or topic_matches(topic_b, p.topic),
            count=None if count is None else 2 * count,
        )

    def swap_across(
        self,
        direction: Direction,
        topic: str,
        *,
        pairs: int | None = None,
        timeout: float = 1.0,
        where: Callable[[Packet], bool] | None = None,
    ) -> Rule:
        """Swap the payloads of packets on different topics matching `topic` (and `where`),
        pairwise (the chunks of two concurrent transfers, say); at most `pairs` pairs."""
        return self.add_rule(direction, topic, SwapAcrossTopics(timeout, pairs), where=where)

    def remove_rule(self, rule: Rule) -> None:
        self._call(lambda: self.rules.remove(rule) if rule in self.rules else None)

    def clear_rules(self) -> None:
        self._call(self.rules.clear)

    def release(self, rule: Rule, order: Literal["fifo", "reverse", "shuffle"] = "fifo") -> int:
        """Pass on what a `Hold` rule holds, in the given order; returns how many.

        Each goes back into the connection it came from; if that one is gone (the client
        reconnected, the broker restarted) it is dropped and counted as `lost_with_connection`:
        use `Record` and `replay()` to carry packets across connections.
        """

        def run() -> int:
            held, rule.held = rule.held, []
            if order == "reverse":
                held.reverse()
            elif order == "shuffle":
                self.rng.shuffle(held)
            for pkt in held:
                self._forward(pkt)
            self.stats["released"] += len(held)
            return len(held)

        return self._call(run)

    def inject(
        self,
        direction: Direction,
        topic: str,
        payload: bytes,
        *,
        client: str | None = None,
        retain: bool = False,
    ) -> int:
        """Send a forged QoS 0 PUBLISH into every live connection (of `client`, if given)."""

        def run() -> int:
            pkt = Packet(direction, topic, payload, retain=retain).encode()
            n = 0
            for session in list(self._sessions.values()):
                if client is None or session.client_id == client:
                    session.send(direction, pkt)
                    n += 1
            self.stats["injected"] += n
            return n

        return self._call(run)

    def replay(
        self,
        packets: Iterable[Packet],
        *,
        direction: Direction | None = None,
        client: str | None = None,
    ) -> int:
        """Send recorded packets again (as QoS 0), into the connections live now."""
        return sum(
            self.inject(
                direction or p.direction,
                p.topic,
                p.payload,
                client=client if client is not None else p.client_id,
                retain=p.retain,
            )
            for p in list(packets)
        )

    def recordings(self, topic: str = "#", direction: Direction | None = None) -> list[Packet]:
        return [
            p
            for p in list(self.recorded)
            if topic_matches(topic, p.topic) and (direction is None or p.direction == direction)
        ]

    def kill_connections(self) -> int:
        """Cut every client connection and its broker connection at once (a network drop)."""

        def run() -> int:
            sessions = list(self._sessions.values())
            for session in sessions:
                session.abort()
            self.stats["killed"] += len(sessions)
            return len(sessions)

        return self._call(run)

    def freeze_connections(self) -> int:
        """Stall every open connection: no byte passes either way, none is closed (a client
        must notice the silence itself). Connections made afterwards pass normally."""

        def run() -> int:
            sessions = list(self._sessions.values())
            for session in sessions:
                session.freeze()
            self.stats["frozen"] += len(sessions)
            return len(sessions)

        return self._call(run)

    async def wait_connections(self, accepted: int, limit: float = 10.0) -> None:
        """Wait until `accepted` client connections were accepted in all (and one is open)."""
        async with asyncio.timeout(limit):
            while self.accepted < accepted or not self._sessions:  # noqa: ASYNC110 - counters
                await asyncio.sleep(0.01)

    def wait_connections_blocking(self, accepted: int, limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        while self.accepted < accepted or not self._sessions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.accepted} connections after {limit}s")
            time.sleep(0.01)

    # -- internals (on the proxy's loop) --

    def _accept(self) -> _Side:
        self.accepted += 1
        session = _Session(self, self.accepted)
        side = _Side(session, TO_BROKER)
        if self.refuse_connections:
            self.stats["refused"] += 1
            session.closed = True  # side_up() aborts it
            return side
        self.stats["connections"] += 1
        self._sessions[session.index] = session
        asyncio.get_running_loop().create_task(self._connect_upstream(session))
        return side

    async def _connect_upstream(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Side(session, TO_CLIENT), *self.upstream)
        except OSError:
            self.stats["upstream_failed"] += 1
            session.abort()
            self._session_closed(session)

    def _session_closed(self, session: _Session) -> None:
        self._sessions.pop(session.index, None)

    def _send_raw(self, session_index: int, direction: Direction, data: bytes) -> None:
        session = self._sessions.get(session_index)
        if session is not None:
            session.send(direction, data)

    def _loop_call_later(
        self, delay: float, fn: Callable[..., None], *args: Any
    ) -> asyncio.TimerHandle:
        assert self._loop is not None
        timer: asyncio.TimerHandle

        def run() -> None:
            self._timers.discard(timer)
            fn(*args)

        timer = self._loop.call_later(delay, run)
        self._timers.add(timer)
        return timer

    def _later(self, delay: float, pkt: Packet) -> None:
        self._loop_call_later(delay, self._forward, pkt)

    def _forward(self, pkt: Packet) -> None:
        """Send a packet into the connection it came from (lost if that one is gone)."""
        session = self._sessions.get(pkt.session)
        if session is None:
            self.stats["lost_with_connection"] += 1
            return
        self.stats[f"publish_{pkt.direction}"] += 1
        session.send(pkt.direction, pkt.encode())

    def _publish(self, pkt: Packet) -> None:
        self.log.append((pkt.direction, pkt.topic, len(pkt.payload)))
        pkts = [pkt]
        for rule in list(self.rules):
            if not pkts:
                return
            out: list[Packet] = []
            for p in pkts:
                if not rule.active or not rule.matches(p):
                    out.append(p)
                    continue
                rule.matched += 1
                if rule.matched <= rule.skip:
                    out.append(p)
                    continue
                rule.applied += 1
                out.extend(rule.action.apply(self, rule, p))
            pkts = out
        for p in pkts:
            self._forward(p)
