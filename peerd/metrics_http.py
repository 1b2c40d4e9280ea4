"""The `/metrics` endpoint: a minimal HTTP/1.0 server inside the daemon's event loop.

Not prometheus_client's server thread: a collector running in another thread would read the
daemon's dictionaries while the loop changes them. This one answers `GET /metrics` (and HEAD)
with the text `render()` makes, 404 for any other path, and closes the connection. Bounded like
every other input: a few connections at once (more are closed unanswered), a request head of at
most 8 KiB read within a deadline, one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from peerd.errors import DaemonError
from peerd.logs import log_event

log = logging.getLogger("peerd.metrics")

MAX_CONNECTIONS = 8
MAX_HEAD = 8192
REQUEST_DEADLINE = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    def __init__(self, host: str, port: int, render: Callable[[], Awaitable[bytes]]) -> None:
        self.host, self.port = host, port
        self.render = render
        self._server: asyncio.Server | None = None
        self._active = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self.refused = 0

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_HEAD
            )
        except OSError as exc:
            raise DaemonError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}",
                hint="choose a free address in [metrics] listen, or remove it",
            ) from exc
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log_event(log, "metrics.listening", address=f"{self.host}:{self.port}")

    async def close(self) -> None:
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            self.refused += 1
            writer.close()
            return
        self._active += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            async with asyncio.timeout(REQUEST_DEADLINE):
                status, body = await self._answer(reader)
                head = (
                    f"HTTP/1.0 {status}\r\nContent-Type: "
                    f"{CONTENT_TYPE if status.startswith('200') else 'text/plain'}\r\n"
                    f"Content-Length: {len(body[0])}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + (b"" if body[1] else body[0]))
                await writer.drain()
        except (TimeoutError, ConnectionError, EOFError, asyncio.LimitOverrunError, ValueError):
            pass  # a slow, broken or oversized request: nothing to answer
        except asyncio.CancelledError:
            pass  # the server is closing; ending here keeps asyncio's stream callback quiet
        finally:
            self._active -= 1
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, tuple[bytes, bool]]:
        """(status line, (body, head only)) for the request on `reader`."""
        line = await reader.readuntil(b"\n")  # ValueError beyond MAX_HEAD (LimitOverrunError)
        size = len(line)
        while True:  # the headers: read and ignore, within the bound
            header = await reader.readuntil(b"\n")
            size += len(header)
            if size > MAX_HEAD:
                raise ValueError("request head too large")
            if header in (b"\r\n", b"\n"):
                break
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", (b"bad request\n", False)
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target != "/metrics":
            return "404 Not Found", (b"peerd serves /metrics only\n", False)
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", (b"GET /metrics\n", False)
        return "200 OK", (await self.render(), method == "HEAD")


__all__ = ["MetricsServer"]
