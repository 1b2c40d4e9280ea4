"""A userspace delay line: one emulated network link between TCP clients and one server.

    .venv/bin/python -m scripts.benchmarks.delayline --to PORT --delay-ms 10 --rate-mb 50

This kernel has no netem, so the WAN benchmark puts this relay in front of a server. It listens
on a loopback port and, for each client that connects, opens a connection to the target and
relays both directions, each as a link of its own: every buffer read from one side is held for
the one-way delay after it leaves a bottleneck paced at the link rate (shared by every connection
through the process, one clock per direction), then written to the other side, in order. The
relay stops reading a direction while it holds more than rate x delay + 1 MB of it (the bytes
on the wire plus a 1 MB bottleneck queue), so the sender's TCP feels the path: its socket blocks
as it would once its congestion window covers the path, and every acknowledgement an
application waits for comes back one round trip later. A client's end of stream (FIN) is
delayed like data.

What it does not emulate: loss, reordering, jitter, and TCP's own dynamics on a long path (slow
start, congestion control reacting to loss): the kernel's TCP on each side sees a loopback round
trip. docs/benchmarks.md, section "WAN", says what that leaves out.

One process per emulated link (`delay_line()` starts one and yields its port), so that the
relay's work runs on its own interpreter and the benchmarked processes' GIL is not shared.
Threads, not asyncio: two blocking threads per direction (reader, paced writer) keep the hot
path in the kernel (`recv_into` into pooled buffers, `sendall`), which is what lets one process
carry 125 MB/s each way on this machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READ = 128 * 1024  # one read; at 125 MB/s a buffer is ~1 ms on the wire: pacing stays smooth
QUEUE = 1_000_000  # the bottleneck's buffer beyond the bytes on the wire (rate x delay)
# The relay's own socket buffers are kept small: data waiting in them is data the sender got
# rid of without the path having carried it (the kernel doubles the value given).
SOCKET_BUFFER = 256 * 1024


class Link:
    """One direction of the emulated link: when a buffer that arrives now leaves the
    bottleneck (serialised at `rate` bytes/s behind what arrived before it) and is delivered."""

    def __init__(self, delay: float, rate: float) -> None:
        self.delay = delay
        self.rate = rate
        self.limit = int(rate * delay) + QUEUE
        self._free_at = 0.0
        self._lock = threading.Lock()

    def due(self, size: int, now: float) -> float:
        if self.rate <= 0:  # unpaced: delay only
            return now + self.delay
        with self._lock:
            leaves = max(now, self._free_at) + size / self.rate
            self._free_at = leaves
        return leaves + self.delay


class _Direction:
    """Bytes from `src` to `dst` through `link`: a reader thread and a paced writer thread
    sharing a queue of (due time, buffer) bounded to `link.limit` bytes."""

    def __init__(self, src: socket.socket, dst: socket.socket, link: Link, done: Done) -> None:
        self.src, self.dst, self.link, self.done = src, dst, link, done
        # (due, buffer, length); length 0 is the end of the stream.
        self.queue: collections.deque[tuple[float, bytearray, int]] = collections.deque()
        self.held = 0
        self.cond = threading.Condition()
        self.spare: list[bytearray] = []  # recycled read buffers: no page faults per read

    def start(self) -> None:
        for target in (self._read, self._write):
            threading.Thread(target=target, daemon=True).start()

    def _buffer(self) -> bytearray:
        with self.cond:
            return self.spare.pop() if self.spare else bytearray(READ)

    def _read(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.held >= self.link.limit and not self.done.is_set():
                        self.cond.wait(0.5)
                if self.done.is_set():
                    return
                buf = self._buffer()
                n = self.src.recv_into(buf)
                now = time.monotonic()
                with self.cond:
                    due = now + self.link.delay if n == 0 else self.link.due(n, now)
                    self.queue.append((due, buf, n))  # a FIN (n == 0) is delayed too
                    self.held += n
                    self.cond.notify_all()
                if n == 0:
                    return
        except OSError:
            self.done.set()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.done.is_set():
                        self.cond.wait(0.5)
                    if self.done.is_set():
                        return
                    due, buf, n = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if n == 0:
                    self.dst.shutdown(socket.SHUT_WR)
                    self.done.finished_one()
                    return
                with memoryview(buf) as view:
                    self.dst.sendall(view[:n])
                with self.cond:
                    self.queue.popleft()
                    self.held -= n
                    self.spare.append(buf)
                    self.cond.notify_all()
        except OSError:
            self.done.set()


class Done(threading.Event):
    """Set when a connection is over: both directions ended, or either failed."""

    def __init__(self) -> None:
        super().__init__()
        self._ended = 0
        self._lock = threading.Lock()

    def finished_one(self) -> None:
        with self._lock:
            self._ended += 1
            if self._ended == 2:
                self.set()


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)


def _relay(client: socket.socket, target: tuple[str, int], up: Link, down: Link) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _tune(server)
    try:
        server.connect(target)
    except OSError:
        server.close()
        client.close()
        return
    done = Done()
    _Direction(client, server, up, done).start()
    _Direction(server, client, down, done).start()

    def close_when_done() -> None:
        done.wait()
        for s in (client, server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    threading.Thread(target=close_when_done, daemon=True).start()


def serve(listener: socket.socket, target: tuple[str, int], up: Link, down: Link) -> None:
    while True:
        client, _ = listener.accept()
        _tune(client)
        _relay(client, target, up, down)


def listen(port: int = 0) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _tune(listener)  # accepted sockets inherit the buffer sizes (window scale is set at SYN)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    return listener


@contextlib.contextmanager
def delay_line(
    target_port: int,
    delay: float,
    rate: float,
    *,
    reverse_delay: float | None = None,
    port: int = 0,
) -> Iterator[int]:
    """A delay-line process in front of 127.0.0.1:`target_port`: one-way `delay` seconds toward
    the target (`reverse_delay`, default the same, back), `rate` bytes/s each way (0: unpaced).
    Yields the port it listens on (`port`, or a free one)."""
    args = [
        sys.executable,
        "-m",
        "scripts.benchmarks.delayline",
        "--to",
        str(target_port),
        "--port",
        str(port),
        "--delay-ms",
        str(delay * 1e3),
        "--reverse-delay-ms",
        str((delay if reverse_delay is None else reverse_delay) * 1e3),
        "--rate-mb",
        str(rate / 1e6),
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the delay line exited ({proc.wait(10)}) before listening")
        yield int(json.loads(line)["port"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", type=int, required=True, help="target port on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: free)")
    parser.add_argument("--delay-ms", type=float, required=True, help="one way, toward the target")
    parser.add_argument("--reverse-delay-ms", type=float, help="one way back (default: the same)")
    parser.add_argument("--rate-mb", type=float, default=0, help="MB/s each way (0: unpaced)")
    args = parser.parse_args()
    back = args.delay_ms if args.reverse_delay_ms is None else args.reverse_delay_ms
    up = Link(args.delay_ms / 1e3, args.rate_mb * 1e6)
    down = Link(back / 1e3, args.rate_mb * 1e6)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # daemon threads die with us
    listener = listen(args.port)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        serve(listener, ("127.0.0.1", args.to), up, down)
    return 0


if __name__ == "__main__":
    sys.exit(main())
