"""`SyncClient`: the blocking API of a running daemon, for scripts and notebooks."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from peerd.client.aio import (
    DEFAULT,
    DEFAULT_TIMEOUT,
    MAX_PENDING_EVENTS,
    Client,
    Event,
    EventStream,
    ReceivedMessage,
    UseDefault,
)

T = TypeVar("T")

# --- the blocking client ------------------------------------------------------------------------


class SyncClient:
    """A blocking `Client` for scripts and notebooks: `with SyncClient() as c: c.call(...)`.

    The async client runs on its own event loop in a background thread, and each method blocks
    on a future of that loop. One connection thus serves many calls and keeps its
    subscriptions, and it works where an event loop is already running in this thread (Jupyter):
    `asyncio.run` per call could do neither. Every coroutine method of `Client` (including typed
    ones added later) is available here as a blocking method.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        config_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="peerd-client-loop", daemon=True
        )
        self._thread.start()
        try:
            self._client = self._run(Client.connect(socket_path, config_path, timeout=timeout))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: do not leave it running
            raise

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def socket_path(self) -> str:
        return self._client.socket_path

    @property
    def server_info(self) -> dict[str, Any]:
        return self._client.server_info

    @property
    def closed(self) -> bool:
        return self._client.closed

    def call(self, method: str, /, **params: Any) -> Any:
        return self._run(self._client.call(method, **params))

    def call_as(self, kind: type[T], method: str, /, **params: Any) -> T:
        return self._run(self._client.call_as(kind, method, **params))

    def request(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | UseDefault | None = DEFAULT,
    ) -> Any:
        return self._run(self._client.request(method, params, timeout=timeout))

    def notify(self, method: str, /, **params: Any) -> None:
        self._run(self._client.notify(method, **params))

    def subscribe(
        self,
        events: str | Iterable[str],
        *,
        filter: Mapping[str, Any] | None = None,
        max_pending: int = MAX_PENDING_EVENTS,
    ) -> SyncEventStream:
        """`with client.subscribe([...]) as events: for event in events: ...`"""
        stream = self._client.subscribe(events, filter=filter, max_pending=max_pending)
        return SyncEventStream(self, stream)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def messages(self, channel: str, *, wait: float = 30.0) -> Iterator[ReceivedMessage]:
        """`Client.messages` as a blocking iterator: each message is acknowledged once the loop
        body has run for it (when the next one is asked for, or the loop ends)."""
        stream = self._client.messages(channel, wait=wait)

        async def next_message() -> ReceivedMessage:
            return await anext(stream)

        try:
            while True:
                try:
                    message = self._run(next_message())
                except StopAsyncIteration:
                    return
                yield message
        finally:
            if not self._loop.is_closed():
                self._run(stream.aclose())

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # Typed methods the daemon work adds to Client (status, peers, send ...) appear here
        # as blocking ones without being written twice.
        attr = getattr(self._client, name) if not name.startswith("_") else None
        if attr is None or not inspect.iscoroutinefunction(attr):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return self._run(attr(*args, **kwargs))

        blocking.__name__ = name
        blocking.__doc__ = attr.__doc__
        return blocking


class SyncEventStream:
    """A subscription of a `SyncClient`: a context manager and a blocking iterator."""

    def __init__(self, client: SyncClient, stream: EventStream) -> None:
        self._client = client
        self._stream = stream

    @property
    def id(self) -> int | None:
        return self._stream.id

    def __enter__(self) -> SyncEventStream:
        self._client._run(self._stream.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._client._loop.is_closed():
            self._client._run(self._stream.close())

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return self._client._run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def get(self, timeout: float | None = None) -> Event:
        """The next event; `Timeout` if none comes within `timeout` seconds."""
        return self._client._run(self._stream.get(timeout))
