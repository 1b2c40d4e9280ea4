"""The bounds on early chunks kept for offers not yet accepted (peerd/transfers/early.py):
what a trusted sender's early frames may hold, and that nothing else is held at all."""

from __future__ import annotations

from peerd.transfers.early import EARLY_BYTES, EARLY_FRAMES, EARLY_KEEP, EarlyChunks

T1, T2, T3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16


def _early(max_transfers: int = 2) -> EarlyChunks:
    return EarlyChunks(lambda: max_transfers, lambda peer: peer in {"alice", "bob"})


def test_frames_are_kept_as_copies_and_given_once() -> None:
    early = _early()
    frame = bytearray(b"chunk")
    assert early.keep("alice", T1, memoryview(frame), now=0.0)
    frame[:] = b"xxxxx"  # the link reuses its buffer
    assert early.take(T1) == [b"chunk"]
    assert early.take(T1) == []
    assert early.bytes == 0


def test_only_a_trusted_sender_and_only_the_first_sender_of_a_transfer() -> None:
    early = _early()
    assert not early.keep("mallory", T1, b"x", now=0.0)
    assert early.keep("alice", T1, b"a", now=0.0)
    assert not early.keep("bob", T1, b"b", now=0.0)  # alice's transfer id, another sender
    assert early.take(T1) == [b"a"]


def test_the_per_transfer_count_and_total_bounds() -> None:
    early = _early(max_transfers=2)
    for n in range(EARLY_FRAMES):
        assert early.keep("alice", T1, bytes([n]), now=0.0)
    assert not early.keep("alice", T1, b"one more", now=0.0)
    assert early.keep("alice", T2, b"y", now=0.0)
    assert not early.keep("alice", T3, b"z", now=0.0)  # a third transfer: beyond the limit
    assert len(early.take(T1)) == EARLY_FRAMES
    big = bytes(EARLY_BYTES // 2)
    assert early.keep("bob", T3, big, now=0.0)
    assert not early.keep("bob", T3, big, now=0.0)  # 1 byte of T2 is kept besides
    assert early.bytes == len(big) + 1


def test_frames_older_than_the_keep_period_go() -> None:
    early = _early(max_transfers=1)
    assert early.keep("alice", T1, b"old", now=0.0)
    assert not early.keep("alice", T2, b"new", now=EARLY_KEEP)  # T1 holds the only place
    assert early.keep("alice", T2, b"new", now=EARLY_KEEP + 0.1)  # T1 expired first
    assert early.take(T1) == []
    assert early.take(T2) == [b"new"]
    assert early.bytes == 0
