"""The session layer: handshakes over frames, trust checks, transport, replay, rekey, floods."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import frames
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.noise import MLKEM768, HandshakeState, KeyPair
from protocol.session import (
    MAX_PAYLOAD,
    NOISE_XX,
    NOISE_XXPSK0,
    NOISE_XXPSK3,
    HandshakeFailed,
    Message,
    Rejected,
    ReplayWindow,
    SendFrame,
    SessionDown,
    SessionLimits,
    SessionManager,
    SessionUp,
    combine_psk,
    prologue,
)
from tests.protocol.sessionkit import Directory, Network, make_node, trusted_pair


def _connect(net: Network, a: str, b: str) -> None:
    net.deliver(a, net.nodes[a].connect(b, net.now))


def test_handshake_establishes_one_session_on_both_sides() -> None:
    a, b, net = trusted_pair()
    _connect(net, "alice", "bob")
    (up_a,) = net.of("alice", SessionUp)
    (up_b,) = net.of("bob", SessionUp)
    assert up_a.peer_id == "bob"
    assert up_b.peer_id == "alice"
    assert up_a.initiator
    assert not up_b.initiator
    assert up_a.session_id == up_b.session_id
    # HELLO: header, reply_to, the X25519 ephemeral and the ML-KEM-768 encapsulation key.
    assert [len(f) for _, f in net.wire][:1] == [2 + 4 + 1 + len("alice") + 32 + 1184]
    assert up_a.protocol == up_b.protocol == NOISE_XX
    assert a.has_session("bob")
    assert b.has_session("alice")


def test_messages_flow_both_ways_in_order() -> None:
    a, b, net = trusted_pair()
    _connect(net, "alice", "bob")
    for i in range(5):
        net.deliver("alice", a.send("bob", f"a{i}".encode(), net.now))
        net.deliver("bob", b.send("alice", f"b{i}".encode(), net.now))
    assert [m.payload for m in net.of("bob", Message)] == [f"a{i}".encode() for i in range(5)]
    assert [m.payload for m in net.of("alice", Message)] == [f"b{i}".encode() for i in range(5)]


def test_send_without_session_is_local_error_and_size_is_bounded() -> None:
    a, _, net = trusted_pair()
    with pytest.raises(LocalProtocolError):
        a.send("bob", b"x", net.now)
    _connect(net, "alice", "bob")
    with pytest.raises(LocalProtocolError):
        a.send("bob", b"x" * (MAX_PAYLOAD + 1), net.now)
    net.deliver("alice", a.send("bob", b"x" * MAX_PAYLOAD, net.now))
    assert net.of("bob", Message)[0].payload == b"x" * MAX_PAYLOAD


def test_initiator_aborts_before_message_3_when_responder_is_unknown() -> None:
    directory = Directory()
    a = make_node("alice", directory)
    b = make_node("bob", directory)
    directory.trusts["alice"] = set()  # alice does not trust bob
    directory.trusts["bob"] = {"alice"}
    net = Network(a, b)
    _connect(net, "alice", "bob")
    kinds = [f[1] for _, f in net.wire]
    assert kinds == [frames.FrameType.HELLO, frames.FrameType.REPLY]  # no FINISH ever sent
    (failed,) = net.of("alice", HandshakeFailed)
    assert failed.reason == "unknown-peer"
    assert not a.has_session("bob")
    assert not b.has_session("alice")
    assert a.rejections["unknown-peer"] == 1


def test_initiator_aborts_when_another_node_answers() -> None:
    """alice means bob, but the broker routes her HELLO to carol (trusted too): abort."""
    directory = Directory()
    a, c = make_node("alice", directory), make_node("carol", directory)
    make_node("bob", directory)
    directory.trusts["alice"] = {"bob", "carol"}
    directory.trusts["carol"] = {"alice"}
    net = Network(a, c)
    hello = a.connect("bob", net.now)
    assert isinstance(hello[0], SendFrame)
    net.deliver("alice", [SendFrame("carol", hello[0].frame)])
    (failed,) = net.of("alice", HandshakeFailed)
    assert failed.reason == "wrong-peer"
    assert not a.has_session("carol")
    assert [f[1] for _, f in net.wire] == [frames.FrameType.HELLO, frames.FrameType.REPLY]


def test_responder_refuses_a_hello_whose_claim_the_credentials_contradict() -> None:
    """Misbinding: mallory sends a HELLO claiming to be alice; bob replies to alice's inbox,
    mallory (reading it, as a hostile broker could) finishes with her own credentials."""
    directory = Directory()
    b = make_node("bob", directory)
    make_node("alice", directory)
    m_static = KeyPair.generate()
    directory.keys["mallory"] = m_static.public
    directory.trusts["bob"] = {"alice", "mallory"}
    hs = HandshakeState(NOISE_XX, True, prologue("testnet", NOISE_XX), s=m_static)
    out = b.receive(frames.encode_hello(7, "alice", hs.write_message(), None), 0.0)
    (reply,) = out
    assert isinstance(reply, SendFrame)
    assert reply.peer_id == "alice"
    parsed = frames.decode(reply.frame)
    assert isinstance(parsed, frames.Reply)
    hs.read_message(parsed.noise)
    finish = frames.encode_finish(parsed.sender_index, hs.write_message(b"mallory"))
    (rejected,) = b.receive(finish, 0.0)
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "wrong-peer"
    assert not b.has_session("alice")
    assert not b.has_session("mallory")


def test_unknown_claims_are_refused_before_any_cryptography() -> None:
    _a, b, net = trusted_pair()
    forged = frames.encode_hello(1, "stranger", b"\x01" * 32, None)
    (rej,) = b.receive(forged, net.now)
    assert isinstance(rej, Rejected)
    assert rej.reason == "unknown-peer"
    assert b.half_open_count == 0


def test_wrong_network_or_network_psk_never_completes() -> None:
    directory = Directory()
    a = make_node("alice", directory, network="one")
    b = make_node("bob", directory, network="two")
    directory.trusts.update(alice={"bob"}, bob={"alice"})
    net = Network(a, b)
    _connect(net, "alice", "bob")
    assert not a.has_session("bob")
    assert a.rejections["decrypt"] == 1

    directory = Directory()
    a = make_node("alice", directory, network_psk=b"1" * 32)
    b = make_node("bob", directory, network_psk=b"2" * 32)
    directory.trusts.update(alice={"bob"}, bob={"alice"})
    net = Network(a, b)
    _connect(net, "alice", "bob")
    assert [f[1] for _, f in net.wire] == [frames.FrameType.HELLO]  # refused at once
    assert b.rejections["decrypt"] == 1
    assert not a.has_session("bob")
    assert not b.has_session("alice")


def test_network_psk_sessions_work() -> None:
    a, _b, net = trusted_pair(network_psk=b"k" * 32)
    _connect(net, "alice", "bob")
    net.deliver("alice", a.send("bob", b"hi", net.now))
    assert net.of("bob", Message)[0].payload == b"hi"
    assert {up.protocol for up in net.of("alice", SessionUp) + net.of("bob", SessionUp)} == {
        NOISE_XXPSK0
    }


CLASSIC = {
    NOISE_XX: "Noise_XX_25519_ChaChaPoly_BLAKE2b",
    NOISE_XXPSK0: "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2b",
    NOISE_XXPSK3: "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b",
}


@pytest.mark.parametrize("hybrid", sorted(CLASSIC))
def test_a_classic_hello_is_refused_by_name_before_any_cryptography(hybrid: str) -> None:
    """No downgrade: an X25519-only XX HELLO (as an older peerd, or someone stripping the KEM,
    would send; its prologue as ours but for the name) is refused with a reason of its own,
    counted, answered with nothing and leaving no half-open handshake."""
    network_psk = b"k" * 32 if hybrid == NOISE_XXPSK0 else None
    directory = Directory()
    b = make_node("bob", directory, network_psk=network_psk)
    make_node("alice", directory)
    directory.trusts["bob"] = {"alice"}
    directory.invites["bob"] = {b"i" * 16: b"p" * 32}
    classic = CLASSIC[hybrid]
    psk = {NOISE_XXPSK0: network_psk, NOISE_XXPSK3: b"p" * 32}.get(hybrid)
    hs = HandshakeState(
        classic, True, prologue("testnet", classic), s=KeyPair.generate(),
        psks=[psk] if psk else [],
    )  # fmt: skip
    invite = b"i" * 16 if hybrid == NOISE_XXPSK3 else None
    for payload in (b"", b"x" * 256):  # the largest message 1 a classic peer may send
        hello = frames.encode_hello(7, "alice", hs.write_message(payload), invite)
        (rejected,) = b.receive(hello, 0.0)
        assert isinstance(rejected, Rejected)
        assert rejected.reason == "classic-handshake"
        assert "ML-KEM-768" in rejected.detail
        assert b.half_open_count == 0
        hs = HandshakeState(
            classic, True, prologue("testnet", classic), s=KeyPair.generate(),
            psks=[psk] if psk else [],
        )  # fmt: skip
    assert b.rejections["classic-handshake"] == 2


def test_a_hello_stripped_of_its_kem_key_never_completes() -> None:
    """Cutting the ML-KEM key out of a genuine HELLO (and padding it back to size) makes the
    responder's answer undecryptable for the initiator: the KEM is bound into the transcript."""
    a, b, net = trusted_pair()
    (hello,) = a.connect("bob", net.now)
    assert isinstance(hello, SendFrame)
    cut = len(hello.frame) - 1184
    tampered = hello.frame[:cut] + bytes(1184)
    net.deliver("bob", b.receive(tampered, net.now))
    assert not a.has_session("bob")
    assert not b.has_session("alice")
    assert a.rejections["decrypt"] + b.rejections["bad-key"] == 1


def test_join_by_invite_pairs_unknown_nodes() -> None:
    directory = Directory()
    inviter = make_node("alice", directory)
    joiner = make_node("bob", directory)
    directory.invites["alice"] = {b"i" * 16: b"p" * 32}
    net = Network(inviter, joiner)
    net.deliver("bob", joiner.join("alice", b"i" * 16, b"p" * 32, net.now))
    (up_a,) = net.of("alice", SessionUp)
    (up_b,) = net.of("bob", SessionUp)
    assert up_a.invite_id == b"i" * 16
    assert up_b.invite_id == b"i" * 16
    assert up_a.peer_id == "bob"
    assert up_a.protocol == up_b.protocol == NOISE_XXPSK3


def test_join_with_a_wrong_psk_fails() -> None:
    directory = Directory()
    inviter = make_node("alice", directory)
    joiner = make_node("bob", directory)
    directory.invites["alice"] = {b"i" * 16: b"p" * 32}
    net = Network(inviter, joiner)
    net.deliver("bob", joiner.join("alice", b"i" * 16, b"q" * 32, net.now))
    assert not net.of("alice", SessionUp)
    assert not net.of("bob", SessionUp)
    assert inviter.rejections["decrypt"] == 1
    net.deliver("bob", joiner.join("alice", b"x" * 16, b"p" * 32, net.now))
    assert inviter.rejections["unknown-invite"] == 1


def test_combine_psk_depends_on_both_keys() -> None:
    base = combine_psk(None, b"p" * 32)
    assert base == b"p" * 32
    assert combine_psk(b"n" * 32, b"p" * 32) != combine_psk(b"m" * 32, b"p" * 32)


# -- transport attacks ---------------------------------------------------------------------


def _established() -> tuple[Network, list[bytes]]:
    """alice -> bob session and three DATA frames alice sent (not yet delivered)."""
    a, _, net = trusted_pair()
    _connect(net, "alice", "bob")
    data = []
    for i in range(3):
        (out,) = a.send("bob", f"m{i}".encode(), net.now)
        assert isinstance(out, SendFrame)
        data.append(out.frame)
    return net, data


def test_replayed_data_is_rejected() -> None:
    net, data = _established()
    bob = net.nodes["bob"]
    assert isinstance(bob.receive(data[0], net.now)[0], Message)
    (rej,) = bob.receive(data[0], net.now)
    assert isinstance(rej, Rejected)
    assert rej.reason == "replay"


def test_reordered_data_within_the_window_is_accepted_once() -> None:
    net, data = _established()
    bob = net.nodes["bob"]
    got = [bob.receive(f, net.now)[0] for f in (data[2], data[0], data[1], data[0])]
    assert [g.payload for g in got[:3] if isinstance(g, Message)] == [b"m2", b"m0", b"m1"]
    assert isinstance(got[3], Rejected)


@pytest.mark.parametrize("position", [0, 1, 3, 7, 13, 20, -1])
def test_tampered_data_is_rejected_and_does_not_move_the_window(position: int) -> None:
    net, data = _established()
    bob = net.nodes["bob"]
    bad = bytearray(data[0])
    bad[position] ^= 0x40
    (rej,) = bob.receive(bytes(bad), net.now)
    assert isinstance(rej, Rejected)
    assert isinstance(bob.receive(data[0], net.now)[0], Message)


def test_forged_counter_far_ahead_cannot_shift_the_window() -> None:
    net, data = _established()
    bob = net.nodes["bob"]
    parsed = frames.decode(data[0])
    assert isinstance(parsed, frames.Data)
    header = frames.data_header(parsed.receiver_index, 2**40)
    (rej,) = bob.receive(header + parsed.ciphertext, net.now)
    assert isinstance(rej, Rejected)
    assert rej.reason == "decrypt"
    assert [isinstance(bob.receive(f, net.now)[0], Message) for f in data] == [True] * 3


def test_replayed_handshake_frames_do_nothing() -> None:
    a, b, net = trusted_pair()
    _connect(net, "alice", "bob")
    hello, reply, finish = (f for _, f in net.wire[:3])
    before = b.rejections.copy()
    out = b.receive(hello, net.now)  # costs bob a reply, which alice then drops
    net.deliver("bob", out)
    assert a.rejections["unknown-session"] == 1
    (rej,) = b.receive(finish, net.now)
    assert isinstance(rej, Rejected)
    assert rej.reason == "unknown-session"
    (rej,) = a.receive(reply, net.now)
    assert isinstance(rej, Rejected)
    assert b.rejections["unknown-session"] == before["unknown-session"] + 1
    assert len(net.of("bob", SessionUp)) == 1


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x01", b"\x02\x05" + b"\0" * 40, b"\x01\x09" + b"\0" * 40, b"\x01\x05" + b"\0" * 10],
)
def test_garbage_frames_are_counted_never_raised(frame: bytes) -> None:
    _, b, net = trusted_pair()
    (rej,) = b.receive(frame, net.now)
    assert isinstance(rej, Rejected)
    assert sum(b.rejections.values()) == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_frames_only_produce_rejections(frame: bytes) -> None:
    _, b, _ = trusted_pair()
    for out in b.receive(frame, 0.0):
        assert isinstance(out, Rejected)


# -- closing, liveness, rekey -----------------------------------------------------------------


def test_close_notifies_the_peer() -> None:
    a, b, net = trusted_pair()
    _connect(net, "alice", "bob")
    net.deliver("alice", a.close("bob", "revoked", net.now))
    assert net.of("alice", SessionDown)[0].reason == "revoked"
    assert "revoked" in net.of("bob", SessionDown)[0].reason
    assert not b.has_session("alice")


def test_unanswered_traffic_pings_then_rehandshakes() -> None:
    a, b, net = trusted_pair()
    _connect(net, "alice", "bob")
    net.nodes = {"alice": a}  # bob goes away silently
    net.deliver("alice", a.send("bob", b"anyone?", net.now))
    sent = len(net.wire)
    net.tick(5.0)
    assert len(net.wire) == sent + 1  # a PING
    net.tick(5.0)
    assert frames.decode(net.wire[-1][1]).__class__ is frames.Hello
    net.nodes = {"alice": a, "bob": b}
    net.tick(1.0)  # retry of the HELLO reaches bob now
    assert len(net.of("alice", SessionUp)) == 2


def test_rekey_by_time_replaces_the_session_and_drops_old_keys_after_grace() -> None:
    limits = SessionLimits(rekey_after_time=100, reject_after_time=150, previous_grace=10)
    a, b, net = trusted_pair(limits=limits)
    _connect(net, "alice", "bob")
    (old_frame,) = a.send("bob", b"old", net.now)
    assert isinstance(old_frame, SendFrame)
    net.tick(100)
    ups = net.of("bob", SessionUp)
    assert len(ups) == 2
    assert ups[1].rekey
    assert ups[0].session_id != ups[1].session_id
    # A frame sent on the old session and delayed still arrives within the grace period ...
    assert isinstance(b.receive(old_frame.frame, net.now)[0], Message)
    # ... new traffic uses the new session, and after the grace the old keys are gone.
    net.deliver("alice", a.send("bob", b"new", net.now))
    net.tick(11)
    (rej,) = b.receive(old_frame.frame, net.now)
    assert isinstance(rej, Rejected)
    assert rej.reason == "unknown-session"
    assert b.has_session("alice")


def test_rekey_by_message_budget() -> None:
    a, _b, net = trusted_pair(limits=SessionLimits(rekey_after_messages=10))
    _connect(net, "alice", "bob")
    for i in range(12):
        net.deliver("alice", a.send("bob", b"%d" % i, net.now))
    assert len(net.of("bob", SessionUp)) == 2
    assert [m.payload for m in net.of("bob", Message)] == [b"%d" % i for i in range(12)]


def test_sessions_expire_without_rekey_when_peer_is_gone() -> None:
    limits = SessionLimits(rekey_after_time=100, reject_after_time=150, handshake_attempts=1)
    a, _b, net = trusted_pair(limits=limits)
    _connect(net, "alice", "bob")
    net.fault = lambda _dst, _frame: []  # bob is gone: nothing gets through any more
    for _ in range(20):
        net.tick(10)
    assert net.of("alice", SessionDown)[0].reason == "expired"
    assert not a.has_session("bob")
    with pytest.raises(LocalProtocolError):
        a.send("bob", b"late", net.now)


def test_simultaneous_connects_converge() -> None:
    a, b, net = trusted_pair()
    hello_a = a.connect("bob", net.now)
    hello_b = b.connect("alice", net.now)
    net.deliver("alice", hello_a)
    net.deliver("bob", hello_b)
    for i in range(3):
        net.deliver("alice", a.send("bob", b"a%d" % i, net.now))
        net.deliver("bob", b.send("alice", b"b%d" % i, net.now))
    net.tick(70)  # past the grace period of whichever sessions were superseded
    net.deliver("alice", a.send("bob", b"after", net.now))
    net.deliver("bob", b.send("alice", b"after", net.now))
    assert net.of("bob", Message)[-1].payload == b"after"
    assert net.of("alice", Message)[-1].payload == b"after"


def test_handshake_retries_then_gives_up() -> None:
    a, _, net = trusted_pair(limits=SessionLimits(handshake_timeout=1, handshake_attempts=3))
    net.nodes = {"alice": a}
    _connect(net, "alice", "bob")
    for _ in range(10):
        net.tick(1)
    hellos = [f for _, f in net.wire if f[1] == frames.FrameType.HELLO]
    assert len(hellos) == 3
    assert len({frames.decode(h).noise[:32] for h in hellos}) == 3  # fresh ephemeral each time
    assert net.of("alice", HandshakeFailed)[0].reason == "timeout"


class _Hold:
    """A fault that holds every frame while `on`; `release` delivers chosen ones later."""

    def __init__(self) -> None:
        self.on = True
        self.held: list[tuple[str, bytes]] = []

    def __call__(self, dst: str, frame: bytes) -> list[bytes]:
        if self.on:
            self.held.append((dst, frame))
            return []
        return [frame]

    def release(self, net: Network, index: int) -> None:
        dst, frame = self.held.pop(index)
        net.deliver(dst, net.nodes[dst].receive(frame, net.now))


def test_a_late_answer_to_an_attempt_that_timed_out_still_completes_the_handshake() -> None:
    """A slow path (a busy broker connection) answers attempt 1 after attempt 2 left: the
    answer completes the handshake; attempt 2 and its answer are then dropped."""
    hold = _Hold()
    a, _b, net = trusted_pair()
    net.fault = hold
    _connect(net, "alice", "bob")  # HELLO 1 held
    net.tick(1.0)  # attempt 1 times out: HELLO 2 held too
    assert [frames.decode(f).__class__ for _, f in hold.held] == [frames.Hello] * 2
    hold.release(net, 0)  # HELLO 1 reaches bob: his REPLY is held
    hold.release(net, 1)  # REPLY 1 reaches alice: FINISH 1 is held
    hold.release(net, 1)  # FINISH 1 reaches bob: session up there, his confirmation held
    hold.release(net, 1)  # the confirmation reaches alice
    assert len(net.of("alice", SessionUp)) == len(net.of("bob", SessionUp)) == 1
    assert net.of("alice", SessionUp)[0].session_id == net.of("bob", SessionUp)[0].session_id
    assert not net.of("alice", HandshakeFailed)
    hold.on = False
    while hold.held:  # HELLO 2 and what follows from it: attempt 2 is gone at alice
        hold.release(net, 0)
    net.tick(20)
    assert not net.of("alice", HandshakeFailed)
    net.deliver("alice", a.send("bob", b"after", net.now))
    assert net.of("bob", Message)[-1].payload == b"after"


def _held_join() -> tuple[Directory, SessionManager, SessionManager, _Hold, Network]:
    """Bob joins alice by invite, every frame held (`_Hold`) until released."""
    directory = Directory()
    inviter, joiner = make_node("alice", directory), make_node("bob", directory)
    directory.invites["alice"] = {b"i" * 16: b"p" * 32}
    hold = _Hold()
    net = Network(inviter, joiner, fault=hold)
    net.deliver("bob", joiner.join("alice", b"i" * 16, b"p" * 32, net.now))
    return directory, inviter, joiner, hold, net


def _use_up_invite(directory: Directory, inviter: SessionManager) -> None:
    """The invite closes as used, as the inviter's store does after the first pairing."""
    directory.invites["alice"] = {}
    inviter.trust.closed_invite = lambda _id: "used"  # type: ignore[method-assign]


def test_a_join_whose_first_attempt_used_the_invite_is_not_failed_by_the_refusal() -> None:
    """The inviter completes attempt 1 and closes the invite, then meets attempt 2's HELLO_PSK
    and refuses it as used: the joiner waits for attempt 1's confirmation instead of failing
    the join of a pairing that happened. With no confirmation, the refusal stands."""
    for confirmed in (True, False):
        directory, inviter, _joiner, hold, net = _held_join()
        net.tick(1.0)  # HELLO_PSK 1 and 2 held
        hold.release(net, 0)  # HELLO_PSK 1 reaches alice: REPLY held
        hold.release(net, 1)  # REPLY 1 reaches bob: FINISH held
        hold.release(net, 1)  # FINISH 1 reaches alice: paired there, confirmation held
        assert len(net.of("alice", SessionUp)) == 1
        _use_up_invite(directory, inviter)
        hold.release(net, 0)  # HELLO_PSK 2 reaches alice: REFUSED (used) held
        (refused,) = [f for _, f in hold.held if f[1] == frames.FrameType.REFUSED]
        hold.release(net, [f for _, f in hold.held].index(refused))
        assert not net.of("bob", HandshakeFailed)
        if confirmed:
            hold.release(net, 0)  # alice's confirmation of attempt 1
            assert len(net.of("bob", SessionUp)) == 1
        net.tick(5)
        net.tick(5)
        failed = net.of("bob", HandshakeFailed)
        assert [f.reason for f in failed] == ([] if confirmed else ["invite-used"])


def test_a_confirmation_slower_than_several_attempts_still_completes_the_join() -> None:
    """A joiner's broker connection busy for seconds (Mosquitto's WebSocket listener carrying a
    limit probe) holds the inviter's confirmation of attempt 1 while attempts 2 and 3 leave and
    are refused as used. Attempt 1 sent message 3 and stays answerable as long as the join
    goes on: the confirmation completes it, whether it comes before the refusals or after."""
    for confirmation_first in (True, False):
        directory, inviter, joiner, hold, net = _held_join()
        hold.release(net, 0)  # HELLO_PSK 1 reaches alice: REPLY held
        hold.release(net, 0)  # REPLY 1 reaches bob: FINISH held
        hold.release(net, 0)  # FINISH 1 reaches alice: paired there, confirmation held
        assert len(net.of("alice", SessionUp)) == 1
        _use_up_invite(directory, inviter)
        net.tick(1.0)  # attempt 1 times out: HELLO_PSK 2 held
        net.tick(2.0)  # attempt 2 times out: HELLO_PSK 3 held
        (confirmation,) = [f for dst, f in hold.held if dst == "bob"]
        hellos = [f for dst, f in hold.held if dst == "alice"]
        assert len(hellos) == 2
        hold.held.clear()
        hold.on = False  # from here on frames go straight through
        if confirmation_first:
            net.deliver("bob", joiner.receive(confirmation, net.now))
        for hello in hellos:  # alice refuses each as used: the REFUSED frames go to bob
            net.deliver("alice", inviter.receive(hello, net.now))
        if not confirmation_first:
            net.deliver("bob", joiner.receive(confirmation, net.now))
        for _ in range(4):
            net.tick(8.0)
        assert len(net.of("bob", SessionUp)) == 1
        assert not net.of("bob", HandshakeFailed)
        assert joiner.has_session("alice")


# -- floods -----------------------------------------------------------------------------------


def test_a_flood_of_bogus_hellos_cannot_starve_a_legitimate_peer() -> None:
    limits = SessionLimits(max_half_open=64, max_half_open_per_peer=4)
    directory = Directory()
    a, b = make_node("alice", directory, limits=limits), make_node("bob", directory, limits=limits)
    directory.trusts.update(alice={"bob"}, bob={"alice"} | {f"p{i}" for i in range(500)})
    net = Network(a, b)
    rng = random.Random(1)
    kem_key = MLKEM768.generate().public  # a hybrid HELLO's size, or it is refused as classic
    for round_ in range(20):
        for _ in range(100):  # bogus HELLOs claiming known peers, never finished
            claim = f"p{rng.randrange(500)}"
            e = KeyPair.generate().public + kem_key
            b.receive(frames.encode_hello(rng.randrange(1, 2**32), claim, e, None), net.now)
        assert b.half_open_count <= 64
        net.deliver("alice", a.connect("bob", net.now))
        assert len(net.of("alice", SessionUp)) == round_ + 1
        net.now += 0.01
    assert b.rejections["evicted"] > 0


def test_hello_rate_limits_per_claimed_peer() -> None:
    limits = SessionLimits(hello_rate_per_peer=1.0, hello_burst_per_peer=3.0)
    _, b, net = trusted_pair(limits=limits)
    kem_key = MLKEM768.generate().public
    outs = [
        b.receive(
            frames.encode_hello(i + 1, "alice", KeyPair.generate().public + kem_key, None), net.now
        )
        for i in range(10)
    ]
    replies = [o for o in outs if isinstance(o[0], SendFrame)]
    assert len(replies) == 3
    assert b.rejections["rate-limited"] == 7


# -- the replay window against a model ----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=200), st.sampled_from([8, 64, 128]))
def test_replay_window_matches_a_model(counters: list[int], size: int) -> None:
    window = ReplayWindow(size)
    seen: set[int] = set()
    top = -1
    for c in counters:
        model_ok = c not in seen and (c > top or top - c < size)
        try:
            window.check(c)
            ok = True
        except RemoteProtocolError:
            ok = False
        assert ok == model_ok
        if ok:
            window.update(c)
            seen.add(c)
            top = max(top, c)


# -- random loss, duplication, reordering ---------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.floats(0, 0.3), st.floats(0, 0.3))
def test_lossy_network_never_delivers_wrong_or_duplicate_messages(
    rng: random.Random, drop: float, dup: float
) -> None:
    held: list[bytes] = []

    def fault(_dst: str, frame: bytes) -> list[bytes]:
        out = []
        if rng.random() >= drop:
            out.append(frame)
        if rng.random() < dup:
            held.append(frame)
        if held and rng.random() < 0.3:
            out.append(held.pop(rng.randrange(len(held))))
        return out

    a, _b, net = trusted_pair()
    net.fault = fault
    sent = []
    for i in range(30):
        if not a.has_session("bob"):
            net.deliver("alice", a.connect("bob", net.now))
            net.tick(0.5)
            continue
        payload = b"msg%d" % i
        sent.append(payload)
        net.deliver("alice", a.send("bob", payload, net.now))
    got = [m.payload for m in net.of("bob", Message)]
    assert len(got) == len(set(got))
    assert set(got) <= set(sent)


def test_initiator_gets_no_session_when_the_responder_refuses_message_3() -> None:
    """bob trusts alice but alice is blocked at bob: alice must not believe in a session."""
    directory = Directory()
    a = make_node("alice", directory, limits=SessionLimits(handshake_attempts=2))
    b = make_node("bob", directory)
    directory.trusts.update(alice={"bob"}, bob={"alice"})
    net = Network(a, b)
    directory.trusts["bob"] = set()  # bob revokes alice after accepting HELLOs from her ...
    b.trust.refuse_hello = lambda _peer: None  # type: ignore[method-assign]
    _connect(net, "alice", "bob")
    assert b.rejections["unknown-peer"] == 1
    assert not net.of("alice", SessionUp)
    with pytest.raises(LocalProtocolError):
        a.send("bob", b"x", net.now)
    net.tick(1)
    net.tick(2)
    assert net.of("alice", HandshakeFailed)[0].reason == "timeout"
    assert not a.has_session("bob")


def test_refused_frames_round_trip_and_strange_ones_are_malformed() -> None:
    frame = frames.encode_refused(0xDEADBEEF, "used")
    assert frames.decode(frame) == frames.Refused(0xDEADBEEF, "used")
    assert frames.decode(frames.encode_refused(7, "expired")) == frames.Refused(7, "expired")
    for bad in (frame + b"\0", frame[:-1], frame[:-1] + b"\x09"):
        with pytest.raises(RemoteProtocolError) as exc:
            frames.decode(bad)
        assert exc.value.reason == "malformed"


def test_a_refused_frame_for_no_join_of_ours_changes_nothing() -> None:
    net, _ = _established()
    bob = net.nodes["bob"]
    (rej,) = bob.receive(frames.encode_refused(12345, "used"), net.now)
    assert isinstance(rej, Rejected)
    assert rej.reason == "unknown-session"
