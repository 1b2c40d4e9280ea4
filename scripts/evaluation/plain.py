"""The baselines: the same work as peerd's, in plaintext MQTT, by long-lived worker processes.

A worker is one process with one MQTT connection (peerd's own link, `peerd.mqtt.MqttLink`, so
the MQTT client is the same as the daemons'), logged in to the shipped broker under its own user
name. The parent drives it with one JSON object per line on stdin and reads one per line on
stdout. It stays up between commands, so its TCP counters and CPU time can be read around each
piece of work like a daemon's.

Commands:
- {"op": "sink", "topic", "size", "out"}: subscribe (QoS 1), answer {"ready"}; write what
  arrives at its offset in `out` until `size` bytes are there, fsync, answer {"done"}.
- {"op": "source", "topic", "path", "inflight"}: publish the file in 256 KiB chunks, QoS 1,
  `inflight` publishes in flight; answer {"sent"} once the broker acknowledged the last.
- {"op": "ping", "rounds": [[user, ...], ...], "sizes": [s1, s2, s3, s4], "interval"}: per
  round, four-message exchanges A -> B -> A -> B -> A with every user of the round at once (the
  message pattern of a peerd handshake seen from its initiator: HELLO, REPLY, FINISH, and the
  responder's first transport message); answer {"ms": per round, per exchange, "makespan_ms"}.
- Every worker (and the load generator) answers exchanges arriving in its inbox.
- {"op": "quit"}.

Exchange messages start with 0xFF, which no peerd frame does (its first byte is the version, 1):
kind (1) | exchange id (8) | size of the answer (4) | reply-to length (1) | reply-to | padding.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import time
from typing import Any

from peerd.mqtt import BrokerSettings, Message, MqttLink, Topics

CHUNK = 256 * 1024
MAGIC = 0xFF
_HEAD = struct.Struct(">BBQIB")  # magic, kind, exchange id, answer size, reply-to length


def exchange_message(kind: int, xid: int, answer: int, reply_to: str, size: int) -> bytes:
    head = _HEAD.pack(MAGIC, kind, xid, answer, len(reply_to)) + reply_to.encode()
    return head + bytes(max(0, size - len(head)))


def parse_exchange(payload: bytes) -> tuple[int, int, int, str] | None:
    """(kind, exchange id, answer size, reply-to) of an exchange message, else None."""
    if len(payload) < _HEAD.size or payload[0] != MAGIC:
        return None
    _, kind, xid, answer, n = _HEAD.unpack_from(payload)
    return kind, xid, answer, payload[_HEAD.size : _HEAD.size + n].decode()


def answer_exchange(link: MqttLink, topics: Topics, me: str, payload: bytes) -> bool:
    """The responder's side, stateless: message 1 asks for an answer (message 2) of the size it
    names, message 3 for message 4. False if `payload` is not an exchange message 1 or 3."""
    parsed = parse_exchange(payload)
    if parsed is None or parsed[0] not in (1, 3):
        return False
    kind, xid, answer, reply_to = parsed
    link.publish_nowait(topics.inbox(reply_to), exchange_message(kind + 1, xid, 0, me, answer))
    return True


class Worker:
    def __init__(self, url: str, me: str, network: str) -> None:
        self.me = me
        self.topics = Topics(network)
        self.link = MqttLink(BrokerSettings.from_url(url, client_id=me), max_queued_bytes=1 << 30)
        self.pending: dict[int, asyncio.Future[float]] = {}
        self.next_xid = 0
        self.sizes: tuple[int, int, int, int] = (0, 0, 0, 0)

    def emit(self, **fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def on_inbox(self, msg: Message) -> None:
        if answer_exchange(self.link, self.topics, self.me, msg.payload):
            return
        parsed = parse_exchange(msg.payload)
        if parsed is None:
            return
        kind, xid, _, reply_to = parsed
        _, _, s3, s4 = self.sizes
        if kind == 2:
            self.link.publish_nowait(
                self.topics.inbox(reply_to), exchange_message(3, xid, s4, self.me, s3)
            )
        elif kind == 4:
            done = self.pending.pop(xid, None)
            if done is not None and not done.done():
                done.set_result(time.perf_counter())

    async def _exchange(self, peer: str) -> tuple[float, float]:
        self.next_xid += 1
        xid = self.next_xid
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.pending[xid] = done
        s1, s2, _, _ = self.sizes
        t0 = time.perf_counter()
        self.link.publish_nowait(self.topics.inbox(peer), exchange_message(1, xid, s2, self.me, s1))
        async with asyncio.timeout(30):
            t1 = await done
        return t0, t1

    async def ping(self, rounds: list[list[str]], interval: float) -> None:
        ms: list[list[float]] = []
        makespan: list[float] = []
        for peers in rounds:
            start = time.perf_counter()
            spans = await asyncio.gather(*(self._exchange(p) for p in peers))
            ms.append([(t1 - t0) * 1e3 for t0, t1 in spans])
            makespan.append((max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)) * 1e3)
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start)))
        self.emit(ms=ms, makespan_ms=makespan)

    async def sink(self, topic: str, size: int, out: str) -> None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        written = 0
        done = asyncio.get_running_loop().create_future()

        def write(msg: Message) -> None:  # in order, from the link's read path
            nonlocal written
            written += os.pwrite(fd, msg.payload, written)
            if written >= size and not done.done():
                done.set_result(None)

        sub = await self.link.subscribe(topic, qos=1, handler=write, timeout=10)
        self.emit(ready=True)
        try:
            if size:
                await done
            os.fsync(fd)
        finally:
            os.close(fd)
            await sub.close()
        self.emit(done=True, written=written)

    async def source(self, topic: str, path: str, inflight: int) -> None:
        with open(path, "rb") as f:  # noqa: ASYNC230 - reading the file is part of the work
            async with self.link.pipeline(inflight) as pipe:
                while chunk := f.read(CHUNK):
                    await pipe.publish(topic, chunk)
        self.emit(sent=True)

    async def run(self) -> None:
        async with self.link:
            await self.link.wait_connected(30)
            await self.link.subscribe(
                self.topics.inbox(self.me), qos=0, handler=self.on_inbox, timeout=10
            )
            self.emit(ready=True, me=self.me)
            reader = asyncio.StreamReader()
            loop = asyncio.get_running_loop()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            tasks: set[asyncio.Task[None]] = set()
            while line := await reader.readline():
                cmd = json.loads(line)
                op = cmd.pop("op")
                if op == "quit":
                    break
                if op == "ping":
                    s1, s2, s3, s4 = cmd["sizes"]
                    self.sizes = (s1, s2, s3, s4)
                    coro = self.ping(cmd["rounds"], cmd.get("interval", 0.0))
                elif op == "sink":
                    coro = self.sink(cmd["topic"], cmd["size"], cmd["out"])
                elif op == "source":
                    coro = self.source(cmd["topic"], cmd["path"], cmd.get("inflight", 16))
                else:
                    raise ValueError(f"unknown command {op!r}")
                task = asyncio.create_task(coro)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            for task in tasks:
                task.cancel()


def main() -> int:
    url, me, network = sys.argv[1:4]
    asyncio.run(Worker(url, me, network).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
