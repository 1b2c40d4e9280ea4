"""The transfers' control methods: `v1.send`, `v1.transfers`, `v1.transfer.wait`,
`v1.transfer.received`, `v1.cancel`. Each checks its parameters and calls the extension."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

from peerd.control import optional, require
from peerd.errors import UsageError
from peerd.host import control_method
from protocol.identity import parse_peer_id


class TransferMethods:
    """The control methods, declared on the `Transfers` extension through this base."""

    @abstractmethod
    async def send(
        self, path: Path, receivers: list[str], *, answer_within: float | None = None
    ) -> dict[str, Any]: ...

    @abstractmethod
    def transfers(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def wait(self, tid: bytes, within: float | None) -> dict[str, Any]: ...

    @abstractmethod
    async def received(
        self, *, since: float, peer: str | None, name: str | None, within: float
    ) -> dict[str, Any] | None: ...

    @abstractmethod
    def cancel(self, tid: bytes) -> dict[str, Any]: ...

    @control_method("v1.send")
    async def _send_method(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        path = Path(require(params, "path", str))
        to = require(params, "to", list)
        if not to or not all(isinstance(p, str) for p in to):
            raise UsageError("`to` is a non-empty list of peer ids")
        receivers = [parse_peer_id(p) for p in to]
        timeout = optional(params, "timeout", float, None)
        if not path.is_absolute():
            raise UsageError("the path must be absolute (the CLI resolves it)")
        return await self.send(path, receivers, answer_within=timeout)

    @control_method("v1.transfers")
    async def _list_method(self, params: dict[str, Any], conn: Any) -> list[dict[str, Any]]:
        return self.transfers()

    @control_method("v1.transfer.wait")
    async def _wait_method(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        tid = transfer_id(require(params, "id", str))
        return await self.wait(tid, optional(params, "timeout", float, None))

    @control_method("v1.transfer.received")
    async def _received_method(self, params: dict[str, Any], conn: Any) -> dict[str, Any] | None:
        peer = optional(params, "peer", str, None)
        return await self.received(
            since=optional(params, "since", float, 0.0),
            peer=None if peer is None else parse_peer_id(peer),
            name=optional(params, "name", str, None),
            within=min(optional(params, "wait", float, 0.0), 24 * 3600.0),
        )

    @control_method("v1.cancel")
    async def _cancel_method(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        return self.cancel(transfer_id(require(params, "id", str)))


def transfer_id(text: str) -> bytes:
    try:
        tid = bytes.fromhex(text)
    except ValueError:
        tid = b""
    if len(tid) != 16:
        raise UsageError(f"{text!r} is not a transfer id (32 hex digits)")
    return tid
