"""The WAN benchmark's delay line (scripts/benchmarks/delayline.py), as a process in front of a
real TCP server: what goes in comes out, in order, in both directions, with the end of stream;
and nothing arrives sooner than the link allows. The bounds asserted are lower bounds the line
promises (a delayed byte is never early), not speed thresholds: a loaded machine only makes the
measured times longer."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

from scripts.benchmarks.delayline import delay_line


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A loopback server that writes back every byte it reads, then closes its side at EOF."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def read_all(sock: socket.socket, out: bytearray) -> None:
    while data := sock.recv(1 << 16):
        out += data


def test_bytes_through_equal_bytes_in_both_ways_with_the_end_of_stream() -> None:
    payload = os.urandom(8 << 20)
    echoed = bytearray()
    with (
        echo_server() as port,
        delay_line(port, 0.005, 50e6) as line,
        socket.create_connection(("127.0.0.1", line), timeout=60) as sock,
    ):
        reader = threading.Thread(target=read_all, args=(sock, echoed))
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(60)
        assert not reader.is_alive(), "the echo's end of stream never came back"
    assert bytes(echoed) == payload


def test_a_delayed_echo_takes_at_least_the_round_trip() -> None:
    one_way = 0.040
    with (
        echo_server() as port,
        delay_line(port, one_way, 50e6) as line,
        socket.create_connection(("127.0.0.1", line), timeout=30) as sock,
    ):
        for _ in range(5):
            t0 = time.monotonic()
            sock.sendall(b"ping")
            got = b""
            while len(got) < 4:
                got += sock.recv(4 - len(got))
            assert got == b"ping"
            assert time.monotonic() - t0 >= 2 * one_way


def test_each_direction_has_its_own_delay() -> None:
    there, back = 0.010, 0.060
    with (
        echo_server() as port,
        delay_line(port, there, 0, reverse_delay=back) as line,
        socket.create_connection(("127.0.0.1", line), timeout=30) as sock,
    ):
        t0 = time.monotonic()
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        assert time.monotonic() - t0 >= there + back


def test_nothing_arrives_faster_than_the_link_rate() -> None:
    rate, size = 20e6, 4 << 20
    got = bytearray()
    with (
        echo_server() as port,
        delay_line(port, 0.001, rate) as line,
        socket.create_connection(("127.0.0.1", line), timeout=60) as sock,
    ):
        reader = threading.Thread(target=read_all, args=(sock, got))
        t0 = time.monotonic()
        reader.start()
        sock.sendall(os.urandom(size))
        sock.shutdown(socket.SHUT_WR)
        reader.join(60)
        elapsed = time.monotonic() - t0
    assert len(got) == size
    # Every byte crossed the paced bottleneck twice (there and back), each way at `rate`: the
    # echo cannot start before the first buffer arrived, so at least one crossing is serial.
    assert elapsed >= size / rate
