"""The node's own control methods (status, peers, pairing, trust, keys, diagnostics) and the
JSON views they return. The daemon implements `NodeOps`; the methods are declared with
`peerd.host.control_method` and registered with every extension's."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Protocol

from peerd.control import optional, require
from peerd.host import control_method
from protocol.identity import parse_fingerprint, parse_peer_id

if TYPE_CHECKING:
    from peerd.config import Config
    from peerd.mqtt import BrokerLink
    from peerd.store import Store

JOIN_TIMEOUT = 30.0
# Why a join ended at once: the inviter's REFUSED frame (SPEC.md 3), in words.
JOIN_REFUSALS = {
    "invite-used": "this invite was already used (each works once): ask the inviter for a new "
    "one (peerd invite)",
    "invite-expired": "this invite has expired: ask the inviter for a new one (peerd invite)",
}


def broker_json(link: BrokerLink, client: str) -> dict[str, Any]:
    """The broker part of `peerd status`."""
    return {
        "url": link.settings.url,
        "client": client,
        "max_packet_size": link.limits.max_packet_size,
        "limits": dataclasses.asdict(link.limits),  # for `peerd doctor`
        "connected": link.connected,
        "queued": link.queued,
        "last_error": None if link.last_error is None else str(link.last_error),
        # Each configured URL: the one in use, and why the others were left.
        "urls": link.brokers.view(),
        "stats": link.stats.as_dict(),
    }


class NodeOps(Protocol):
    """What the node's control methods need of the daemon."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    def status(self) -> dict[str, Any]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def handshakes(self) -> list[dict[str, Any]]: ...

    async def join(self, token_text: str, within: float) -> dict[str, Any]: ...

    async def rotate(self, *, reason: str = "command") -> dict[str, Any]: ...

    async def revoke_own(self, reason: str) -> dict[str, Any]: ...

    def connect(self, peer: str) -> None: ...

    def has_session(self, peer: str) -> bool: ...

    def handshake_now(self, peer: str) -> None: ...

    def close_sessions(self, peer: str, reason: str) -> None: ...


class NodeMethods:
    def __init__(self, node: NodeOps) -> None:
        self.node = node

    @control_method("v1.status")
    async def _status(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        return self.node.status()

    @control_method("v1.peers")
    async def _peers(self, params: dict[str, Any], conn: Any) -> list[dict[str, Any]]:
        names = await self.node.store.peer_names()
        return [{**p, "name": names.get(p["peer"], "")} for p in self.node.peers()]

    @control_method("v1.peer.name")
    async def _name(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        peer = parse_peer_id(require(params, "peer", str))
        await self.node.store.name_peer(peer, require(params, "name", str), now=time.time())
        names = await self.node.store.peer_names()
        return {"peer": peer, "name": names.get(peer, "")}

    @control_method("v1.invite.create")
    async def _invite(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        ttl = optional(params, "ttl", int, 3600)
        note = optional(params, "note", str, "")
        token = await self.node.store.create_invite(
            network=self.node.config.node.network, ttl=ttl, now=time.time(), note=note
        )
        return {
            "token": token.to_text(),
            "expires_at": token.expires_at,
            "invite_id": token.invite_id.hex(),
        }

    @control_method("v1.join")
    async def _join(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        token = require(params, "token", str)
        timeout = optional(params, "timeout", float, JOIN_TIMEOUT)
        name = optional(params, "name", str, "")
        result = await self.node.join(token, timeout)
        if name:
            await self.node.store.name_peer(result["peer"], name, now=time.time())
        return {**result, "name": name}

    @control_method("v1.trust")
    async def _trust(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        peer = parse_peer_id(require(params, "peer", str))
        fp = optional(params, "fingerprint", str, None)
        if fp is not None:
            fp = parse_fingerprint(fp)
        record = await self.node.store.trust(peer, fingerprint=fp, now=time.time())
        self.node.connect(peer)
        return peer_json(record, connected=self.node.has_session(peer))

    @control_method("v1.block")
    async def _block(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        peer = parse_peer_id(require(params, "peer", str))
        record = await self.node.store.block(peer, now=time.time())
        self.node.close_sessions(peer, "blocked")
        return peer_json(record, connected=False)

    @control_method("v1.rotate")
    async def _rotate(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        return await self.node.rotate()

    @control_method("v1.revoke")
    async def _revoke(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        reason = optional(params, "reason", str, "")
        return await self.node.revoke_own(reason)

    @control_method("v1.connect")
    async def _connect(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        peer = parse_peer_id(require(params, "peer", str))
        self.node.handshake_now(peer)
        return {"peer": peer, "connecting": True}

    @control_method("v1.handshakes")
    async def _handshakes(self, params: dict[str, Any], conn: Any) -> list[dict[str, Any]]:
        return self.node.handshakes()

    @control_method("v1.debug.tasks")
    async def _tasks(self, params: dict[str, Any], conn: Any) -> list[dict[str, Any]]:
        """Every asyncio task and where it waits: for diagnosing a stuck daemon."""
        out = []
        for task in asyncio.all_tasks():
            frames = task.get_stack(limit=8)
            out.append(
                {
                    "name": task.get_name(),
                    "stack": [
                        f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                        for f in frames
                    ],
                }
            )
        return out

    @control_method("v1.audit.verify")
    async def _audit(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        report = await self.node.store.verify_log()
        return {"entries": report.entries, "head": report.head.hex()}


# Refusals counted outside the session layer, under the labels `peerd status` shows.
_LINK_DROPS = {
    "dropped_queue_full": "broker-queue-full",
    "dropped_oversize": "broker-oversize",
    "dropped_unsolicited": "broker-unsolicited",
    "dropped_bad_topic": "broker-bad-topic",
    "protocol_errors": "broker-protocol-error",
    "handler_errors": "broker-handler-error",
}
_CONTROL_ERRORS = {"-32700": "control-parse-error", "-32600": "control-invalid-request"}


def local_refusals(control: dict[str, Any], link: dict[str, int]) -> dict[str, int]:
    """The control socket's refused callers and bad lines and the broker link's dropped
    packets, as `rejections` entries (zeros left out)."""
    out = {f"control-{k}": v for k, v in control["refused"].items()}
    out["control-closed-for-garbage"] = control["closed_for_garbage"]
    out["control-subscriber-dropped"] = control["subscribers_dropped"]
    out.update({label: control["errors"].get(code, 0) for code, label in _CONTROL_ERRORS.items()})
    out.update({label: link.get(name, 0) for name, label in _LINK_DROPS.items()})
    return {k: v for k, v in out.items() if v}


def peer_json(record: Any, *, connected: bool) -> dict[str, Any]:
    cert = record.certificate
    return {
        "peer": record.peer_id,
        "state": record.state.value,
        "source": None if record.source is None else record.source.value,
        "fingerprint": record.fingerprint,
        "serial": None if cert is None else cert.serial,
        "connected": connected,
        "updated_at": record.updated_at,
    }
