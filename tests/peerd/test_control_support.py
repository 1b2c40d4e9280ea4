"""Helpers (no tests here) for the control-socket and client tests: a raw client, a server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from peerd.control import ControlServer, Params, require

FAIL_AFTER = 20.0  # a guard against hangs only; no test measures time


@contextmanager
def short_dir() -> Iterator[str]:
    """A fresh directory with a short path (sun_path is 108 bytes), traversable by anyone."""
    d = tempfile.mkdtemp(prefix="peerd-ctl-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Raw:
    """A bare line-oriented client, to send what a real client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> Raw:
        reader, writer = await asyncio.open_unix_connection(path, limit=64 << 20)
        return cls(reader, writer)

    async def send(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> Any:
        async with asyncio.timeout(FAIL_AFTER):
            line = await self.reader.readline()
        assert line, "the server closed the connection"
        return json.loads(line)

    async def call(self, method: str, params: Any = None, request_id: Any = 1) -> Any:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        return await self.recv()

    async def at_eof(self) -> bool:
        """True if the server closed the connection (an orderly EOF or a reset)."""
        async with asyncio.timeout(FAIL_AFTER):
            try:
                return await self.reader.read(1) == b""
            except ConnectionResetError:
                return True

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Poll a condition of the server's state (only as a guard against hangs)."""
        async with asyncio.timeout(FAIL_AFTER):
            while not condition():  # noqa: ASYNC110 (state of another object, no event)
                await asyncio.sleep(0.005)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def make_server(path: str, **kwargs: Any) -> ControlServer:
    """A server with a few test methods registered."""
    server = ControlServer(path, **kwargs)
    gate = asyncio.Event()
    server.gate = gate  # type: ignore[attr-defined]

    async def echo(params: Params, conn: Any) -> Any:
        return {"echo": require(params, "text", str)}

    async def wait(params: Params, conn: Any) -> Any:
        await gate.wait()
        return "released"

    async def release(params: Params, conn: Any) -> Any:
        gate.set()
        return "ok"

    server.register("v1.echo", echo)
    server.register("v1.wait", wait)
    server.register("v1.release", release)
    return server


@asynccontextmanager
async def running(path: str, **kwargs: Any) -> AsyncIterator[ControlServer]:
    server = make_server(path, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
