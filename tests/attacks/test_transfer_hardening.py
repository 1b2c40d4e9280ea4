"""Transfers between running daemons against what a local user or a trusted-but-hostile peer can
do (issue 18): a FIFO given as the file to send, a planted symlink in a shared inbox, a name at
the file-system limit received twice, a `.SAFETENSORS` extension in capitals, a sender that goes
quiet after its offer, and `.part` files left behind by a crash."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peerd.errors import PeerdError
from protocol.transfer import Accept, Ack, Offer
from protocol.transfer.manifest import chunk_count_for
from tests.attacks.helpers import SOON, Api, Rogue, catch_offer, counted, keys
from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes, pair, wait_until
from tests.support.files import partial_files, random_file, received_files, sha256

IDLE = 3.0  # bob's [receive] idle_timeout, seconds


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, module_broker: Broker
) -> Iterator[tuple[Node, Node, Node, Node]]:
    """alice paired with bob, carol and dave; dave paired with bob (dave's keys later drive a
    rogue sender and a rogue receiver). bob gives up on a quiet incoming transfer after IDLE
    seconds."""
    root = tmp_path_factory.mktemp("hardening")
    cluster = make_nodes(root, module_broker.url, ["alice", "bob", "carol", "dave"])
    alice, bob, carol, dave = cluster
    config = bob.config.read_text()
    assert "\nidle_timeout = " in config
    bob.config.write_text(re.sub(r"(?m)^idle_timeout = .*$", f"idle_timeout = {IDLE}", config))
    try:
        for n in cluster:
            n.start()
        pair(alice, bob)
        pair(alice, carol)
        pair(dave, bob)
        pair(alice, dave)
        yield alice, bob, carol, dave
    finally:
        for n in cluster:
            n.kill()


def _outcome(api: Api, tid: str) -> dict[str, Any] | None:
    return next((t for t in api.call("v1.transfers") if t["id"] == tid), None)


def test_a_fifo_to_send_is_refused_and_the_daemon_keeps_answering(
    nodes: tuple[Node, Node, Node, Node], tmp_path: Path
) -> None:
    """open() of a FIFO blocks until a writer comes: done on the event loop, it froze the
    daemon (status stopped answering; under systemd the watchdog kills it). The file is opened
    non-blocking and refused for not being a regular file."""
    alice, bob, _, _ = nodes
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    a = Api(alice)
    result: dict[str, Any] = {}

    def send() -> None:
        sender = Api(alice)
        try:
            sender.call("v1.send", path=str(fifo), to=[bob.peer_id])
            result["answer"] = "accepted"
        except PeerdError as exc:
            result["answer"] = str(exc)
        finally:
            sender.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        wait_until(lambda: "answer" in result, SOON, what="an answer to the send of a FIFO")
        assert "not a regular file" in result["answer"]
        assert a.status()["transfers"]["sending"] == 0
    finally:
        # On the old code the daemon is stuck in open(): a writer releases it.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(SOON)
        a.close()


def test_a_name_at_the_file_system_limit_received_twice_keeps_both(
    nodes: tuple[Node, Node, Node, Node], tmp_path: Path
) -> None:
    """A valid 255-byte name received twice: the second copy's `-2` made the name too long, and
    the verified file was deleted (receiver-error). The stem is shortened, the extension kept."""
    alice, bob, _, _ = nodes
    name = "w" * (255 - len(".bin")) + ".bin"
    a = Api(alice)
    try:
        srcs = []
        for seed in (1, 2):
            d = tmp_path / str(seed)
            d.mkdir()
            srcs.append(random_file(d / name, 3000 + seed, seed=seed))
        for src in srcs:
            tid = a.call("v1.send", path=str(src), to=[bob.peer_id])["id"]
            assert a.call("v1.transfer.wait", id=tid, timeout=SOON)["state"] == "verified"
        got = {p.name: sha256(p) for p in received_files(bob, alice) if p.name.startswith("www")}
        assert len(got) == 2, got
        assert got[name] == sha256(srcs[0])
        (second,) = (n for n in got if n != name)
        assert len(second.encode()) <= 255
        assert second.endswith("-2.bin")
        assert got[second] == sha256(srcs[1])
    finally:
        a.close()


def test_capital_safetensors_extension_is_checked(
    nodes: tuple[Node, Node, Node, Node], tmp_path: Path
) -> None:
    """`model.SAFETENSORS` is a safetensors file to every loader that ignores case: its header
    is checked as for `.safetensors` (a malformed one is refused, not given its name)."""
    alice, bob, _, _ = nodes
    src = tmp_path / "upper.SAFETENSORS"
    header = b'{"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}'
    src.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    a, b = Api(alice), Api(bob)
    try:
        before = b.rejections()
        tid = a.call("v1.send", path=str(src), to=[bob.peer_id])["id"]
        done = a.call("v1.transfer.wait", id=tid, timeout=SOON)
        assert done["state"] == "failed"
        assert "bad-safetensors" in str(done["receivers"][bob.peer_id])
        assert counted(before, b.rejections()).get("transfer-failed-bad-safetensors") == 1
        assert not [p for p in received_files(bob, alice) if p.name == src.name]
    finally:
        a.close()
        b.close()


def test_a_planted_symlink_for_the_senders_inbox_is_not_followed(
    nodes: tuple[Node, Node, Node, Node], tmp_path: Path
) -> None:
    """A local user who can write to a shared inbox plants `inbox/<sender>` as a symlink to a
    directory of its choice before the first file from that sender arrives. The receiver must
    not write there: it refuses the transfer and says why."""
    alice, _, carol, _ = nodes
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    inbox = carol.dir / "inbox"
    inbox.mkdir(exist_ok=True)
    (inbox / alice.peer_id).symlink_to(elsewhere, target_is_directory=True)
    a, c = Api(alice), Api(carol)
    try:
        before = c.rejections()
        src = random_file(tmp_path / "planted.bin", 5000, seed=3)
        tid = a.call("v1.send", path=str(src), to=[carol.peer_id])["id"]
        done = a.call("v1.transfer.wait", id=tid, timeout=SOON)
        assert done["state"] == "failed"
        assert "receiver-error" in str(done["receivers"][carol.peer_id])
        assert list(elsewhere.iterdir()) == []
        # Once per Offer: alice may repeat hers before the refusal reaches her.
        assert counted(before, c.rejections()).get("transfer-inbox-unsafe", 0) >= 1
    finally:
        (inbox / alice.peer_id).unlink()
        a.close()
        c.close()


def test_a_sender_that_goes_quiet_after_its_offer_loses_its_slot(
    nodes: tuple[Node, Node, Node, Node],
) -> None:
    """dave (trusted by bob) offers a file and then says nothing more. bob reserved the space
    and a receive slot; after the idle deadline both are given back, the `.part` is removed,
    and the expiry is counted. Without a deadline they were held forever."""
    _, bob, _, dave = nodes
    dave_keys = keys(dave)
    dave.stop()
    rogue = Rogue.of(bob, bob.broker_url, dave_keys)
    b = Api(bob)
    try:
        before = b.rejections()
        rogue.connect(bob.peer_id)
        wait_until(rogue.sessions_up, SOON, what="the rogue's session with bob")
        size = 3 * 256 * 1024 + 5
        offer = Offer(
            secrets.token_bytes(16),
            "quiet.bin",
            size,
            256 * 1024,
            chunk_count_for(size, 256 * 1024),
            int(time.time()),
            secrets.token_bytes(32),
        )
        rogue.send(bob.peer_id, offer.encode())
        tid = offer.transfer_id.hex()
        wait_until(
            lambda: (t := _outcome(b, tid)) is not None and t["state"] == "active",
            SOON,
            what="bob accepting the offer",
        )
        assert partial_files(bob)
        wait_until(
            lambda: (t := _outcome(b, tid)) is not None and t["state"] != "active",
            SOON + IDLE,
            what="bob giving up on the quiet sender",
        )
        outcome = _outcome(b, tid)
        assert outcome is not None
        assert outcome["state"] == "failed"
        assert outcome["reason"] == "timeout"
        assert b.status()["transfers"]["receiving"] == 0
        assert not [p for p in partial_files(bob) if tid in p.name]
        assert counted(before, b.rejections()).get("transfer-failed-timeout") == 1
    finally:
        rogue.close()
        b.close()
        dave.start()


def test_orphan_part_files_are_swept_at_start(nodes: tuple[Node, Node, Node, Node]) -> None:
    """A `.part` that belongs to no resumable transfer (a crash between creating it and
    recording it, a store restored from a backup) is removed when the daemon starts; other
    files, and what a planted symlink points to, are left alone."""
    alice, bob, _, _ = nodes
    bob.stop()
    inbox = bob.dir / "inbox" / alice.peer_id
    inbox.mkdir(parents=True, exist_ok=True)
    orphan = inbox / f".{secrets.token_hex(16)}.part"
    orphan.write_bytes(b"x" * 4096)
    keep = inbox / "notes.txt"
    keep.write_text("mine")
    target = bob.dir / "precious"
    target.write_text("not yours")
    link = inbox / f".{secrets.token_hex(16)}.part"
    link.symlink_to(target)
    bob.start()
    b = Api(bob)
    try:
        wait_until(lambda: not orphan.exists(), SOON, what="the orphan .part removed")
        assert keep.read_text() == "mine"
        assert target.read_text() == "not yours"
        assert b.status()["transfers"].get("orphans-removed", 0) >= 1
    finally:
        keep.unlink()
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        b.close()


def test_a_receiver_that_claims_to_restart_with_nothing_is_dropped(
    nodes: tuple[Node, Node, Node, Node], tmp_path: Path
) -> None:
    """dave (trusted by alice) accepts a file, acknowledges part of it, then sends 27-byte
    Accepts of ever higher incarnations claiming nothing durable. Each made alice re-send the
    window; ten cost 2.5 GiB on a large file and the transfer never ended. Now the first ends
    dave's part of the transfer (`protocol-error`, counted), and nothing is sent twice."""
    alice, _, _, dave = nodes
    dave_keys = keys(dave)
    dave.stop()
    rogue = Rogue.of(alice, alice.broker_url, dave_keys)
    offers = catch_offer(rogue)
    a = Api(alice)
    started: dict[str, Any] = {}
    try:
        before = a.rejections()
        src = random_file(tmp_path / "big.bin", 40 * 256 * 1024, seed=9)
        started = a.call("v1.send", path=str(src), to=[dave.peer_id])
        wait_until(lambda: offers, SOON, what="dave's Offer")
        tid = offers[0].transfer_id
        rogue.send(alice.peer_id, Accept(tid, 1, 0, 64).encode())
        wait_until(
            lambda: (
                (t := _outcome(a, started["id"])) is not None
                and t.get("published_bytes", 0) >= src.stat().st_size
            ),
            SOON,
            what="alice publishing the whole file once",
        )
        rogue.send(alice.peer_id, Ack(tid, 1, 8, 72).encode())
        for incarnation in range(2, 12):
            rogue.send(alice.peer_id, Accept(tid, incarnation, 0, 64).encode())
        done = a.call("v1.transfer.wait", id=started["id"], timeout=SOON)
        assert done["state"] == "failed"
        assert "protocol-error" in str(done["receivers"][dave.peer_id])
        assert done["resent_frames"] == 0
        assert counted(before, a.rejections()).get("transfer-dropped-protocol-error") == 1
    finally:
        if started and (t := _outcome(a, started["id"])) is not None and t["state"] == "active":
            a.call("v1.cancel", id=started["id"])
        rogue.close()
        a.close()
        dave.start()
