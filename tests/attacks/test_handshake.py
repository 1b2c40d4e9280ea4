"""Attacks on the handshake between running daemons, through a hostile broker: a man in the
middle with substituted static keys, key-compromise impersonation, identity misbinding,
downgrade of the protocol version, network or suite, and replayed handshake messages.

Each test asserts the outcome (no session, nothing revealed) and the reason the daemon counts
in its status. alice, bob and carol are paired with each other and sit behind the proxy.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from protocol import frames
from protocol.noise import HandshakeState, KeyPair
from protocol.resumption import NOISE_RESUME
from protocol.session import NOISE_XX, Rejected, SendFrame, SessionManager, prologue
from tests.attacks.helpers import (
    SOON,
    Api,
    Rogue,
    counted,
    frame_type,
    keys,
    responder,
    with_reply_to,
)
from tests.support.cluster import Node, wait_until
from tests.support.hostile import (
    TO_BROKER,
    TO_CLIENT,
    Drop,
    HostileProxy,
    Packet,
    Record,
    Rewrite,
)

HELLO, REPLY, FINISH, DATA, RESUME, EARLY = 1, 3, 4, 5, 6, 7


def _inbox(node: Node) -> str:
    return f"peerd/v1/{node.network}/in/{node.peer_id}"


def _force_xx(proxy: HostileProxy, victim: Node, target: Node) -> None:
    """Drop `victim`'s resumptions to `target` (SPEC.md 4.7): these peers met before, so their
    next handshake is a one-round-trip resumption, which an attacker without the ticket can only
    drop; after one handshake timeout `victim` falls back to XX, the handshake attacked here."""
    proxy.add_rule(
        TO_BROKER,
        _inbox(target),
        Drop(),
        client=victim.peer_id,
        where=lambda pkt: frame_type(pkt.payload) == RESUME,
    )


def _mitm(proxy: HostileProxy, victim: Node, target: Node, rogue: SessionManager) -> list[Packet]:
    """Terminate every handshake `victim` starts with `target` at `rogue`: its HELLOs never
    reach `target`; `rogue`'s answers go to `victim`. Returns what else `victim` sent
    `target` meanwhile (a FINISH there would mean it revealed itself)."""
    sent: list[Packet] = []

    def intercept(p: HostileProxy, pkt: Packet) -> list[Packet]:
        if frame_type(pkt.payload) != HELLO:
            sent.append(pkt)
            return [] if frame_type(pkt.payload) == FINISH else [pkt]
        for out in rogue.receive(pkt.payload, 0.0):
            if isinstance(out, SendFrame):
                p.inject(TO_CLIENT, _inbox(victim), out.frame, client=victim.peer_id)
            else:
                assert not isinstance(out, Rejected), out
        return []

    _force_xx(proxy, victim, target)
    proxy.add_rule(TO_BROKER, _inbox(target), Rewrite(intercept), client=victim.peer_id)
    return sent


def _claims(payload: bytes) -> str | None:
    """The peer a HELLO claims to come from (None for other frames)."""
    if frame_type(payload) != HELLO:
        return None
    hello = frames.decode(payload)
    assert isinstance(hello, frames.Hello)
    return hello.reply_to


def _attack(api: Api, trigger: Callable[[], None], reason: str) -> dict[str, int]:
    before = api.rejections()
    trigger()
    api.wait_rejected(reason, before.get(reason, 0) + 1)
    return counted(before, api.rejections())


def _connect(api: Api, peer: Node) -> Callable[[], None]:
    return lambda: api.call("v1.connect", peer=peer.peer_id)


@pytest.mark.parametrize(
    ("presents", "reason"),
    [("its own credentials", "wrong-peer"), ("the victim's certificate", "static-mismatch")],
)
def test_man_in_the_middle_with_a_substituted_static_key(
    trio: tuple[Node, Node, Node],
    apis: dict[str, Api],
    proxy: HostileProxy,
    presents: str,
    reason: str,
) -> None:
    """The broker answers alice's handshake with bob in bob's place, with a static key of its
    own: carol's real identity (a member of the network, but not bob), or bob's genuine
    certificate with a key that certificate does not name. alice refuses before message 3:
    she never sends her own identity to the impostor."""
    alice, bob, carol = trio
    mallory = keys(carol)
    if presents == "its own credentials":
        rogue = responder(
            alice, claim=bob.peer_id, static=mallory.static, credentials=mallory.credentials()
        )
    else:
        rogue = responder(
            alice,
            claim=bob.peer_id,
            static=KeyPair.generate(),
            credentials=keys(bob).credentials(),
        )
    sent = _mitm(proxy, alice, bob, rogue)
    sessions = _sessions_with(apis["alice"], bob)
    new = _attack(apis["alice"], _connect(apis["alice"], bob), reason)
    assert new[reason] >= 1
    assert [frame_type(p.payload) for p in sent if frame_type(p.payload) == FINISH] == []
    assert _sessions_with(apis["alice"], bob) == sessions


def _sessions_with(api: Api, peer: Node) -> int:
    """How many sessions with `peer` came up so far (a successful attack would add one)."""
    return sum(1 for h in api.handshakes() if h["peer"] == peer.peer_id)


def test_key_compromise_impersonation_fails_both_ways(
    trio: tuple[Node, Node, Node], apis: dict[str, Api], proxy: HostileProxy
) -> None:
    """Mallory stole alice's static private key. With it she can be alice (until alice rotates
    or revokes), but she cannot make alice believe she is bob: bob's certificate names bob's
    static key, and the handshake's DH with it needs bob's private key, not alice's. Tried as
    initiator (a HELLO claiming bob) and as responder (answering alice's HELLO to bob)."""
    alice, bob, _ = trio
    stolen = keys(alice).static
    forged = KeyPair(stolen.private, keys(bob).static.public)  # bob's public half, alice's secret
    bob_creds = keys(bob).credentials()
    api = apis["alice"]

    rogue = Rogue(
        alice.broker_url, network=alice.network, claim=bob.peer_id, static=forged,
        credentials=bob_creds,
    )  # fmt: skip
    try:
        _attack(api, lambda: rogue.connect(alice.peer_id), "decrypt")
        assert rogue.sessions_up() == []
    finally:
        rogue.close()

    mitm = responder(alice, claim=bob.peer_id, static=forged, credentials=bob_creds)
    _mitm(proxy, alice, bob, mitm)
    _attack(api, _connect(api, bob), "decrypt")
    proxy.clear_rules()
    # The real bob is unaffected.
    api.call("v1.connect", peer=bob.peer_id)
    wait_until(lambda: api.connected(bob), SOON, what="alice and bob still connect")


def test_identity_misbinding_is_refused(
    trio: tuple[Node, Node, Node], apis: dict[str, Api], proxy: HostileProxy
) -> None:
    """The broker relays alice's handshake with carol as if it came from bob: carol sees a
    HELLO claiming bob (whom she trusts), answers into bob's inbox, and the broker carries
    that to alice, who completes it with her own credentials. carol compares the credentials
    with the claim and refuses: she never believes she talks to bob."""
    alice, bob, carol = trio
    api = apis["carol"]
    _force_xx(proxy, alice, carol)
    proxy.add_rule(
        TO_CLIENT,
        _inbox(carol),
        Rewrite(lambda p, pkt: [pkt.changed(payload=with_reply_to(pkt.payload, bob.peer_id))]),
        client=carol.peer_id,
        where=lambda pkt: _claims(pkt.payload) == alice.peer_id,
        count=1,
    )
    proxy.add_rule(
        TO_BROKER,
        _inbox(bob),
        Rewrite(lambda p, pkt: [pkt.changed(topic=_inbox(alice))]),
        client=carol.peer_id,
        where=lambda pkt: frame_type(pkt.payload) == REPLY,
        count=1,
    )
    before = api.rejections()
    apis["alice"].call("v1.connect", peer=carol.peer_id)
    api.wait_rejected("wrong-peer", before.get("wrong-peer", 0) + 1)
    # alice's own retry (without the broker's help) still reaches carol.
    proxy.clear_rules()
    wait_until(lambda: apis["alice"].connected(carol), SOON, what="alice reaches carol")


@pytest.mark.parametrize(
    "other",
    [
        {"version": 2},
        {"network": "othernet"},
        {"suite": "Noise_XX_25519_AESGCM_SHA256"},
    ],
    ids=["version", "network", "suite"],
)
def test_downgrade_to_another_version_network_or_suite_never_completes(
    trio: tuple[Node, Node, Node],
    apis: dict[str, Api],
    proxy: HostileProxy,
    other: dict[str, object],
) -> None:
    """bob's genuine keys, but another protocol version, network name or suite in the
    prologue: alice cannot decrypt the answer, so no session of another kind ever comes up
    (there is no negotiation to downgrade)."""
    alice, bob, _ = trio
    network = str(other.get("network", alice.network))
    suite = str(other.get("suite", NOISE_XX))
    wrong = prologue(network, suite)
    if "version" in other:
        wrong = wrong[:6] + bytes([int(other["version"])]) + wrong[7:]  # type: ignore[call-overload]
    bob_keys = keys(bob)
    rogue = responder(
        alice, claim=bob.peer_id, static=bob_keys.static, credentials=bob_keys.credentials(),
        prologue=wrong,
    )  # fmt: skip
    sent = _mitm(proxy, alice, bob, rogue)
    sessions = _sessions_with(apis["alice"], bob)
    _attack(apis["alice"], _connect(apis["alice"], bob), "decrypt")
    assert [p for p in sent if frame_type(p.payload) == FINISH] == []
    assert _sessions_with(apis["alice"], bob) == sessions


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x02\x01" + bytes(60), "version"),
        (b"\x01\x09" + bytes(60), "malformed"),
        (b"\x01\x01" + bytes(4) + b"\x14" + b"A" * 20 + bytes(32), "malformed"),
        (b"\x01\x05" + bytes(12), "malformed"),
        (b"\x01\x05" + bytes(70_000), "oversize"),
    ],
    ids=["other-version", "unknown-type", "bad-reply-to", "short-data", "oversize"],
)
def test_frames_of_another_version_or_kind_are_dropped(
    trio: tuple[Node, Node, Node], apis: dict[str, Api], proxy: HostileProxy, frame: bytes,
    reason: str,
) -> None:  # fmt: skip
    alice, _, _ = trio
    api = apis["alice"]
    before = api.rejected(reason)
    proxy.inject(TO_CLIENT, _inbox(alice), frame, client=alice.peer_id)
    api.wait_rejected(reason, before + 1)


def test_replayed_handshake_messages_do_nothing(
    trio: tuple[Node, Node, Node], apis: dict[str, Api], proxy: HostileProxy
) -> None:
    """A recorded handshake replayed: the HELLO is answered (XX message 1 carries no proof)
    but the answer finds no handshake at alice; the REPLY and FINISH find nothing either. No
    session comes up from it, before or after the responder restarts."""
    alice, bob, _ = trio
    a, b = apis["alice"], apis["bob"]
    _force_xx(proxy, alice, bob)
    proxy.add_rule(TO_BROKER, _inbox(bob), Record(), client=alice.peer_id)
    proxy.add_rule(TO_BROKER, _inbox(alice), Record(), client=bob.peer_id)
    sessions_before = len(a.handshakes())
    a.call("v1.connect", peer=bob.peer_id)
    wait_until(lambda: len(a.handshakes()) > sessions_before, SOON, what="a fresh session")
    recorded = {frame_type(p.payload): p for p in proxy.recordings("#")}
    proxy.clear_rules()
    assert {HELLO, REPLY, FINISH} <= set(recorded)
    ups_a, ups_b = len(a.handshakes()), len(b.handshakes())

    before_a, before_b = a.rejected("unknown-session"), b.rejected("unknown-session")
    proxy.replay([recorded[HELLO]])  # bob answers it; alice has no such handshake
    a.wait_rejected("unknown-session", before_a + 1)
    proxy.replay([recorded[REPLY]])
    a.wait_rejected("unknown-session", before_a + 2)
    proxy.replay([recorded[FINISH]])
    b.wait_rejected("unknown-session", before_b + 1)
    assert (len(a.handshakes()), len(b.handshakes())) == (ups_a, ups_b)

    bob.stop()
    bob.start()
    before_b = b.rejected("unknown-session")
    proxy.replay([recorded[FINISH]])
    b.wait_rejected("unknown-session", before_b + 1)
    a.call("v1.connect", peer=bob.peer_id)
    wait_until(lambda: a.connected(bob) and b.connected(alice), SOON, what="alice and bob again")


def _inbox_messages(api: Api, channel: str) -> list[bytes]:
    import base64  # noqa: PLC0415

    got = api.call("v1.msg.recv", channel=channel, limit=1000, wait=0.0)
    return [base64.b64decode(m["data_b64"]) for m in got]


def test_replayed_transport_frames_are_refused_within_across_sessions_and_after_restart(
    trio: tuple[Node, Node, Node], apis: dict[str, Api], proxy: HostileProxy
) -> None:
    """DATA frames recorded off the broker and replayed: within their session the replay
    window refuses them (`replay`); after a rekey the superseded session still refuses them
    (it keeps receiving for a grace period, with its window); after the receiver restarted the
    session is gone (`unknown-session`). The message they carried is delivered exactly once."""
    import base64  # noqa: PLC0415

    alice, bob, _ = trio
    a, b = apis["alice"], apis["bob"]
    a.call("v1.connect", peer=bob.peer_id)
    wait_until(lambda: a.connected(bob) and b.connected(alice), SOON, what="a session")
    channel = "replay/check"
    record = proxy.add_rule(
        TO_BROKER,
        _inbox(bob),
        Record(),
        client=alice.peer_id,
        where=lambda pkt: frame_type(pkt.payload) == DATA,
    )
    data = base64.b64encode(b"pay once").decode()
    a.call("v1.msg.send", peer=bob.peer_id, channel=channel, data_b64=data)
    wait_until(lambda: _inbox_messages(b, channel), SOON, what="bob receives the message")
    proxy.remove_rule(record)
    frames_ = proxy.recordings("#")
    assert frames_
    before = b.rejected("replay")
    proxy.replay(frames_)  # within the session
    b.wait_rejected("replay", before + len(frames_))
    sessions = len(a.handshakes())
    a.call("v1.connect", peer=bob.peer_id)
    wait_until(lambda: len(a.handshakes()) > sessions, SOON, what="a new session (rekey)")
    proxy.replay(frames_)  # the superseded session still receives, with its window
    b.wait_rejected("replay", before + 2 * len(frames_))
    bob.stop()
    bob.start()
    before = b.rejected("unknown-session")
    proxy.replay(frames_)
    b.wait_rejected("unknown-session", before + len(frames_))
    assert _inbox_messages(b, channel) == [b"pay once"]


def test_a_classic_x25519_only_hello_is_refused_by_name(
    trio: tuple[Node, Node, Node], apis: dict[str, Api], proxy: HostileProxy
) -> None:
    """Downgrade to the pre-hybrid protocol: a well-formed X25519-only XX HELLO from a trusted
    peer (an older peerd, or a man in the middle stripping the KEM) gets no answer and is counted
    as `classic-handshake`, which `peerd status` names."""
    alice, bob, _ = trio
    api = apis["alice"]
    classic = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
    hs = HandshakeState(classic, True, prologue(alice.network, classic), s=KeyPair.generate())
    hello = frames.encode_hello(7, bob.peer_id, hs.write_message(), None)
    replies = proxy.add_rule(
        TO_BROKER, _inbox(bob), Record(), client=alice.peer_id,
        where=lambda pkt: frame_type(pkt.payload) == REPLY,
    )  # fmt: skip
    before = api.rejected("classic-handshake")
    proxy.inject(TO_CLIENT, _inbox(alice), hello, client=alice.peer_id)
    api.wait_rejected("classic-handshake", before + 1)
    proxy.remove_rule(replies)
    assert proxy.recordings("#") == []
    line = next(x for x in alice.cli("status").splitlines() if x.startswith("rejected"))
    assert "classic-handshake" in line


def test_a_replayed_resume_and_its_early_data_bring_up_nothing(
    trio: tuple[Node, Node, Node], apis: dict[str, Api], proxy: HostileProxy
) -> None:
    """A resumption recorded off the broker (SPEC.md 4.7): alice, restarted, sends bob a message
    as early data behind her RESUME. Replayed, the RESUME finds no ticket (`unknown-ticket`, no
    answer, no session) - also after bob restarted, the erasure being stored - and the EARLY
    frame finds its window (`replay`) or no resumption (`unknown-session`). The message is
    delivered once."""
    import base64  # noqa: PLC0415

    alice, bob, _ = trio
    a, b = apis["alice"], apis["bob"]
    a.call("v1.connect", peer=bob.peer_id)
    wait_until(lambda: a.connected(bob) and b.connected(alice), SOON, what="a session")
    alice.stop()
    alice.start()
    record = proxy.add_rule(
        TO_BROKER,
        _inbox(bob),
        Record(),
        client=alice.peer_id,
        where=lambda pkt: frame_type(pkt.payload) in (RESUME, EARLY),
    )
    channel = "resume/check"
    a.call(
        "v1.msg.send",
        peer=bob.peer_id,
        channel=channel,
        data_b64=base64.b64encode(b"once").decode(),
    )
    wait_until(lambda: _inbox_messages(b, channel), SOON, what="bob receives the early message")
    proxy.remove_rule(record)
    recorded = {frame_type(p.payload): p for p in proxy.recordings("#")}
    assert set(recorded) == {RESUME, EARLY}  # the message went as early data
    assert b.handshakes()[-1]["protocol"] == NOISE_RESUME
    index = frames.decode(recorded[RESUME].payload).sender_index  # type: ignore[union-attr]

    def sessions_from_it() -> int:
        return sum(h["session_id"][0] == index for h in b.handshakes())

    assert sessions_from_it() == 1
    for attempt in (1, 2):
        before_ticket = b.rejected("unknown-ticket")
        before_early = b.rejected("replay") + b.rejected("unknown-session")
        proxy.replay([recorded[RESUME], recorded[EARLY]])
        b.wait_rejected("unknown-ticket", before_ticket + 1)
        wait_until(
            lambda n=before_early: b.rejected("replay") + b.rejected("unknown-session") > n,
            SOON,
            what="bob to refuse the replayed EARLY frame",
        )
        assert sessions_from_it() == (1 if attempt == 1 else 0)
        if attempt == 1:
            bob.stop()
            bob.start()
    assert _inbox_messages(b, channel) == [b"once"]  # delivered once, never again
