"""Revocations that reach nodes that were offline, on every broker: the per-issuer index.

A retained statement sits on `rev/<issuer>/<statement id>`, a topic a node meets only through its
`rev/#` subscription. RabbitMQ sends retained messages to exact subscriptions only, never to
wildcard ones, so there a node that was offline when a statement was published never learned it
when it came back (until the issuer happened to reconnect and publish it again). So each node
also keeps `rev/<its id>/index` retained: a bounded list of the statements it publishes (its own,
and the authority's it holds), newest first (protocol/messaging.py, protocol/SPEC.md 2.1). And
each node subscribes to the exact index topic of every peer it knows: a topic it can name
without knowing the statements, which every broker answers with the retained copy at every
(re)subscription. A statement from an index passes the same checks as one on its own topic
(`Revocations.check_broker_statement`) and the same per-publisher lane.

What it costs: one retained message per node that published a statement, and one subscription
per known peer (at most `MAX_WATCHED`, the peers seen most recently; beyond them, the wildcard
subscription and the sessions' push remain, as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from peerd.host import Extension
from peerd.mqtt import BrokerError, LinkClosed, statement_id
from protocol.errors import RemoteProtocolError
from protocol.identity import AuthorityRevocation, PeerState, Revocation, decode_statement
from protocol.messaging import decode_revocation_index, encode_revocation_index

if TYPE_CHECKING:
    from peerd.host import Host, Subscribed
    from peerd.mqtt import Message
    from peerd.revocations import Revocations

__all__ = ["MAX_WATCHED", "RevocationIndex"]

log = logging.getLogger("peerd")

RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # s between tries after a refused subscription or publish
STOP_PUBLISH_WAIT = 2.0  # s, at shutdown, for our index to be acknowledged
MAX_WATCHED = 256  # exact index subscriptions: one per known peer, the most recent first


class RevocationIndex(Extension):
    def __init__(self, host: Host, revocations: Revocations) -> None:
        self.host = host
        self.revocations = revocations
        self._watched: dict[str, Subscribed] = {}
        self._published: bytes | None = None  # the index last published (None: publish again)
        self._dirty = asyncio.Event()
        self._dirty.set()
        self.counts = {"published": 0, "read": 0}

    async def run(self) -> None:
        retry = RETRY_FIRST
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._watch()
                await self._publish()
            except LinkClosed:
                return  # the daemon is stopping
            except BrokerError as exc:
                # Refused for now (a NATS cluster electing a stream leader refuses for seconds):
                # asked again with backoff, or a node back from an outage would watch no index.
                log.info("revocation index: %s; trying again in %.0fs", exc, retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)
                self._dirty.set()
            else:
                retry = RETRY_FIRST

    async def stop(self) -> None:
        # A node stopped right after `peerd revoke` (the laptop-stolen case) must leave its
        # index on the broker: on RabbitMQ it is how a node offline now learns the statement.
        if self.host.link.connected:
            with contextlib.suppress(BrokerError, TimeoutError):
                async with asyncio.timeout(STOP_PUBLISH_WAIT):
                    await self._publish()
        watched, self._watched = self._watched, {}
        for sub in watched.values():
            await sub.close()

    def trust_changed(self) -> None:
        self._dirty.set()  # a peer known (watch its index), or a statement of ours (publish)

    async def broker_up(self) -> None:
        self._published = None  # the broker may have lost it: publish again (same bytes)
        self._dirty.set()

    def status(self) -> dict[str, Any]:
        return {
            "revocation_index": {
                "watched": len(self._watched),
                "published": self.counts["published"],
                "statements_read": self.counts["read"],
            }
        }

    # -- watching the peers' indexes --

    async def _watch(self) -> None:
        me = self.host.peer_id
        peers = sorted(
            (
                p
                for p in self.host.store.view().peers()
                if p.peer_id != me and p.state is not PeerState.REVOKED
            ),
            key=lambda p: p.updated_at,
            reverse=True,
        )
        wanted = {p.peer_id for p in peers[:MAX_WATCHED]}
        for peer in list(self._watched):
            if peer not in wanted:
                await self._watched.pop(peer).close()
        for peer in sorted(wanted - set(self._watched)):
            self._watched[peer] = await self.host.link.subscribe(
                self.host.topics.revocation_index(peer), qos=1, handler=self.on_index
            )

    def on_index(self, msg: Message) -> None:
        """A peer's index (in the link's read path): each statement as if on its own topic."""
        where = self.host.topics.parse(msg.topic)
        if where is None or where[0] != "rev-index" or not msg.payload:
            return  # an index cleared: it un-revokes nothing (the store keeps what it learned)
        (publisher,) = where[1]
        try:
            statements = decode_revocation_index(msg.payload)
        except RemoteProtocolError as exc:
            self.host.count_rejection(
                "revocation-index-malformed", "the revocation index of %s: %s", publisher, exc
            )
            return
        self.counts["read"] += len(statements)
        for statement in statements:
            self.revocations.check_broker_statement(publisher, statement, statement_id(statement))

    # -- publishing ours --

    async def _publish(self) -> None:
        me = self.host.peer_id
        ours = []
        for statement in reversed(await self.host.store.revocation_statements()):
            try:
                parsed = decode_statement(statement)
            except RemoteProtocolError:
                continue  # the store checked it when it recorded it
            if isinstance(parsed, AuthorityRevocation) or (
                isinstance(parsed, Revocation) and parsed.peer_id == me
            ):
                ours.append(statement)
        if not ours:
            return  # nothing to say: no retained message for every node of the network
        index = encode_revocation_index(ours)
        if index == self._published:
            return
        await self.host.link.publish(
            self.host.topics.revocation_index(me), index, qos=1, retain=True
        )
        self._published = index
        self.counts["published"] += 1
        log.debug("revocation index published: %d statement(s)", len(ours))
