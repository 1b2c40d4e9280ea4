"""Adversarial transfers: tampering, splicing, truncation, forged flags, a rogue receiver that
knows the content key, forged or mismatched manifests. Every one is rejected with a reason and
no receiver ever commits a file that is not byte for byte the sender's."""

from __future__ import annotations

import random
from collections import Counter

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.transfer import (
    Abort,
    Accept,
    Ack,
    ChunkCipher,
    Commit,
    Manifest,
    Offer,
    ReadChunk,
    ReceiverFailed,
    ReceiverTransfer,
    Request,
    Seal,
    SenderTransfer,
    Sync,
    TransferFailed,
    Verified,
    WriteChunk,
    file_hash,
    frame_buffer,
    parse_chunk_header,
)
from tests.protocol.test_transfer_sim import (
    CHUNK,
    SENDER,
    Link,
    Sim,
    assert_outcome,
    payload,
    small_config,
)

# -- tampering in transit ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([1, CHUNK, CHUNK + 1, 9 * CHUNK + 3]),
    rate=st.sampled_from([0.1, 0.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_bit_flips_in_chunk_frames_are_rejected_and_repaired(
    size: int, rate: float, seed: int
) -> None:
    sim = Sim(payload(size, seed), ["bob", "carol"], seed=seed)
    rng = random.Random(seed)

    def flip(peer: str, frame: bytes) -> bytes:
        if rng.random() >= rate:
            return frame
        bad = bytearray(frame)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        return bytes(bad)

    sim.frame_filter = flip
    sim.run(until=3600.0)
    assert_outcome(sim, all_succeed=True)
    reasons = Counter(r for s in sim.shells.values() for r in s.rejected)
    assert set(reasons) <= {
        "decrypt",
        "bad-flags",
        "version",
        "frame-type",
        "bad-index",
        "wrong-transfer",
        "bad-length",
    }


def test_frames_spliced_from_another_transfer_are_rejected() -> None:
    data = payload(12 * CHUNK)
    # The same file, sent earlier to bob: another transfer id and content key. An attacker
    # replays its recorded frames into the new transfer, as they are and relabelled.
    old_frames = _record_frames(data, seed=99)
    sim = Sim(data, ["bob"], seed=1)
    injected = 0
    reasons: list[str] = []

    def splice(peer: str, frame: bytes) -> bytes:
        nonlocal injected
        if injected < len(old_frames):
            old = old_frames[injected]
            injected += 1
            rt = sim.shells[peer].rt
            assert rt is not None
            with pytest.raises(RemoteProtocolError) as err:
                rt.on_frame(old, bytearray(CHUNK), sim.now)
            reasons.append(err.value.reason)
            relabelled = bytearray(old)
            relabelled[8:24] = sim.offers_seen[peer].transfer_id
            try:
                result = rt.on_frame(bytes(relabelled), bytearray(CHUNK), sim.now)
            except RemoteProtocolError as exc:
                reasons.append(exc.reason)
            else:
                assert result is None  # a duplicate or beyond the window: dropped unread
        return frame

    sim.frame_filter = splice
    sim.run()
    assert injected == len(old_frames)
    assert_outcome(sim, all_succeed=True)
    assert set(reasons) == {"wrong-transfer", "decrypt"}


def _record_frames(data: bytes, seed: int) -> list[bytes]:
    sim = Sim(data, ["bob"], seed=seed)
    frames: list[bytes] = []

    def record(peer: str, frame: bytes) -> bytes:
        frames.append(frame)
        return frame

    sim.frame_filter = record
    sim.run()
    return frames


def test_truncated_transfer_is_never_committed() -> None:
    # An adversary on the broker withholds the last chunk forever.
    sim = Sim(payload(10 * CHUNK + 7), ["bob", "carol"], seed=4)

    def withhold_last(peer: str, frame: bytes) -> bytes | None:
        return None if parse_chunk_header(frame).last else frame

    sim.frame_filter = withhold_last
    sim.run(until=300.0)
    for shell in sim.shells.values():
        assert shell.final is None
        assert shell.rt is not None
        assert shell.rt.state == "receiving"
        assert shell.rt.durable_chunks == 10  # everything but the last
    assert sim.sender is not None
    assert not sim.sender.finished


def test_forged_last_flag_is_rejected() -> None:
    sim = Sim(payload(6 * CHUNK), ["bob"], seed=4)
    seen: list[str] = []

    def toggle_last(peer: str, frame: bytes) -> bytes:
        forged = bytearray(frame)
        forged[2] ^= 0x01  # set it on a middle chunk, clear it on the final one
        rt = sim.shells[peer].rt
        assert rt is not None
        try:
            result = rt.on_frame(bytes(forged), bytearray(CHUNK), sim.now)
        except RemoteProtocolError as exc:
            seen.append(exc.reason)
        else:
            assert result is None  # dropped as a duplicate or beyond the window
        return frame

    sim.frame_filter = toggle_last
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert "bad-flags" in seen


def test_a_key_holder_cannot_forge_a_last_flag_the_manifest_contradicts() -> None:
    data = payload(5 * CHUNK)
    rt, _ = _receiver_for(data)
    cipher = ChunkCipher(rt.offer.content_key, rt.transfer_id)
    out = frame_buffer(CHUNK)
    n = cipher.seal_into(out, 2, True, data[2 * CHUNK : 3 * CHUNK], bytes(8))
    with pytest.raises(RemoteProtocolError) as err:
        rt.on_frame(bytes(out[:n]), bytearray(CHUNK), 0.0)
    assert err.value.reason == "bad-flags"
    n = cipher.seal_into(out, 4, False, data[4 * CHUNK :], bytes(8))
    with pytest.raises(RemoteProtocolError) as err:
        rt.on_frame(bytes(out[:n]), bytearray(CHUNK), 0.0)
    assert err.value.reason == "bad-flags"
    n = cipher.seal_into(out, 3, False, data[3 * CHUNK : 3 * CHUNK + 100], bytes(8))
    with pytest.raises(RemoteProtocolError) as err:
        rt.on_frame(bytes(out[:n]), bytearray(CHUNK), 0.0)
    assert err.value.reason == "bad-length"
    n = cipher.seal_into(out, 7, True, b"", bytes(8))
    with pytest.raises(RemoteProtocolError) as err:
        rt.on_frame(bytes(out[:n]), bytearray(CHUNK), 0.0)
    assert err.value.reason == "bad-index"


@pytest.mark.parametrize("forged_index", [0, 3, 9, 10])
def test_rogue_receiver_with_the_content_key_is_caught_by_the_signed_hash(
    forged_index: int,
) -> None:
    """mallory is a legitimate receiver, so she has the content key: she publishes a forged
    chunk on the transfer topic before the sender's. It authenticates under the shared key,
    so bob and carol write it; only the sender-signed BLAKE3 hash stops the commit."""
    data = payload(10 * CHUNK + 1)
    sim = Sim(data, ["bob", "carol", "mallory"], seed=6)
    forged: set[str] = set()

    def inject(peer: str, frame: bytes) -> bytes:
        # mallory wins the race: her chunk reaches each victim before the sender's.
        if peer == "mallory" or peer in forged or parse_chunk_header(frame).index != forged_index:
            return frame
        offer = sim.offers_seen["mallory"]
        cipher = ChunkCipher(offer.content_key, offer.transfer_id)
        out = frame_buffer(CHUNK)
        length = len(data[forged_index * CHUNK : (forged_index + 1) * CHUNK])
        n = cipher.seal_into(out, forged_index, forged_index == 10, b"\xee" * length, bytes(8))
        forged.add(peer)
        return bytes(out[:n])

    sim.frame_filter = inject
    sim.run()
    assert forged == {"bob", "carol"}
    for victim in ("bob", "carol"):
        assert not sim.shells[victim].rejected  # the forgery authenticated
        shell = sim.shells[victim]
        assert shell.final is None, "a forged file was committed"
        assert shell.failure is not None
        assert shell.failure.reason == "hash-mismatch"
        assert not shell.failure.remote
    assert sim.shells["mallory"].final == data  # she received the genuine frames in order
    failed = {f.peer: f for f in sim.sender_events(ReceiverFailed)}
    assert failed["bob"].reason == "hash-mismatch"
    assert failed["bob"].remote


# -- forged or mismatched manifests ----------------------------------------------------------


def test_seal_signed_by_another_key_is_rejected() -> None:
    impostor = nacl.signing.SigningKey(bytes(32))
    sim = Sim(payload(4 * CHUNK), ["bob"], seed=2, keys={"bob": bytes(impostor.verify_key)})
    sim.run()
    shell = sim.shells["bob"]
    assert shell.final is None
    assert shell.failure is not None
    assert shell.failure.reason == "bad-signature"
    [failed] = sim.sender_events(ReceiverFailed)
    assert failed.reason == "bad-signature"


def _receiver_for(data: bytes, **kw: object) -> tuple[ReceiverTransfer, nacl.signing.SigningKey]:
    sk = nacl.signing.SigningKey(bytes(range(32)))
    offer = Offer(
        bytes(16),
        "model.bin",
        len(data),
        CHUNK,
        max(1, -(-len(data) // CHUNK)),
        1000,
        bytes(range(32)),
    )
    rt = ReceiverTransfer(
        offer,
        sender=SENDER,
        sender_key=bytes(sk.verify_key),
        now=0.0,
        config=small_config(**kw),
    )
    rt.take_actions()
    return rt, sk


def _feed_all(rt: ReceiverTransfer, data: bytes) -> None:
    cipher = ChunkCipher(rt.offer.content_key, rt.transfer_id)
    out = frame_buffer(CHUNK)
    count = rt.offer.chunk_count
    for i in range(count):
        chunk = data[i * CHUNK : (i + 1) * CHUNK]
        n = cipher.seal_into(out, i, i == count - 1, chunk, bytes(8))
        write = rt.on_frame(bytes(out[:n]), bytearray(CHUNK), 0.0)
        assert write is not None
        assert bytes(write.data) == chunk
        for action in rt.take_actions():
            if isinstance(action, Sync):
                rt.on_synced(action, 0.0)


@pytest.mark.parametrize(
    "change",
    [
        {"name": "other.bin"},
        {"size": 4 * CHUNK - 1},
        {"created": 1001},
        {"sender": "eve"},
        {"transfer_id": b"\x01" * 16},
    ],
)
def test_seal_that_does_not_match_the_offer_is_rejected(change: dict[str, object]) -> None:
    data = payload(4 * CHUNK)
    rt, sk = _receiver_for(data)
    _feed_all(rt, data)
    fields: dict[str, object] = {
        "transfer_id": bytes(16),
        "sender": SENDER,
        "name": "model.bin",
        "size": len(data),
        "chunk_size": CHUNK,
        "chunk_count": 4,
        "created": 1000,
        "file_hash": file_hash(data),
    }
    fields.update(change)
    fields["chunk_count"] = max(1, -(-int(fields["size"]) // CHUNK))  # type: ignore[call-overload]
    signed = Manifest(**fields).sign(sk)  # type: ignore[arg-type]
    rt.receive(Seal(rt.transfer_id, signed.body, signed.signature), 0.0)
    actions = rt.take_actions()
    assert not any(isinstance(a, Commit) for a in actions)
    assert rt.state == "failed"
    assert rt.failure is not None
    assert rt.failure.reason == "manifest-mismatch"
    sent = [a.message for a in actions if isinstance(getattr(a, "message", None), Abort)]
    assert [m.reason for m in sent] == ["manifest-mismatch"]  # the sender is told why


def test_no_commit_before_the_seal_even_with_every_chunk_durable() -> None:
    data = payload(3 * CHUNK + 5)
    rt, sk = _receiver_for(data)
    _feed_all(rt, data)
    assert rt.durable_chunks == 4
    assert rt.state == "receiving"
    manifest = Manifest(bytes(16), SENDER, "model.bin", len(data), CHUNK, 4, 1000, file_hash(data))
    signed = manifest.sign(sk)
    rt.receive(Seal(rt.transfer_id, signed.body, signed.signature), 0.0)
    [commit] = [a for a in rt.take_actions() if isinstance(a, Commit)]
    assert commit.manifest.manifest == manifest
    # A cancel that arrives while the shell renames the verified file does not undo it.
    rt.receive(Abort(rt.transfer_id, "cancelled"), 0.0)
    assert rt.state == "committing"
    rt.committed(0.0)
    assert rt.state == "done"
    [verified] = [a.message for a in rt.take_actions()]
    assert verified == Verified(rt.transfer_id, file_hash(data))
    # Asked again (a lost Verified), it answers again.
    rt.receive(Seal(rt.transfer_id, signed.body, signed.signature), 0.0)
    assert [a.message for a in rt.take_actions()] == [verified]


def test_content_rejected_at_commit_is_reported_to_the_sender() -> None:
    data = payload(2 * CHUNK)
    rt, sk = _receiver_for(data)
    _feed_all(rt, data)
    signed = Manifest(
        bytes(16), SENDER, "model.bin", len(data), CHUNK, 2, 1000, file_hash(data)
    ).sign(sk)
    rt.receive(Seal(rt.transfer_id, signed.body, signed.signature), 0.0)
    assert any(isinstance(a, Commit) for a in rt.take_actions())
    why = "safetensors: the header is not valid JSON"
    rt.abort("bad-content", why)
    assert rt.state == "failed"
    actions = rt.take_actions()
    [abort] = [a.message for a in actions if isinstance(getattr(a, "message", None), Abort)]
    assert (abort.reason, abort.detail) == (
        "bad-content",
        "safetensors: the header is not valid JSON",
    )
    with pytest.raises(LocalProtocolError):
        rt.committed(0.0)


def test_wrong_hash_in_a_valid_seal_fails() -> None:
    data = payload(3 * CHUNK)
    rt, sk = _receiver_for(data)
    _feed_all(rt, data)
    manifest = Manifest(bytes(16), SENDER, "model.bin", len(data), CHUNK, 3, 1000, bytes(32))
    signed = manifest.sign(sk)
    rt.receive(Seal(rt.transfer_id, signed.body, signed.signature), 0.0)
    assert not any(isinstance(a, Commit) for a in rt.take_actions())
    assert rt.failure is not None
    assert rt.failure.reason == "hash-mismatch"


# -- the receiver's own rules --------------------------------------------------------------


def test_receiver_drops_duplicates_and_frames_beyond_its_window() -> None:
    data = payload(40 * CHUNK)
    rt, _ = _receiver_for(data, window=4, sync_batch=4, max_window_bytes=4 * CHUNK)
    cipher = ChunkCipher(rt.offer.content_key, rt.transfer_id)
    out = frame_buffer(CHUNK)

    def frame(i: int) -> bytes:
        n = cipher.seal_into(out, i, False, data[i * CHUNK : (i + 1) * CHUNK], bytes(8))
        return bytes(out[:n])

    assert rt.limit == 4
    assert isinstance(rt.on_frame(frame(0), bytearray(CHUNK), 0.0), WriteChunk)
    assert rt.on_frame(frame(0), bytearray(CHUNK), 0.0) is None
    assert rt.dropped_duplicates == 1
    # A duplicate is recognised by its header: even a garbled body is not decrypted.
    garbled = bytearray(frame(0))
    garbled[40] ^= 1
    assert rt.on_frame(bytes(garbled), bytearray(CHUNK), 0.0) is None
    assert rt.on_frame(frame(6), bytearray(CHUNK), 0.0) is None  # beyond 1 + 4
    assert rt.dropped_beyond_window == 1
    # Credit follows what arrives, not what is durable ...
    for i in (1, 2, 3, 4, 5, 6, 7):
        assert isinstance(rt.on_frame(frame(i), bytearray(CHUNK), 0.0), WriteChunk)
    assert rt.in_window() == 8
    # ... but never more than two windows beyond the durable prefix: nothing is durable yet.
    assert rt.limit == 8
    assert rt.on_frame(frame(8), bytearray(CHUNK), 0.0) is None
    actions = rt.take_actions()
    acks = [a.message for a in actions if isinstance(getattr(a, "message", None), Ack)]
    assert acks
    assert all(a.cum == 0 for a in acks)  # granted on receipt, before any fsync
    assert max(a.limit for a in acks) == 8
    after: list[object] = []
    syncs = [a for a in actions if isinstance(a, Sync)]
    while syncs:
        rt.on_synced(syncs[0], 0.0)
        after += rt.take_actions()
        syncs = [a for a in after if isinstance(a, Sync) and a.token > syncs[0].token]
    assert rt.limit == 12
    ack = [a.message for a in after if isinstance(getattr(a, "message", None), Ack)][-1]
    assert (ack.cum, ack.limit) == (8, 12)
    assert isinstance(rt.on_frame(frame(8), bytearray(CHUNK), 1.0), WriteChunk)


def test_out_of_order_chunks_are_hashed_by_reading_them_back() -> None:
    data = payload(6 * CHUNK)
    rt, sk = _receiver_for(data, window=8, sync_batch=8)
    cipher = ChunkCipher(rt.offer.content_key, rt.transfer_id)
    out = frame_buffer(CHUNK)
    disk = bytearray(len(data))
    reads = []
    for i in (3, 1, 2, 5, 4, 0):
        n = cipher.seal_into(out, i, i == 5, data[i * CHUNK : (i + 1) * CHUNK], bytes(8))
        write = rt.on_frame(bytes(out[:n]), bytearray(CHUNK), 0.0)
        assert write is not None
        disk[write.offset : write.offset + len(write.data)] = write.data
        for action in rt.take_actions():
            if isinstance(action, ReadChunk):
                reads.append(action.index)
                rt.on_read(action, bytes(disk[action.offset : action.offset + action.length]), 0.0)
                for again in rt.take_actions():
                    while isinstance(again, ReadChunk):
                        reads.append(again.index)
                        rt.on_read(
                            again, bytes(disk[again.offset : again.offset + again.length]), 0.0
                        )
                        more = [a for a in rt.take_actions() if isinstance(a, ReadChunk)]
                        again = more[0] if more else None  # type: ignore[assignment]
            elif isinstance(action, Sync):
                rt.on_synced(action, 0.0)
    assert reads == [1, 2, 3, 4, 5]  # chunk 0 arrived last and was hashed from the frame
    signed = Manifest(
        bytes(16), SENDER, "model.bin", len(data), CHUNK, 6, 1000, file_hash(data)
    ).sign(sk)
    rt.receive(Seal(rt.transfer_id, signed.body, signed.signature), 0.0)
    assert any(isinstance(a, Commit) for a in rt.take_actions())


def test_receiver_rejects_messages_it_must_not_get() -> None:
    rt, _ = _receiver_for(payload(CHUNK))
    with pytest.raises(RemoteProtocolError) as err:
        rt.receive(Ack(rt.transfer_id, 1, 0, 1), 0.0)
    assert err.value.reason == "unexpected-message"
    other = Offer(bytes(16), "other.bin", CHUNK, CHUNK, 1, 1000, bytes(range(32)))
    with pytest.raises(RemoteProtocolError) as err:
        rt.receive(other, 0.0)
    assert err.value.reason == "offer-mismatch"
    with pytest.raises(LocalProtocolError):
        rt.receive(Abort(b"\x09" * 16, "cancelled"), 0.0)


def test_sender_rejects_what_receivers_must_not_send() -> None:
    s = SenderTransfer(
        name="m.bin",
        size=10,
        receivers=["bob"],
        sender=SENDER,
        signing_key=nacl.signing.SigningKey(bytes(32)),
        now=0.0,
    )
    tid = s.transfer_id
    with pytest.raises(RemoteProtocolError) as err:
        s.receive("eve", Ack(tid, 1, 0, 1), 0.0)
    assert err.value.reason == "not-a-receiver"
    with pytest.raises(RemoteProtocolError) as err:
        s.receive("bob", s.offer, 0.0)
    assert err.value.reason == "unexpected-message"
    with pytest.raises(RemoteProtocolError) as err:
        s.receive("bob", Ack(tid, 1, 5, 6), 0.0)
    assert err.value.reason == "bad-ack"
    s.receive("bob", Ack(tid, 1, 0, 1), 0.0)
    with pytest.raises(RemoteProtocolError) as err:
        s.receive("bob", Request(tid, 1, ((3, 1),)), 0.0)
    assert err.value.reason == "bad-request"


def _sender(size: int, receivers: tuple[str, ...] = ("bob",)) -> SenderTransfer:
    return SenderTransfer(
        name="x",
        size=size,
        receivers=list(receivers),
        sender=SENDER,
        signing_key=nacl.signing.SigningKey(bytes(32)),
        now=0.0,
        config=small_config(),
    )


def _send_what_it_may(s: SenderTransfer, now: float) -> list[int]:
    """Read (and hand back) every chunk the sender will publish at `now`; their indexes."""
    sent: list[int] = []
    while (read := s.next_read(now)) is not None:
        sent.append(read.index)
        s.on_chunk_read(read, bytes(CHUNK))
    return sent


def test_sender_misuse_is_local() -> None:
    key = nacl.signing.SigningKey(bytes(32))
    with pytest.raises(LocalProtocolError) as err:
        SenderTransfer(
            name="../x", size=1, receivers=["bob"], sender=SENDER, signing_key=key, now=0.0
        )
    assert err.value.hint
    for receivers in ([], [SENDER], ["Bob"], [f"r{i}" for i in range(65)]):
        with pytest.raises(LocalProtocolError):
            SenderTransfer(
                name="x", size=1, receivers=receivers, sender=SENDER, signing_key=key, now=0.0
            )
    with pytest.raises(LocalProtocolError):
        SenderTransfer(
            name="x", size=-1, receivers=["bob"], sender=SENDER, signing_key=key, now=0.0
        )
    s = _sender(3 * CHUNK)
    s.receive("bob", Ack(s.transfer_id, 1, 0, 8), 0.0)
    first = s.next_read(0.0)
    second = s.next_read(0.0)
    assert first is not None
    assert second is not None
    with pytest.raises(LocalProtocolError):
        s.on_chunk_read(second, bytes(CHUNK))
    assert s.on_chunk_read(first, bytes(CHUNK)) is not None


def test_sender_never_sends_beyond_the_credit() -> None:
    s = _sender(50 * CHUNK, receivers=("bob", "carol"))
    assert s.next_read(0.0) is None  # nobody has granted credit
    s.receive("bob", Ack(s.transfer_id, 1, 0, 5), 0.0)
    s.receive("carol", Ack(s.transfer_id, 1, 0, 3), 0.0)
    sent = _send_what_it_may(s, 0.0)
    assert sent == [0, 1, 2]  # carol paces the pair: nothing is published twice
    # Once carol has stalled for lag_timeout, bob goes on alone (up to his credit) ...
    later = s.config.lag_timeout + 0.1
    s.on_timer(later)
    sent += _send_what_it_may(s, later)
    assert sent == [0, 1, 2, 3, 4]
    # ... and carol, once she grants credit again, is served her own copies.
    s.receive("carol", Ack(s.transfer_id, 1, 3, 6), later)
    sent += _send_what_it_may(s, later)
    # Now both are at 5 and bob has no credit: 5 waits for him, to go out once for both.
    assert sent == [0, 1, 2, 3, 4, 3, 4]
    s.receive("bob", Ack(s.transfer_id, 1, 5, 10), later)
    sent += _send_what_it_may(s, later)
    assert sent == [0, 1, 2, 3, 4, 3, 4, 5]


def test_reads_outstanding_at_cancel_are_simply_dropped() -> None:
    s = _sender(10 * CHUNK)
    s.receive("bob", Ack(s.transfer_id, 1, 0, 8), 0.0)
    reads = [s.next_read(0.0), s.next_read(0.0)]
    s.cancel()
    assert s.finished
    for read in reads:
        assert read is not None
        assert s.on_chunk_read(read, bytes(CHUNK)) is None
    assert s.next_read(0.0) is None
    actions = s.take_actions()
    aborts = [a.message for a in actions if isinstance(getattr(a, "message", None), Abort)]
    assert [m.reason for m in aborts] == ["cancelled"]
    assert type(actions[-1]).__name__ == "Finished"


def test_sender_follows_the_newest_receiver_incarnation_only() -> None:
    s = _sender(20 * CHUNK)
    tid = s.transfer_id
    s.receive("bob", Accept(tid, 1, 0, 8), 0.0)
    sent = _send_what_it_may(s, 0.0)
    assert sent == list(range(8))
    # bob restarted (incarnation 3) with 0..4 durable: the sender resumes him from 5 ...
    s.receive("bob", Accept(tid, 3, 5, 13), 0.0)
    # ... and a delayed Ack of incarnation 2, or 1, changes nothing.
    s.receive("bob", Ack(tid, 2, 1, 9), 0.0)
    s.receive("bob", Ack(tid, 1, 8, 16), 0.0)
    sent += _send_what_it_may(s, 0.0)
    assert sent == list(range(8)) + list(range(5, 13))
    assert s.acked_chunks("bob") == 5
    # A Request of an older incarnation is ignored too; the current one's is served.
    s.receive("bob", Request(tid, 2, ((5, 1),)), 0.0)
    assert s.next_read(0.0) is None
    s.receive("bob", Request(tid, 3, ((6, 1),)), 0.0)
    read = s.next_read(0.0)
    assert read is not None
    assert read.index == 6


def test_a_sender_that_goes_quiet_is_given_up_after_the_idle_deadline() -> None:
    """A trusted sender offers a file and then says nothing: the receiver held a slot and the
    reserved space forever (issue 18). After `idle_timeout` with no valid frame and no message
    from the sender, it fails with reason timeout (and tells the sender). Anything heard from
    the sender moves the deadline."""
    data = payload(4 * CHUNK)
    rt, _ = _receiver_for(data, idle_timeout=100.0)
    deadline = rt.next_deadline()
    assert deadline is not None
    rt.on_timer(60.0)
    assert rt.state == "receiving"
    rt.receive(rt.offer, 60.0)  # a probe: the sender is alive
    rt.take_actions()
    t = 60.0
    while rt.state == "receiving":
        d = rt.next_deadline()
        assert d is not None
        assert d <= 160.0
        t = d
        rt.on_timer(t)
    assert t == 160.0
    actions = rt.take_actions()
    failed = [a for a in actions if isinstance(a, TransferFailed)]
    assert [(f.reason, f.remote) for f in failed] == [("timeout", False)]
    aborts = [a.message for a in actions if isinstance(getattr(a, "message", None), Abort)]
    assert [m.reason for m in aborts] == ["timeout"]
    assert rt.next_deadline() is None


# -- a receiver's claims cannot drive unbounded work (issue 18, item 3) -----------------------


def _dropped(s: SenderTransfer) -> list[tuple[str, str]]:
    return [(a.reason, a.peer) for a in s.take_actions() if isinstance(a, ReceiverFailed)]


def test_a_restart_claiming_less_than_was_acknowledged_drops_the_receiver() -> None:
    """A 27-byte Accept with a higher incarnation and cum=0 made the sender reset and re-send
    the whole window, again and again: ten cost 2.5 GiB of upload and the transfer never ended.
    `cum` covers only chunks made durable and recorded before they were acknowledged, so it never
    goes down: a restart that claims less drops the receiver, and nothing is re-sent."""
    s = _sender(40 * CHUNK, receivers=("bob", "carol"))
    tid = s.transfer_id
    for peer in ("bob", "carol"):
        s.receive(peer, Accept(tid, 1, 0, 8), 0.0)
    assert _send_what_it_may(s, 0.0) == list(range(8))
    for peer in ("bob", "carol"):
        s.receive(peer, Ack(tid, 1, 8, 16), 0.0)
    s.take_actions()
    published = s.published_frames
    for incarnation in range(2, 12):
        s.receive("bob", Accept(tid, incarnation, 0, 8), 0.0)
    assert _dropped(s) == [("protocol-error", "bob")]
    assert s.receiver_state("bob") == "failed"
    # carol goes on; nothing below her cum is ever sent again.
    sent = _send_what_it_may(s, 0.0)
    assert sent == list(range(8, 16))
    assert s.published_frames == published + 8
    assert s.resent_frames == 0


def test_restarts_of_one_receiver_are_capped() -> None:
    s = _sender(200 * CHUNK)
    tid = s.transfer_id
    s.receive("bob", Accept(tid, 1, 0, 8), 0.0)
    _send_what_it_may(s, 0.0)
    cap = s.config.max_restarts
    for incarnation in range(2, cap + 2):
        s.receive("bob", Accept(tid, incarnation, 0, 8), 0.0)
        _send_what_it_may(s, 0.0)
    assert s.receiver_state("bob") == "active"
    assert s.resent_frames == cap * 8  # each restart re-sent its window, as it may
    s.receive("bob", Accept(tid, cap + 2, 0, 8), 0.0)
    assert _dropped(s) == [("over-budget", "bob")]
    assert s.finished
    assert _send_what_it_may(s, 0.0) == []


def test_repeated_requests_cannot_make_the_sender_resend_without_bound() -> None:
    """A receiver that requests the same chunks again and again (never acknowledging them) is
    served until its re-sends reach the budget (the file again, at least 64 chunks), then
    dropped; the upload it caused is bounded by the file, not by its requests."""
    count = 600
    s = _sender(count * CHUNK)
    tid = s.transfer_id
    s.receive("bob", Accept(tid, 1, 0, 8), 0.0)
    _send_what_it_may(s, 0.0)
    for _ in range(10 * count):
        s.receive("bob", Request(tid, 1, ((0, 8),)), 0.0)
        _send_what_it_may(s, 0.0)
        if s.finished:
            break
    assert _dropped(s) == [("over-budget", "bob")]
    budget = count + max(count * s.config.resend_ratio, s.config.resend_floor)
    assert s.published_frames <= budget + 1


def test_a_lossy_path_stays_within_the_budget() -> None:
    """Honest repairs over a path that loses a third of the chunk frames fit the budget."""
    sim = Sim(
        payload(40 * CHUNK),
        ["bob", "carol"],
        seed=7,
        chunks=Link(0.33, 0.05, (0.0005, 0.01)),
        control=Link(0.1, 0.05, (0.0005, 0.01)),
    )
    sim.run(until=3600.0)
    assert_outcome(sim, all_succeed=True)


def test_acks_of_a_finished_receiver_do_not_each_cost_a_seal() -> None:
    s = _sender(2 * CHUNK)
    tid = s.transfer_id
    s.receive("bob", Accept(tid, 1, 0, 8), 0.0)
    for read in iter(lambda: s.next_read(0.0), None):
        s.on_chunk_read(read, bytes(CHUNK))
    s.take_actions()
    for k in range(100):
        s.receive("bob", Ack(tid, 1, 2, 10), k * 0.01)
    seals = [a for a in s.take_actions() if type(getattr(a, "message", None)).__name__ == "Seal"]
    assert len(seals) == 1


def test_a_receiver_that_goes_quiet_is_given_up_after_the_idle_deadline() -> None:
    """The sender's side of the same fault: a receiver that accepts and then says nothing (or
    never answers the offer) held the transfer, its slot and its content key open for ever.
    After `idle_timeout` without a word from it, it is ended with reason timeout (and told)."""
    s = SenderTransfer(
        name="x",
        size=10 * CHUNK,
        receivers=["bob", "carol"],
        sender=SENDER,
        signing_key=nacl.signing.SigningKey(bytes(32)),
        now=0.0,
        config=small_config(idle_timeout=100.0),
    )
    tid = s.transfer_id
    s.receive("bob", Accept(tid, 1, 0, 8), 10.0)
    _send_what_it_may(s, 10.0)
    s.take_actions()
    t = 10.0
    while not s.finished:
        d = s.next_deadline()
        assert d is not None
        assert d <= 110.0
        t = d
        s.on_timer(t)
        if t < 100.0:
            assert s.receiver_state("carol") == "offered"
    assert s.receiver_state("carol") == "failed"  # never answered: at 100
    assert s.receiver_state("bob") == "failed"  # silent since 10: at 110
    actions = s.take_actions()
    failed = [(a.peer, a.reason, a.remote) for a in actions if isinstance(a, ReceiverFailed)]
    assert failed == [("carol", "timeout", False), ("bob", "timeout", False)]
    aborts = [a.message for a in actions if isinstance(getattr(a, "message", None), Abort)]
    assert [m.reason for m in aborts] == ["timeout", "timeout"]
    assert s.next_deadline() is None
