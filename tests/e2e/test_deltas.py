"""Deltas between real daemons through a real Mosquitto (protocol/SPEC.md 7.11): a new version
of a model costs only what changed, a receiver only ever reuses what it got from the same
sender, and a damaged local copy is fetched again. Every file is checked byte for byte."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes, pair, wait_until
from tests.support.files import partial_files, sha256
from tests.support.hostile import TO_CLIENT, Hold, HostileProxy
from tests.support.models import tensor_sizes, write_model

CHUNK = 256 * 1024
SIZES = tensor_sizes(12 << 20, 24, seed=7)  # ~12 MiB in 24 tensors of ~250-850 KiB
CHANGED = {3: 1, 11: 1}  # two tensors of 24 (~8%)


@pytest.fixture(scope="module")
def trio(
    tmp_path_factory: pytest.TempPathFactory, shared_broker: Broker
) -> Iterator[tuple[Node, Node, Node]]:
    """One set of daemons for the module (pairing three is most of the time): each test uses
    files of its own seed, so no test can reuse another's chunks."""
    root = tmp_path_factory.mktemp("deltas")
    a, b, c = make_nodes(root, shared_broker.url, ["alice", "bob", "carol"])
    for n in (a, b, c):
        n.start()
    try:
        pair(a, b)
        pair(c, b)
        pair(a, c)
        yield a, b, c
    finally:
        for n in (a, b, c):
            n.kill()


def send(src: Node, path: Path, *to: Node) -> dict:
    result = src.json("send", str(path), "--to", ",".join(n.peer_id for n in to), "--wait")
    assert result["state"] == "verified", result
    return result


def received(node: Node, sender: Node, name: str) -> Path:
    return node.dir / "inbox" / sender.peer_id / name


def index_rows(node: Node, sender: Node) -> int:
    db = sqlite3.connect(node.dir / "peerd.db")
    try:
        return db.execute(
            "SELECT count(*) FROM chunk_index WHERE sender = ?", (sender.peer_id,)
        ).fetchone()[0]
    finally:
        db.close()


def recipes_stored(node: Node) -> int:
    db = sqlite3.connect(node.dir / "peerd.db")
    try:
        return db.execute("SELECT count(*) FROM chunk_recipes").fetchone()[0]
    finally:
        db.close()


def indexed(node: Node, sender: Node) -> int:
    """The rows of `sender`'s chunks at `node`, once there are some: a file sent to a receiver
    that held none of its sampled chunks goes without a recipe, and the recipe follows it."""
    wait_until(lambda: index_rows(node, sender) > 0, 30, what="the recipe that follows the file")
    return index_rows(node, sender)


def late_recipes_sent(node: Node) -> int:
    return int(node.status()["transfers"].get("late-recipes-sent", 0))


def changed_bytes(changed: dict[int, int]) -> int:
    return sum(SIZES[i] for i in changed)


def test_a_new_version_costs_only_its_changed_tensors(
    trio: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    a, b, _ = trio
    v1 = write_model(tmp_path / "v1.safetensors", SIZES, seed=1)
    late_before = late_recipes_sent(a)
    first = send(a, v1, b)
    assert first["published_bytes"] >= v1.stat().st_size  # nothing to reuse the first time
    # Alice had sent bob none of its chunks: v1 went without a recipe beside it, at full speed,
    # and its recipe followed, so that bob indexed it for the next version.
    assert indexed(b, a) > 0
    assert late_recipes_sent(a) == late_before + 1
    v2 = write_model(tmp_path / "v2.safetensors", SIZES, seed=1, changed=CHANGED)
    second = send(a, v2, b)
    assert sha256(received(b, a, v2.name)) == sha256(v2)
    # Only the changed tensors and the frames they straddle: at most two frames more each.
    budget = changed_bytes(CHANGED) + 2 * len(CHANGED) * CHUNK
    assert second["published_bytes"] <= budget
    held = second["receivers"][b.peer_id]["held_bytes"]
    assert held >= v2.stat().st_size - budget
    # The CLI says what was saved, on both sides.
    assert "already at" in a.cli("transfers")
    assert "was already here" in b.cli("transfers")
    # The same file again costs (almost) nothing: every frame is already there. All that goes
    # is the first chunk, published early so that the first byte need not wait for the Accept
    # (SPEC 7.7): one frame, 2% of this 12 MiB file, 0.1% of the bench's 256 MiB.
    again = send(a, v2, b)
    assert again["published_bytes"] <= CHUNK + 64
    assert sha256(received(b, a, "v2-2.safetensors")) == sha256(v2)
    assert not partial_files(b)


def test_fan_out_sends_the_union_of_what_the_receivers_miss(
    trio: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    a, b, c = trio
    base = write_model(tmp_path / "base.safetensors", SIZES, seed=2)
    send(a, base, b)
    other = write_model(tmp_path / "other.safetensors", SIZES, seed=2, changed={20: 5})
    send(a, other, c)  # carol holds another version: tensor 20 differs from bob's
    v2 = write_model(tmp_path / "fan-v2.safetensors", SIZES, seed=2, changed=CHANGED)
    result = send(a, v2, b, c)
    for node in (b, c):
        assert sha256(received(node, a, v2.name)) == sha256(v2)
    # Carol misses tensor 20 on top of the changed ones: the union, published once.
    union = changed_bytes(CHANGED) + SIZES[20]
    assert result["published_bytes"] <= union + 2 * 3 * CHUNK
    held_b = result["receivers"][b.peer_id]["held_bytes"]
    held_c = result["receivers"][c.peer_id]["held_bytes"]
    assert held_b > held_c > 0


def test_a_damaged_local_copy_is_fetched_again(
    trio: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    a, b, _ = trio
    v1 = write_model(tmp_path / "dmg-v1.safetensors", SIZES, seed=3)
    send(a, v1, b)
    indexed(b, a)
    got = received(b, a, v1.name)
    # Damage one tensor in place and hide it: same size, same mtime, same inode.
    st = got.stat()
    start = got.stat().st_size - SIZES[-1] // 2
    with got.open("r+b") as f:
        f.seek(start)
        f.write(bytes(4096))
    os.utime(got, ns=(st.st_atime_ns, st.st_mtime_ns))
    v2 = write_model(tmp_path / "dmg-v2.safetensors", SIZES, seed=3, changed=CHANGED)
    result = send(a, v2, b)
    assert sha256(received(b, a, v2.name)) == sha256(v2)
    # The damaged chunk was not reused: more than the changed tensors went over the wire.
    assert result["published_bytes"] > changed_bytes(CHANGED)
    assert result["published_bytes"] <= changed_bytes(CHANGED) + 6 * CHUNK + 2 * 256 * 1024


def test_a_peer_cannot_make_the_receiver_claim_another_senders_chunks(
    trio: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    a, b, c = trio
    secret = write_model(tmp_path / "secret.safetensors", SIZES, seed=99)
    send(a, secret, b)
    indexed(b, a)
    # Carol once sent bob a file sharing the first half of the tensors with the secret, so her
    # daemon sends its recipe beside it (as a hostile sender always could).
    half = len(SIZES) // 2
    decoy = write_model(
        tmp_path / "decoy.safetensors", SIZES, seed=99, changed=dict.fromkeys(range(half, 24), 1)
    )
    send(c, decoy, b)
    indexed(b, c)
    # Carol now offers bob the very file alice sent him: were bob to reuse alice's chunks, carol
    # would learn from the traffic that bob holds it (the confirmation-of-file attack). Only
    # what carol herself sent him is reused (the first half, and the header).
    result = send(c, secret, b)
    held = result["receivers"][b.peer_id]["held_bytes"]
    assert sum(SIZES[:half]) // 2 < held <= sum(SIZES[:half]) + 256 * 1024
    assert result["published_bytes"] >= sum(SIZES[half:])
    assert sha256(received(b, c, secret.name)) == sha256(secret)


def _chunk_transfer(node: Node, tid: str) -> dict:
    return next(t for t in node.json("transfers") if t["id"] == tid)


@pytest.mark.slow
def test_a_receiver_killed_mid_delta_resumes_with_its_copies_and_indexes_the_file(
    tmp_path: Path, broker: Broker
) -> None:
    with HostileProxy(broker.port) as proxy:
        a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
        b.config.write_text(b.config.read_text().replace(broker.url, proxy.url))
        a.start()
        b.start()
        try:
            pair(a, b)
            v1 = write_model(tmp_path / "v1.safetensors", SIZES, seed=4)
            send(a, v1, b)
            rows_v1 = indexed(b, a)
            changed = dict.fromkeys(range(0, len(SIZES), 3), 1)  # a third of the tensors
            v2 = write_model(tmp_path / "v2.safetensors", SIZES, seed=4, changed=changed)
            hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold(), skip=4)
            started = a.json("send", str(v2), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 30, what="some chunks through, then held")
            wait_until(lambda: bool(partial_files(b)), 20, what="the .part")
            # The recipe streams beside the transfer (SPEC 7.11): killed once every part was
            # applied (the whole recipe is in the store), its copies are in the .part, synced.
            # (Killed earlier, the restarted receiver fetches what the late parts would have
            # copied: a restart does not resume a recipe.)
            wait_until(lambda: recipes_stored(b) > 0, 20, what="the whole recipe applied")
            b.kill()
            proxy.remove_rule(hold)
            b.start()
            wait_until(
                lambda: _chunk_transfer(a, started["id"])["state"] == "verified",
                90,
                what="verified after the restart",
            )
            assert sha256(received(b, a, v2.name)) == sha256(v2)
            final = _chunk_transfer(a, started["id"])
            # The chunks bob copied from v1 were never sent, before or after the restart: what
            # went out beyond re-sends (repairs of the held frames, the restart's window) is
            # the changed tensors and the frames they straddle.
            first_sends = final["published_bytes"] - final["resent_frames"] * (CHUNK + 64)
            assert first_sends <= changed_bytes(changed) + 2 * len(changed) * CHUNK
            # The recipe survived the crash in the store: v2 is indexed too.
            assert index_rows(b, a) > rows_v1
            # A blocked sender's rows are erased: nothing of it is offered as a base again.
            b.cli("block", a.peer_id)
            wait_until(lambda: index_rows(b, a) == 0, 20, what="alice's chunk rows erased")
        finally:
            a.kill()
            b.kill()
