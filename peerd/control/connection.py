"""One accepted control connection: its read loop (line limits, batches, garbage), its bounded
output queue, and its event subscriptions. The server it belongs to is seen through `Dispatcher`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from peerd.control.credentials import PeerCredentials
from peerd.control.params import JSONValue
from peerd.control.wire import (
    CLOSE_GRACE,
    DROPPED_METHOD,
    INVALID_REQUEST,
    JSONRPC,
    MAX_FILTER_KEYS,
    MAX_SUBSCRIPTIONS,
    PARSE_ERROR,
    InvalidParams,
    SubscriberDropped,
    decode_line,
    encode_line,
    plain_error,
    response,
)

log = logging.getLogger("peerd.control")


class Dispatcher(Protocol):
    """What a connection needs of its server: the limits, the counters, and the dispatch."""

    max_line: int
    max_batch: int
    max_inflight: int
    max_queue: int
    max_garbage: int

    def check_event_pattern(self, pattern: object) -> None: ...

    def count(self, name: str) -> None: ...

    def count_error(self, code: int) -> None: ...

    async def handle(self, message: JSONValue, conn: Connection) -> dict[str, Any] | None: ...

    def encode_reply(self, reply: JSONValue) -> bytes: ...


# --- subscriptions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscription:
    id: int
    patterns: tuple[str, ...]  # exact names, "prefix.*" or "*"
    filter: Mapping[str, Any]  # top-level payload fields that must be equal

    def matches(self, event: str, payload: JSONValue) -> bool:
        if not any(
            p in ("*", event) or (p.endswith(".*") and event.startswith(p[:-1]))
            for p in self.patterns
        ):
            return False
        if not self.filter:
            return True
        if not isinstance(payload, dict):
            return False
        return all(k in payload and payload[k] == v for k, v in self.filter.items())


# --- connections --------------------------------------------------------------------------------


class Connection:
    """One accepted client. Handlers receive it to learn the caller or to subscribe it."""

    def __init__(
        self,
        server: Dispatcher,
        conn_id: int,
        peer: PeerCredentials,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.id = conn_id
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self._out: deque[bytes] = deque()
        self._out_ready = asyncio.Event()
        self._out_space = asyncio.Event()
        self._out_space.set()
        self._closing = False  # no more output except what is queued
        self._finishing = False  # the writer exits once the queue is empty
        self._inflight = asyncio.Semaphore(server.max_inflight)
        self._requests: set[asyncio.Task[None]] = set()
        self._subscriptions: dict[int, Subscription] = {}
        self._next_subscription = 1
        self._garbage = 0
        self._reader_task: asyncio.Task[None] | None = None
        self.max_queued = 0  # the high-water mark of queued output lines

    def __repr__(self) -> str:
        return f"<Connection {self.id} pid={self.peer.pid} uid={self.peer.uid}>"

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def queued(self) -> int:
        return len(self._out)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    # Subscriptions. The built-in v1.subscribe uses these; a daemon method may too (for example
    # a `v1.msg.listen {"channel": c}` subscribing to "message" with filter {"channel": c}).

    def subscribe(
        self, patterns: Iterable[str], filter: Mapping[str, Any] | None = None
    ) -> Subscription:
        patterns = tuple(patterns)
        if not patterns:
            raise InvalidParams("subscribe to at least one event")
        for pattern in patterns:
            self.server.check_event_pattern(pattern)
        filter = dict(filter or {})
        if len(filter) > MAX_FILTER_KEYS or not all(
            isinstance(k, str) and (v is None or isinstance(v, str | int | float | bool))
            for k, v in filter.items()
        ):
            raise InvalidParams(
                f"filter must be an object of at most {MAX_FILTER_KEYS} scalar fields"
            )
        if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
            raise InvalidParams(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        sub = Subscription(self._next_subscription, patterns, filter)
        self._next_subscription += 1
        self._subscriptions[sub.id] = sub
        return sub

    def unsubscribe(self, subscription_id: int) -> bool:
        return self._subscriptions.pop(subscription_id, None) is not None

    def notify(self, method: str, params: Mapping[str, Any]) -> bool:
        """Queue a notification for this client. False if the connection is closing or was just
        dropped for falling behind (a notification is never allowed to grow the queue)."""
        line = encode_line({"jsonrpc": JSONRPC, "method": method, "params": params})
        return self.push_event(line)

    # Output.

    def _note_queued(self) -> None:
        self.max_queued = max(self.max_queued, len(self._out))
        self._out_ready.set()
        if len(self._out) >= self.server.max_queue:
            self._out_space.clear()

    async def _push_reply(self, line: bytes) -> None:
        while len(self._out) >= self.server.max_queue and not self._closing:
            await self._out_space.wait()
        if self._closing:
            return
        self._out.append(line)
        self._note_queued()

    def push_event(self, line: bytes) -> bool:
        if self._closing:
            return False
        if len(self._out) >= self.server.max_queue:
            self._drop()
            return False
        self._out.append(line)
        self._note_queued()
        return True

    def _drop(self) -> None:
        """Disconnect a subscriber that fell behind: its queue is discarded (memory stays
        bounded) and replaced by one final notification saying why."""
        self.server.count("subscribers_dropped")
        log.warning(
            "dropping control connection %d (pid %d uid %d): %d lines queued, not reading",
            self.id,
            self.peer.pid,
            self.peer.uid,
            len(self._out),
        )
        exc = SubscriberDropped(
            f"the daemon dropped this connection: {len(self._out)} messages were waiting"
        )
        final = encode_line(
            {
                "jsonrpc": JSONRPC,
                "method": DROPPED_METHOD,
                "params": {"reason": "slow-subscriber", "message": str(exc), "hint": exc.hint},
            }
        )
        self._out.clear()
        self._out.append(final)
        self._finish(abort_requests=True)

    def abort(self) -> None:
        """Close now (the server is closing): queued output is discarded, requests cancelled."""
        self._out.clear()
        self._finish(abort_requests=True)
        self._writer.transport.abort()

    def _finish(self, *, abort_requests: bool) -> None:
        """Stop taking input; the writer sends what is queued and the connection closes."""
        self._closing = True
        self._finishing = True
        self._out_ready.set()
        self._out_space.set()
        reader = self._reader_task
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            reader.cancel()
        if abort_requests:
            for task in self._requests:
                task.cancel()

    async def _write_loop(self) -> None:
        while True:
            while not self._out:
                if self._finishing:
                    return
                self._out_ready.clear()
                await self._out_ready.wait()
            line = self._out.popleft()
            if len(self._out) < self.server.max_queue:
                self._out_space.set()
            self._writer.write(line)
            await self._writer.drain()

    # Input.

    async def _read_loop(self) -> None:
        buf = bytearray()
        discarding = False  # inside an oversize line: skip up to its newline
        limit = self.server.max_line
        while True:
            chunk = await self._reader.read(65536)
            if not chunk:
                break
            buf += chunk
            if b"\n" in chunk:
                *lines, rest = bytes(buf).split(b"\n")
                buf = bytearray(rest)
                for line in lines:
                    if discarding:
                        discarding = False
                        continue
                    if len(line) > limit:
                        await self._garbage_line(INVALID_REQUEST, f"line longer than {limit} bytes")
                    else:
                        await self._line(line)
                    if self._finishing:
                        return
            if len(buf) > limit:  # the start of an oversize line: refuse it once, skip the rest
                if not discarding:
                    await self._garbage_line(INVALID_REQUEST, f"line longer than {limit} bytes")
                    discarding = True
                buf.clear()
        # End of input: let the requests already received finish and answer.
        if self._requests:
            await asyncio.wait(set(self._requests))

    async def _garbage_line(self, code: int, message: str) -> None:
        self._garbage += 1
        self.server.count_error(code)
        await self._push_reply(encode_line(response(None, error=plain_error(code, message))))
        if self._garbage >= self.server.max_garbage:
            self.server.count("closed_for_garbage")
            log.warning(
                "closing control connection %d (pid %d uid %d): %d bad lines in a row",
                self.id,
                self.peer.pid,
                self.peer.uid,
                self._garbage,
            )
            self._finish(abort_requests=False)

    async def _line(self, line: bytes) -> None:
        if not line.strip():
            return  # blank lines are harmless (and handy with socat)
        try:
            message = decode_line(line)
        except ValueError as exc:
            await self._garbage_line(PARSE_ERROR, f"parse error: {exc}")
            return
        if isinstance(message, list):
            if not message:
                await self._garbage_line(INVALID_REQUEST, "empty batch")
                return
            if len(message) > self.server.max_batch:
                await self._garbage_line(
                    INVALID_REQUEST, f"batch of {len(message)} (at most {self.server.max_batch})"
                )
                return
        elif not isinstance(message, dict):
            await self._garbage_line(INVALID_REQUEST, "a request must be an object or an array")
            return
        self._garbage = 0
        await self._inflight.acquire()
        task = asyncio.create_task(self._process(message), name=f"control-{self.id}-request")
        self._requests.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        self._inflight.release()

    async def _process(self, message: JSONValue) -> None:
        if isinstance(message, list):
            replies = await asyncio.gather(*(self.server.handle(m, self) for m in message))
            body = [r for r in replies if r is not None]
            if body:
                await self._push_reply(self.server.encode_reply(body))
            return
        reply = await self.server.handle(message, self)
        if reply is not None:
            await self._push_reply(self.server.encode_reply(reply))

    async def serve(self) -> None:
        writer_task = asyncio.create_task(self._write_loop(), name=f"control-{self.id}-writer")
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"control-{self.id}-reader")
        try:
            done, _ = await asyncio.wait(
                {self._reader_task, writer_task}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if not isinstance(exc, ConnectionError | OSError):
                        log.error("control connection %d failed", self.id, exc_info=exc)
        finally:
            self._finish(abort_requests=True)
            try:
                async with asyncio.timeout(CLOSE_GRACE):
                    await asyncio.wait({writer_task})
                    await hang_up(self._reader, self._writer)
            except (TimeoutError, ConnectionError, OSError):
                pass
            for task in (writer_task, self._reader_task):
                task.cancel()
            if self._requests:
                await asyncio.wait(set(self._requests))
            self._writer.transport.abort()  # a no-op unless the grace ran out


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close after the client has read our last lines. Half-close first and discard what the
    client still sends until it closes too: closing while its request is unread would reset the
    connection, and the client would lose the lines that say why (access denied, dropped).
    Callers bound this with a timeout."""
    if writer.can_write_eof():
        writer.write_eof()
    while await reader.read(65536):
        pass
    writer.close()
    await writer.wait_closed()


__all__ = ["Connection", "Dispatcher", "Subscription", "hang_up"]
