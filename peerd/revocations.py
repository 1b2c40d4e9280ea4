"""Revocation statements coming in: retained on the broker under `rev/<publisher>/<id>`, or
pushed by a peer inside its session. And this node's own going out again after every reconnect.

The cheap checks run in the link's read path, before anything is queued: the topic's shape, the
statement id against the payload's hash, decoding, and that an owner's statement is the
publisher's own, an authority's, or a known peer's it relays (protocol/SPEC.md 2). The
signature is checked in the event task, within the publisher's lane and rate
(`peerd.events.EventLanes.statement`), when the store records it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from peerd.errors import PeerdError
from peerd.host import Extension
from peerd.logs import log_event
from peerd.mqtt import statement_id, subscribe_steadily
from protocol.errors import RemoteProtocolError
from protocol.identity import Revocation, decode_statement
from protocol.messaging import RevocationPush

if TYPE_CHECKING:
    from peerd.events import EventLanes
    from peerd.host import Host
    from peerd.mqtt import Message
    from protocol.messaging import AppMessage

log = logging.getLogger("peerd")


class Revocations(Extension):
    events = ("trust.revoked",)

    def __init__(self, host: Host, lanes: EventLanes) -> None:
        self.host = host
        self.lanes = lanes
        self.applied = 0  # statements that changed the trust store (metrics)

    async def run(self) -> None:
        await subscribe_steadily(
            self.host.link, self.host.topics.revocations, qos=1, handler=self.on_broker_message
        )

    def status(self) -> dict[str, Any]:
        return {"revocations": {"applied": self.applied}}

    async def broker_up(self) -> None:
        """Retained statements can be lost with a broker's state: this node's own go again."""
        for statement in await self.host.store.revocation_statements(self.host.peer_id):
            self.host.publish_revocation(statement)

    def on_app(self, peer: str, app: AppMessage) -> None:
        if isinstance(app, RevocationPush):
            # Pushed by an authenticated peer: its lane is its own. A statement verifies itself,
            # whatever the trust in the peer that carried it.
            self.admit(peer, app.statement, source=peer)

    def on_broker_message(self, msg: Message) -> None:
        """A statement from `rev/<publisher>/<statement id>` (in the link's read path)."""
        refuse = self.host.count_rejection
        statement = msg.payload
        where = self.host.topics.parse(msg.topic)
        if where is not None and where[0] == "rev-index":
            return  # an issuer's index: peerd/revocation_index.py reads those it watches
        if not statement:
            # Someone cleared a retained statement: it un-revokes nothing (the store keeps
            # what it learned), but an operator should see the attempt.
            refuse("revocation-cleared", "a retained revocation cleared on %s", msg.topic)
            return
        if where is None or where[0] != "rev":
            refuse("revocation-bad-topic", "a revocation on topic %r", msg.topic[:200])
            return
        publisher, sid = where[1]
        self.check_broker_statement(publisher, statement, sid)

    def check_broker_statement(self, publisher: str, statement: bytes, sid: str) -> None:
        """The cheap checks of a statement published under `rev/<publisher>/` (on its own
        topic `sid`, or in the publisher's index), then `admit`."""
        refuse = self.host.count_rejection
        if sid != statement_id(statement):
            refuse(
                "revocation-topic-mismatch", "a revocation under %s that is not %s", publisher, sid
            )
            return
        try:
            parsed = decode_statement(statement)
        except RemoteProtocolError as exc:
            refuse("revocation-malformed", "a revocation from %s: %s", publisher, exc)
            return
        # Under rev/<publisher>/ the ACL lets only the publisher write: its own statements, an
        # authority's it relays, or (relayed) another node's - taken only for a peer this node
        # knows, so that one account cannot retain statements of made-up identities.
        if (
            isinstance(parsed, Revocation)
            and parsed.peer_id != publisher
            and self.host.store.view().peer(parsed.peer_id) is None
        ):
            refuse(
                "revocation-wrong-issuer",
                "%s published a revocation of %s, a peer this node does not know",
                publisher,
                parsed.peer_id,
            )
            return
        self.admit(publisher, statement, source="broker", sid=sid)

    def admit(
        self, publisher: str, statement: bytes, *, source: str, sid: str | None = None
    ) -> None:
        """Queue `statement` in its publisher's lane, to be verified and recorded."""
        sid = sid or statement_id(statement)
        refused = self.lanes.statement(
            publisher, sid, lambda: self._learn(statement, source=source, sid=sid)
        )
        if refused is not None and refused != "duplicate":  # a replay is no error (the store's)
            self.host.count_rejection(
                f"revocation-{refused}", "a revocation from %s not queued: %s", publisher, refused
            )

    async def _learn(self, statement: bytes, *, source: str, sid: str) -> None:
        try:
            changed = await self.host.store.record_revocation(statement, now=time.time())
        except PeerdError as exc:
            reason = f"revocation-{getattr(exc, 'reason', 'malformed')}"
            self.host.count_rejection(
                reason, "revocation statement from %s refused: %s", source, exc
            )
            return
        self.lanes.applied(sid)
        if changed:
            self.applied += 1
            log_event(log, "revocation.applied", logging.WARNING, via=source)
            self.host.publish_event("trust.revoked", {"via": source})
