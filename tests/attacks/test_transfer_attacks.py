"""Attacks on transfers between running daemons: chunk frames swapped between two concurrent
transfers by the broker, and forged chunks from a rogue co-receiver that holds the content key.
(Bit flips, drops, duplicates, reordering, truncation, replay of an earlier transfer's chunks
and random injection are in tests/e2e/test_transfers.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.mqtt import Topics
from protocol.transfer import ChunkCipher, frame_buffer
from protocol.transfer.manifest import chunk_length
from tests.attacks.conftest import start_cluster
from tests.attacks.helpers import (
    SOON,
    Api,
    Rogue,
    catch_offer,
    counted,
    keys,
)
from tests.support.broker import Broker
from tests.support.cluster import Node, wait_until
from tests.support.files import partial_files, random_file, received_files, sha256
from tests.support.hostile import TO_CLIENT, Hold, HostileProxy, Record

CHUNK = 256 * 1024
CHUNKS = "peerd/v1/+/x/#"


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, module_broker: Broker, proxy: HostileProxy
) -> Iterator[tuple[Node, Node, Node]]:
    """alice paired with bob and with mallory; all behind the proxy."""
    root = tmp_path_factory.mktemp("transfers")
    cluster = start_cluster(root, module_broker, proxy, ["alice", "bob", "mallory"], pairs="first")
    try:
        alice, bob, mallory = cluster
        yield alice, bob, mallory
    finally:
        for n in cluster:
            n.kill()


def test_chunks_swapped_between_two_concurrent_transfers(
    nodes: tuple[Node, Node, Node], proxy: HostileProxy, tmp_path: Path
) -> None:
    """The broker swaps the payloads of chunk frames between two transfers running at once.
    Each swapped frame names the other transfer in its authenticated header: the receiver
    drops it unread (`chunk-wrong-transfer`), repairs, and both files arrive exact."""
    alice, bob, _ = nodes
    a, b = Api(alice), Api(bob)
    try:
        before = b.rejections()
        # Only frames on the two transfers' own topics are paired. A frame on the early topic
        # (x/<sender>/<receiver>, shared by both transfers) reaches its own transfer by its
        # header whatever the topic, so swapping one with a transfer-topic frame is a mere
        # reordering, never a refusal: when every pair fell on it (a receiver that accepts
        # late gets most of a short file early), the test saw swaps and no refusal.
        rule = proxy.swap_across(
            TO_CLIENT, CHUNKS, pairs=8, timeout=0.5, where=lambda p: on_a_transfer_topic(p.topic)
        )
        # Past the early window (64 chunks), so both transfers publish on their own topics.
        one = random_file(tmp_path / "one.bin", 192 * CHUNK + 11, seed=11)
        two = random_file(tmp_path / "two.bin", 192 * CHUNK + 22, seed=22)
        ids = [a.call("v1.send", path=str(p), to=[bob.peer_id])["id"] for p in (one, two)]
        for tid in ids:
            assert a.call("v1.transfer.wait", id=tid, timeout=120.0)["state"] == "verified"
        assert proxy.stats["swapped"] >= 1
        assert rule.applied > 0
        got = {p.name: sha256(p) for p in received_files(bob, alice)}
        assert got["one.bin"] == sha256(one)
        assert got["two.bin"] == sha256(two)
        new = counted(before, b.rejections())
        # Each pair takes a chunk out of each transfer, so both are incomplete when the pair
        # arrives and both frames are refused; a frame is read without a refusal only where it
        # lands on a transfer already complete (a late repair's, say). What must hold:
        # refusals happened, none for another reason, and both files above are exact.
        refused = new.get("chunk-wrong-transfer", 0)
        assert 1 <= refused <= 2 * proxy.stats["swapped"], new
        assert set(new) == {"chunk-wrong-transfer"}, new
        assert not partial_files(bob)
    finally:
        a.close()
        b.close()


def on_a_transfer_topic(topic: str) -> bool:
    """x/<sender>/<transfer id>, not the early topic x/<sender>/<receiver>."""
    last = topic.rsplit("/", 1)[-1]
    return len(last) == 32 and all(c in "0123456789abcdef" for c in last)


MARK = b"mallory!"  # the nonce extension of the forged frames: lets the proxy tell them apart


def test_a_rogue_co_receiver_with_the_content_key_cannot_forge_the_file(
    nodes: tuple[Node, Node, Node], proxy: HostileProxy, tmp_path: Path
) -> None:
    """alice sends one file to bob and mallory. mallory, a trusted receiver, gets the content
    key in her Offer and publishes forged chunks - correctly encrypted, correctly numbered -
    into the transfer's topic before alice's genuine ones reach bob. bob writes them (they
    authenticate), but the hash signed by alice in the Seal does not match: he refuses the
    file (`transfer-failed-hash-mismatch`), never gives it its name, and tells alice why."""
    alice, bob, mallory = nodes
    a, b = Api(alice), Api(bob)
    mallory_keys = keys(mallory)
    mallory.stop()  # from now on mallory runs the rogue below, with her real keys
    rogue = Rogue.of(alice, alice.broker_url, mallory_keys)
    topics = Topics(alice.network)
    offers = catch_offer(rogue)
    genuine_held = proxy.add_rule(
        TO_CLIENT, CHUNKS, Hold(), client=bob.peer_id, where=lambda p: p.payload[24:32] != MARK
    )
    forged_seen = proxy.add_rule(
        TO_CLIENT, CHUNKS, Record(), client=bob.peer_id, where=lambda p: p.payload[24:32] == MARK
    )
    started: dict[str, object] = {}
    try:
        before = b.rejections()
        src = random_file(tmp_path / "weights.bin", 4 * CHUNK + 100, seed=5)
        started = a.call("v1.send", path=str(src), to=[bob.peer_id, mallory.peer_id])
        assert started["state"] == "active"
        wait_until(lambda: offers, SOON, what="mallory's Offer, with the content key")
        offer = offers[0]
        cipher = ChunkCipher(offer.content_key, offer.transfer_id)
        topic = topics.transfer(alice.peer_id, offer.transfer_id)
        forged = []
        for i in range(offer.chunk_count):
            n = chunk_length(i, offer.size, offer.chunk_size, offer.chunk_count)
            buf = frame_buffer(offer.chunk_size)
            size = cipher.seal_into(buf, i, i == offer.chunk_count - 1, b"\xee" * n, MARK)
            forged.append(bytes(buf[:size]))
        # Until bob has all of them (he subscribes when he accepts, maybe after this starts).
        deadline = time.monotonic() + SOON
        while forged_seen.applied < len(forged):
            assert time.monotonic() < deadline, "the forged frames never reached bob"
            for frame in forged:
                rogue.wire.publish(topic, frame)
            time.sleep(0.2)
        proxy.remove_rule(genuine_held)
        proxy.release(genuine_held)  # alice's genuine chunks now arrive: too late

        def bob_outcome() -> dict[str, object] | None:
            return next((t for t in b.call("v1.transfers") if t["id"] == started["id"]), None)

        wait_until(
            lambda: (t := bob_outcome()) is not None and t["state"] != "active",
            SOON,
            what="bob's verdict",
        )
        outcome = bob_outcome()
        assert outcome is not None
        assert outcome["state"] == "failed"
        assert outcome["reason"] == "hash-mismatch"
        assert counted(before, b.rejections()).get("transfer-failed-hash-mismatch") == 1
        assert [p for p in received_files(bob, alice) if p.name == "weights.bin"] == []
        wait_until(lambda: not partial_files(bob), SOON, what="bob removes the partial file")
        wait_until(
            lambda: (
                "hash-mismatch"
                in str(
                    next(t for t in a.call("v1.transfers") if t["id"] == started["id"])[
                        "receivers"
                    ][bob.peer_id]
                )
            ),
            SOON,
            what="alice learns why bob refused",
        )
    finally:
        if started:  # mallory never answers: alice would keep offering her the file
            a.call("v1.cancel", id=started["id"])
        rogue.close()
        a.close()
        b.close()
