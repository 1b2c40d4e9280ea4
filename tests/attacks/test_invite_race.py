"""Two joiners race with one invite token, and the loser sends a message at once (issue 18,
suspicion: "messages queued behind a session refused at recording may still be delivered").

Both handshakes complete at the inviter - the invite is open in its trust view until the first
session is recorded - but only the first recording consumes the invite; the second session is
refused at recording and closed. A message the loser sent on its session before that must not
reach the inviter's inbox: it came from a node nobody trusts. Before the fix it did (the
message was queued behind the refused record and delivered regardless); now delivery
re-checks that a recorded, trusted session with its sender exists, and counts the refusal.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from peerd.keystore import Keystore
from peerd.mqtt import Message, Topics
from protocol import frames
from protocol.identity import InviteToken
from protocol.messaging import ChannelMessage
from protocol.session import KIND_APP, Output, SendFrame, SessionManager
from tests.attacks.helpers import SOON, Api, Wire, _AcceptAnyone, counted, frame_type
from tests.support.broker import Broker
from tests.support.cluster import make_nodes, wait_until


class Joiner:
    """A node's real keys driving its own session manager. HELLOs (and their retries) go out
    at once; every later frame is held until `release`, so the test decides what reaches the
    inviter together."""

    def __init__(self, wire: Wire, network: str, keys: Keystore) -> None:
        self.wire = wire
        self.topics = Topics(network)
        self.manager = SessionManager(
            peer_id=keys.peer_id,
            network=network,
            static=keys.static,
            credentials=keys.credentials(),
            trust=_AcceptAnyone(),
        )
        self.held: list[SendFrame] = []
        self.finished = threading.Event()  # FINISH written: the handshake is complete here
        wire.subscribe(self.topics.inbox(keys.peer_id), self._inbox)
        wire.call(self._tick)

    def _tick(self) -> None:  # the session layer's timers: HELLO retries
        self._handle(self.manager.on_timer(time.time()))
        self.wire.loop.call_later(0.1, self._tick)

    def _inbox(self, msg: Message) -> None:
        self._handle(self.manager.receive(msg.payload, time.time()))

    def _handle(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, SendFrame):
                kind = frame_type(out.frame)
                if kind == frames.FrameType.HELLO_PSK:
                    self._publish(out)
                else:
                    self.held.append(out)
                    if kind == frames.FrameType.FINISH:
                        self.finished.set()

    def _publish(self, out: SendFrame) -> None:
        self.wire.link.publish_nowait(self.topics.inbox(out.peer_id), out.frame)

    def join(self, token: InviteToken) -> None:
        self.wire.call(
            lambda: self._handle(
                self.manager.join(token.inviter, token.invite_id, token.psk, time.time())
            )
        )

    def send_at_once(self, peer: str, payload: bytes) -> None:
        """Application data right behind the FINISH, before the responder's confirmation (as
        XX allows: the initiator's transport keys exist once it wrote message 3)."""

        def go() -> None:
            handshake = self.manager._peers[peer].handshake
            assert handshake is not None
            assert handshake.session is not None
            self._handle(self.manager._send_on(handshake.session, bytes([KIND_APP]) + payload))

        self.wire.call(go)

    def release(self) -> None:
        for out in self.held:
            self._publish(out)
        self.held.clear()


def test_a_message_from_a_session_refused_at_recording_is_not_delivered(
    tmp_path: Path, module_broker: Broker
) -> None:
    alice, first, second = make_nodes(tmp_path, module_broker.url, ["alice", "first", "second"])
    alice.start()
    a = Api(alice)
    wire = Wire(module_broker.url)
    try:
        before = a.rejections()
        token = InviteToken.from_text(a.call("v1.invite.create", ttl=600)["token"])
        joiners = [
            Joiner(wire, alice.network, Keystore.load(n.dir / "keys", now=time.time()))
            for n in (first, second)
        ]
        for j in joiners:
            j.join(token)
        for j in joiners:
            assert j.finished.wait(SOON), "the inviter answered both HELLOs (the invite is open)"
        loser = joiners[1]
        loser.send_at_once(alice.peer_id, ChannelMessage("race", 1, b"from nobody's node").encode())
        # Both FINISH frames and the loser's message reach alice in one burst: both sessions
        # come up before either is recorded.
        wire.call(lambda: [j.release() for j in joiners])

        wait_until(
            lambda: (
                a.rejected("message-untrusted-session") > 0 or a.call("v1.msg.recv", channel="race")
            ),
            SOON,
            what="alice deciding about the loser's message",
        )
        assert a.call("v1.msg.recv", channel="race") == []
        peers = {p["peer"]: p["state"] for p in a.call("v1.peers")}
        assert peers.get(first.peer_id) == "trusted"
        assert second.peer_id not in peers or peers[second.peer_id] != "trusted"
        new = counted(before, a.rejections())
        assert new.get("message-untrusted-session", 0) >= 1, new
        assert new.get("invite-used", 0) + new.get("refused", 0) >= 1, new
    finally:
        wire.close()
        a.close()
        alice.kill()
