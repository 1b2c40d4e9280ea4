"""Authority mode in the running daemon: an extension (`peerd.host.Extension`) behind
`peerd membership install`, `peerd revocation publish`, `peerd succeed-identity` and
`peerd revoke --identity`.

**Publishing an authority revocation.** The broker ACL lets a node retain statements only under
`rev/<its own peer id>/` (spec 2.3), and the authority is not a node: so a member's daemon
relays it (`v1.revocation.publish`). The daemon first verifies the statement against its own
trust store (it refuses what it would not enforce itself), records it, pushes it to its
connected peers and retains it under its own id. Relayed statements are noted in the trust
event log (`revocation-relayed`) and published again after every reconnect, as an issuer does
with its own.

**Retiring a node**: after `peerd.authority.node.retire_identity`, the daemon pushes the
statement to its peers, retains it on the broker, waits for the broker's acknowledgement, and
stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from peerd.authority.node import (
    NodeExpelled,
    install_membership,
    retire_identity,
    succeed_identity,
)
from peerd.authority.texts import (
    MembershipRequest,
    describe_statement,
    membership_from_text,
    statement_from_text,
    statement_to_text,
)
from peerd.control import only, optional, require
from peerd.errors import UsageError
from peerd.host import Extension, control_method
from peerd.mqtt import BrokerError, statement_id
from protocol.identity import (
    PeerState,
    decode_statement,
    format_authority_key,
)
from protocol.messaging import RevocationPush

if TYPE_CHECKING:
    from peerd.host import Host

log = logging.getLogger("peerd.authority")

DAY: Final = 86400
RETIRE_DRAIN: Final = 5.0  # s to wait for the broker to acknowledge a retiring node's statement
RETIRE_STOP_AFTER: Final = 0.5  # s between answering `v1.revoke.identity` and stopping
MEMBERSHIP_WARN: Final = 7 * DAY  # a membership closer than this to its end is logged daily


EVENTS: Final = ("membership.installed", "identity.succeeded", "identity.revoked")


class Authority(Extension):
    """A daemon extension: membership, relayed revocations, succession, retirement."""

    events = EVENTS

    def __init__(self, host: Host) -> None:
        self.host = host
        self._relayed: set[str] | None = None  # statement ids this node relays (lazy)
        self._expelled_logged = False
        self._retiring = False  # retiring itself: that stop is retire()'s, not an expulsion

    # -- daemon hooks ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self._check_own_membership(time.time())
            await asyncio.sleep(DAY)

    async def broker_up(self) -> None:
        """What this node relays goes again after every reconnect, as an issuer's own does."""
        await self._republish()

    def trust_changed(self) -> None:
        record = self.host.store.view().peer(self.host.peer_id)
        if record is None or record.state is not PeerState.REVOKED or self._retiring:
            return
        if not self._expelled_logged:
            self._expelled_logged = True
            expelled = NodeExpelled(
                f"this node ({self.host.peer_id}) was expelled from network"
                f" {self.host.config.node.network!r}: its identity is revoked and its peers"
                " refuse it; stopping"
            )
            log.error("%s", expelled.one_line())
            self.host.stop(expelled)

    def status(self) -> dict[str, Any]:
        keys = self.host.keys
        membership = keys.membership
        usable = membership is not None and membership.identity_public == keys.identity_public
        authority = self.host.config.network.authority_public
        own = self.host.store.view().peer(self.host.peer_id)
        return {
            "authority_key": None if authority is None else format_authority_key(authority),
            "membership": None
            if membership is None
            else {
                "network": membership.network,
                "not_after": membership.not_after,
                "usable": usable and time.time() < membership.not_after,
            },
            "revoked": own is not None and own.state is PeerState.REVOKED,
        }

    def _check_own_membership(self, now: float) -> None:
        m = self.host.keys.membership
        if m is None or self.host.config.network.authority_public is None:
            return
        if now >= m.not_after:
            log.error("this node's membership expired: members refuse new sessions with it")
        elif m.not_after - now < MEMBERSHIP_WARN:
            log.warning(
                "this node's membership expires in %.1f days: ask the authority for a new one",
                (m.not_after - now) / DAY,
            )

    # -- relaying revocations ----------------------------------------------------------------

    async def _relayed_ids(self) -> set[str]:
        if self._relayed is None:
            rows = await self.host.store.fetchall(
                "SELECT detail FROM events WHERE kind = 'revocation-relayed'"
            )
            self._relayed = {json.loads(r[0])["statement_id"] for r in rows}
        return self._relayed

    async def _republish(self) -> None:
        relayed = await self._relayed_ids()
        if not relayed:
            return
        for statement in await self.host.store.revocation_statements():
            if statement_id(statement) in relayed:
                self.host.publish_revocation(statement)

    async def publish(self, statement: bytes) -> dict[str, Any]:
        """Verify, record, push to connected peers and retain on the broker a statement that
        someone else issued (the authority's, or a node's carried here as text)."""
        now = time.time()
        parsed = decode_statement(statement)
        changed = await self.host.store.record_revocation(statement, now=now)
        sid = statement_id(statement)
        relayed = await self._relayed_ids()
        if sid not in relayed:
            async with self.host.store.transaction(now) as tx:
                await tx.log(
                    "revocation-relayed",
                    parsed.peer_id,
                    {"statement_id": sid, **describe_statement(parsed)},
                )
            relayed.add(sid)
        pushed = self._push(statement)
        self.host.publish_revocation(statement)
        if changed:
            self.host.publish_event("trust.revoked", {"via": "command", "peer": parsed.peer_id})
        return {
            **describe_statement(parsed),
            "changed": changed,
            "pushed": pushed,
            "topic": self.host.topics.revocation(self.host.peer_id, statement),
        }

    def _push(self, statement: bytes) -> list[str]:
        push = RevocationPush(statement).encode()
        return [p for p in self.host.connected_peers() if self.host.transmit(p, push)]

    # -- this node's identity ----------------------------------------------------------------

    async def install(self, text: str) -> dict[str, Any]:
        d = self.host
        result = await install_membership(
            d.keys,
            d.store,
            membership_from_text(text),
            network=d.config.node.network,
            authority_key=d.config.network.authority_public,
            now=time.time(),
        )
        # New handshakes present it at once; running sessions do not need it.
        d.identity_changed(rehandshake=False)
        d.publish_event("membership.installed", result)
        return result

    async def succeed(self) -> dict[str, Any]:
        d = self.host
        now = time.time()
        link, result = await succeed_identity(
            d.keys, d.store, now=now, certificate_days=d.config.keys.certificate_days
        )
        # A fresh handshake carries the new chain to every connected peer now.
        d.identity_changed(rehandshake=True)
        if result["membership_lost"]:
            result["membership_request"] = MembershipRequest(
                d.config.node.network, d.keys.peer_id, d.keys.identity_public
            ).to_text()
        log.warning(
            "identity key succeeded (link %d): fingerprint %s", link.index, d.keys.fingerprint
        )
        d.publish_event("identity.succeeded", result)
        return result

    async def retire(self, reason: str) -> dict[str, Any]:
        d = self.host
        self._retiring = True
        statement = await retire_identity(d.keys, d.store, reason=reason, now=time.time())
        encoded = statement.encode()
        pushed = self._push(encoded)
        d.publish_revocation(encoded)
        published = True
        try:
            await d.link.drain(timeout=RETIRE_DRAIN)
        except (BrokerError, TimeoutError) as exc:
            published = False
            log.error("the identity revocation may not have reached the broker: %s", exc)
        log.warning("this node's identity is revoked (%s); stopping for good", reason or "-")
        d.publish_event("identity.revoked", {"peer": d.peer_id, "reason": reason})
        asyncio.get_running_loop().call_later(RETIRE_STOP_AFTER, d.stop)
        return {
            "peer": d.peer_id,
            "statement": statement_to_text(encoded),
            "pushed": pushed,
            "published": published,
            "stopping": True,
        }

    # -- control methods ---------------------------------------------------------------------

    @control_method("v1.membership.install")
    async def _install_method(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        only(params, "membership")
        return await self.install(require(params, "membership", str))

    @control_method("v1.revocation.publish")
    async def _publish_method(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        only(params, "statement")
        return await self.publish(statement_from_text(require(params, "statement", str)))

    @control_method("v1.identity.succeed")
    async def _succeed_method(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        only(params)
        return await self.succeed()

    @control_method("v1.revoke.identity")
    async def _retire_method(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        only(params, "reason", "confirm")
        if optional(params, "confirm", bool, False) is not True:
            raise UsageError("revoking the identity retires this node for good: pass confirm=true")
        return await self.retire(optional(params, "reason", str, ""))
