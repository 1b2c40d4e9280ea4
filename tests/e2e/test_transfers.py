"""Model transfers between real daemons through a real Mosquitto: exact bytes, fan-out, crashes
of either daemon or of the broker, a hostile network, full disks, revocation."""

from __future__ import annotations

import array
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes, pair, wait_until
from tests.support.files import partial_files, random_file, received_files, sha256
from tests.support.hostile import (
    TO_BROKER,
    TO_CLIENT,
    BitFlip,
    Drop,
    Duplicate,
    Hold,
    HostileProxy,
    SwapAdjacent,
    Truncate,
)

CHUNK = 256 * 1024


def _transfer(node: Node, tid: str) -> dict:
    return next(t for t in node.json("transfers") if t["id"] == tid)


@pytest.fixture
def pair_ab(tmp_path: Path, broker: Broker) -> Iterator[tuple[Node, Node]]:
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    a.start()
    b.start()
    try:
        pair(a, b)
        yield a, b
    finally:
        a.kill()
        b.kill()


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17])
def test_exact_bytes_for_edge_sizes(pair_ab: tuple[Node, Node], tmp_path: Path, size: int) -> None:
    a, b = pair_ab
    src = random_file(tmp_path / f"model-{size}.bin", size, seed=size)
    result = a.json("send", str(src), "--to", b.peer_id, "--wait")
    assert result["state"] == "verified"
    assert result["receivers"][b.peer_id]["state"] == "verified"
    (got,) = received_files(b, a)
    assert got.name == src.name
    assert got.stat().st_size == size
    assert sha256(got) == sha256(src)
    assert not partial_files(b)
    # The content key is gone from both stores once the transfer ended.
    for node in (a, b):
        rows = node_transfers(node)
        assert all(r["snapshot"] is None for r in rows)


def node_transfers(node: Node) -> list[dict]:
    import sqlite3  # noqa: PLC0415

    db = sqlite3.connect(node.dir / "peerd.db")
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM transfers")]
    finally:
        db.close()


def test_three_receivers_at_once_publish_each_chunk_once(tmp_path: Path, broker: Broker) -> None:
    nodes = make_nodes(tmp_path, broker.url, ["s", "r1", "r2", "r3"])
    for n in nodes:
        n.start()
    try:
        s, *receivers = nodes
        for r in receivers:
            pair(s, r)
        src = random_file(tmp_path / "shared.safetensors.bin", 24 * CHUNK + 5)
        result = s.json("send", str(src), "--to", ",".join(r.peer_id for r in receivers), "--wait")
        assert result["state"] == "verified"
        for r in receivers:
            (got,) = received_files(r, s)
            assert sha256(got) == sha256(src)
        # Encrypt once, publish once: 25 frames for three receivers, none re-sent.
        frames = 25
        assert result["resent_frames"] == 0
        assert result["published_bytes"] < (src.stat().st_size + frames * 64) * 1.01
    finally:
        for n in nodes:
            n.kill()


def test_a_second_file_of_the_same_name_never_replaces_the_first(
    pair_ab: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = pair_ab
    first = random_file(tmp_path / "w.bin", 1000, seed=1)
    a.json("send", str(first), "--to", b.peer_id, "--wait")
    first_hash = sha256(first)
    second = random_file(tmp_path / "w.bin", 2000, seed=2)
    a.json("send", str(second), "--to", b.peer_id, "--wait")
    names = sorted(p.name for p in received_files(b, a))
    assert names == ["w-2.bin", "w.bin"]
    assert sha256(b.dir / "inbox" / a.peer_id / "w.bin") == first_hash


def test_offline_receiver_gets_the_file_when_it_comes_back(
    pair_ab: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = pair_ab
    b.stop()
    src = random_file(tmp_path / "later.bin", 3 * CHUNK)
    started = a.json("send", str(src), "--to", b.peer_id)
    a.stop()  # the pending transfer survives the sender's restart too
    a.start()
    b.start()
    try:
        wait_until(lambda: received_files(b, a), 60, what="bob receives the file")
    except TimeoutError as exc:
        # Failed once in CI (2026-12-06) and never again locally: the logs say where it stuck.
        raise AssertionError(
            f"{exc}\n--- alice's transfers: {a.json('transfers')}"
            f"\n--- alice's log:\n{a.log()[-8000:]}\n--- bob's log:\n{b.log()[-8000:]}"
        ) from None
    assert sha256(received_files(b, a)[0]) == sha256(src)
    wait_until(lambda: _transfer(a, started["id"])["state"] == "verified", 30, what="verified")


def test_send_timeout_drops_a_receiver_that_never_answers(
    pair_ab: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = pair_ab
    b.stop()
    src = random_file(tmp_path / "x.bin", 1000)
    result = a.run_cli("send", str(src), "--to", b.peer_id, "--timeout", "2", "--wait", "--json")
    assert result.returncode == 1
    assert "timeout" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cancel_on_the_sender_side(pair_ab: tuple[Node, Node], tmp_path: Path) -> None:
    a, b = pair_ab
    b.stop()
    src = random_file(tmp_path / "x.bin", 1000)
    started = a.json("send", str(src), "--to", b.peer_id)
    a.cli("cancel", started["id"])
    wait_until(lambda: _transfer(a, started["id"])["state"] == "cancelled", 10, what="cancelled")


def test_refused_when_the_receiver_disk_is_too_small(tmp_path: Path, broker: Broker) -> None:
    """A receiver whose inbox is a small tmpfs refuses a file that does not fit: the sender
    sees why, and no file (partial or final) is left."""
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    inbox = b.dir / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(inbox)], check=False
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        a.start()
        b.start()
        pair(a, b)
        src = random_file(tmp_path / "big.bin", 20 * 1024 * 1024)
        result = a.run_cli("send", str(src), "--to", b.peer_id, "--wait", "--json")
        assert result.returncode == 1
        assert "no-space" in result.stderr or "space" in result.stderr
        assert not list(inbox.rglob("*.bin"))
        assert not list(inbox.rglob(".*.part"))
        events = b.json("transfers")
        assert events[-1]["state"] == "refused"
    finally:
        a.kill()
        b.kill()
        subprocess.run(["umount", str(inbox)], check=False)


def test_files_over_the_size_limit_are_refused(tmp_path: Path, broker: Broker) -> None:
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    config = b.config.read_text()
    assert 'max_file_size = "100GiB"' in config
    b.config.write_text(config.replace('max_file_size = "100GiB"', 'max_file_size = "1MiB"'))
    a.start()
    b.start()
    try:
        pair(a, b)
        src = random_file(tmp_path / "big.bin", 2 * 1024 * 1024)
        result = a.run_cli("send", str(src), "--to", b.peer_id, "--wait")
        assert result.returncode == 1
        assert "too-large" in result.stderr or "limit" in result.stderr
        assert not received_files(b, a)
    finally:
        a.kill()
        b.kill()


def test_malformed_safetensors_is_refused(pair_ab: tuple[Node, Node], tmp_path: Path) -> None:
    a, b = pair_ab
    bad = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    result = a.run_cli("send", str(bad), "--to", b.peer_id, "--wait")
    assert result.returncode == 1
    assert "safetensors" in result.stderr
    # The sender sees the receiver's reason in words, and never 100% for a file that failed.
    assert "failed: bad-safetensors (" in result.stderr, result.stderr
    assert "tensor 'w' is 99 bytes" in result.stderr, result.stderr
    assert "100.0%" not in result.stderr
    (sent,) = a.json("transfers")
    assert sent["receivers"][b.peer_id]["detail"]
    assert not received_files(b, a)
    assert not partial_files(b)


def test_valid_safetensors_is_accepted(pair_ab: tuple[Node, Node], tmp_path: Path) -> None:
    a, b = pair_ab
    path = tmp_path / "good.safetensors"
    _write_safetensors(path, {"layer.weight": ([3, 4], array.array("f", range(12)).tobytes())})
    assert a.json("send", str(path), "--to", b.peer_id, "--wait")["state"] == "verified"
    assert sha256(received_files(b, a)[0]) == sha256(path)


def _write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    """F32 tensors given as (shape, raw little-endian bytes)."""
    header: dict[str, object] = {}
    offset = 0
    blobs = []
    for name, (shape, data) in tensors.items():
        header[name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_source_changed_during_the_transfer_aborts_with_a_clear_error(
    tmp_path: Path, broker: Broker
) -> None:
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    with HostileProxy(broker.port) as proxy:
        b.broker_url = proxy.url
        b_conf = b.config.read_text().replace(broker.url, proxy.url)
        b.config.write_text(b_conf)
        a.start()
        b.start()
        try:
            pair(a, b)
            hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold(), skip=8)
            # More than a window: reads wait.
            src = random_file(tmp_path / "moving.bin", 200 * CHUNK)
            started = a.json("send", str(src), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 20, what="the transfer to be under way")
            with src.open("r+b") as f:
                f.seek(100)
                f.write(b"changed")
            proxy.remove_rule(hold)
            proxy.release(hold)
            wait_until(
                lambda: _transfer(a, started["id"])["state"] in ("failed", "verified"),
                30,
                what="the transfer ends",
            )
            final = _transfer(a, started["id"])
            assert final["state"] == "failed"
            assert "source-changed" in json.dumps(final) or "changed" in json.dumps(final)
            assert not received_files(b, a)
            wait_until(lambda: not partial_files(b), 10, what="bob removes the partial file")
        finally:
            a.kill()
            b.kill()


# -- crashes ------------------------------------------------------------------------------------


def _proxied_pair(
    tmp_path: Path, broker: Broker, proxy: HostileProxy, *, behind: str
) -> tuple[Node, Node]:
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    node = a if behind == "alice" else b
    node.config.write_text(node.config.read_text().replace(broker.url, proxy.url))
    a.start()
    b.start()
    pair(a, b)
    return a, b


def test_receiver_sigkill_mid_transfer_resumes_and_completes(
    tmp_path: Path, broker: Broker
) -> None:
    with HostileProxy(broker.port) as proxy:
        a, b = _proxied_pair(tmp_path, broker, proxy, behind="bob")
        try:
            src = random_file(tmp_path / "model.bin", 120 * CHUNK)
            hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold(), skip=60)
            started = a.json("send", str(src), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 20, what="half the chunks through")
            wait_until(
                lambda: (
                    bool(partial_files(b))
                    and _transfer(a, started["id"])["receivers"][b.peer_id]["bytes"] > 0
                ),
                20,
                what="some progress acknowledged",
            )
            # Alice counts a chunk as done only when bob says it is durable, so what she counted
            # before the kill is a floor on what bob still holds after it.
            acked = _transfer(a, started["id"])["receivers"][b.peer_id]["bytes"] // CHUNK
            b.kill()  # SIGKILL: no chance to tidy up
            # Re-sends before the kill (bob asking again for the chunks the proxy held, more
            # often the slower a loaded machine makes it) are repairs, not the restart's cost.
            resent_before = _transfer(a, started["id"])["resent_frames"]
            proxy.remove_rule(hold)
            b.start()
            wait_until(
                lambda: _transfer(a, started["id"])["state"] == "verified", 60, what="verified"
            )
            (got,) = received_files(b, a)
            assert sha256(got) == sha256(src)
            final = _transfer(a, started["id"])
            # What bob had said was durable is not sent again. (Not "at most one window": the
            # window grows with the measured round trip, up to 128 chunks of this size.)
            assert acked > 0
            assert final["resent_frames"] - resent_before <= 120 - acked
        finally:
            a.kill()
            b.kill()


def test_sender_sigkill_mid_transfer_resumes_and_completes(tmp_path: Path, broker: Broker) -> None:
    with HostileProxy(broker.port) as proxy:
        a, b = _proxied_pair(tmp_path, broker, proxy, behind="bob")
        try:
            src = random_file(tmp_path / "model.bin", 120 * CHUNK)
            hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold(), skip=50)
            started = a.json("send", str(src), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 20, what="chunks flowing")
            a.kill()
            proxy.remove_rule(hold)
            a.start()
            wait_until(lambda: len(received_files(b, a)) == 1, 60, what="bob gets the file")
            assert sha256(received_files(b, a)[0]) == sha256(src)
            wait_until(
                lambda: _transfer(a, started["id"])["state"] == "verified", 30, what="verified"
            )
        finally:
            a.kill()
            b.kill()


def test_broker_sigkill_mid_transfer_resumes_and_completes(tmp_path: Path, broker: Broker) -> None:
    with HostileProxy(broker.port) as proxy:
        a, b = _proxied_pair(tmp_path, broker, proxy, behind="bob")
        try:
            src = random_file(tmp_path / "model.bin", 120 * CHUNK)
            hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold(), skip=40)
            started = a.json("send", str(src), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 20, what="chunks flowing")
            broker.kill()
            proxy.remove_rule(hold)
            time.sleep(0.5)
            broker.start()
            wait_until(
                lambda: _transfer(a, started["id"])["state"] == "verified", 90, what="verified"
            )
            assert sha256(received_files(b, a)[0]) == sha256(src)
        finally:
            a.kill()
            b.kill()


# -- a hostile network ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "action"),
    [
        ("bitflip", BitFlip(count=1)),
        ("drop", Drop()),
        ("duplicate", Duplicate(2)),
        ("reorder", SwapAdjacent(timeout=0.2)),
        ("truncate", Truncate(cut=100)),
    ],
)
def test_tampered_chunk_frames_give_the_exact_file_or_a_clear_failure(
    tmp_path: Path, broker: Broker, name: str, action: object
) -> None:
    with HostileProxy(broker.port, seed=7) as proxy:
        a, b = _proxied_pair(tmp_path, broker, proxy, behind="bob")
        try:
            src = random_file(tmp_path / "model.bin", 40 * CHUNK + 3)
            rule = proxy.add_rule(
                TO_CLIENT,
                "peerd/v1/+/x/#",
                action,
                skip=3,
                count=10,  # type: ignore[arg-type]
            )
            result = a.run_cli("send", str(src), "--to", b.peer_id, "--wait", "--json", timeout=120)
            assert rule.applied > 0
            received = received_files(b, a)
            if result.returncode == 0:
                (got,) = received
                assert sha256(got) == sha256(src)
            else:
                assert received == []  # a clear failure, never a wrong file
            assert not partial_files(b) or result.returncode == 0
            if name in ("bitflip", "truncate"):
                assert (
                    sum(v for k, v in b.status()["rejections"].items() if k.startswith("chunk-"))
                    > 0
                )
        finally:
            a.kill()
            b.kill()


def test_replayed_and_injected_chunks_are_rejected(tmp_path: Path, broker: Broker) -> None:
    """Chunks of an earlier transfer replayed into a new one, and forged chunks injected, are
    rejected; the new file arrives exact."""
    with HostileProxy(broker.port) as proxy:
        a, b = _proxied_pair(tmp_path, broker, proxy, behind="bob")
        try:
            first = random_file(tmp_path / "first.bin", 4 * CHUNK, seed=1)
            from tests.support.hostile import Record  # noqa: PLC0415

            rec = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Record())
            a.json("send", str(first), "--to", b.peer_id, "--wait")
            proxy.remove_rule(rec)
            recorded = proxy.recordings("peerd/v1/+/x/#")
            assert recorded
            second = random_file(tmp_path / "second.bin", 4 * CHUNK, seed=2)
            hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold())
            started = a.json("send", str(second), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 20, what="the second transfer under way")
            # A delta candidate's first chunk goes early (SPEC 7.7), on bob's early topic and
            # before he took the Offer: forgeries must come once he listens on the transfer's
            # topic, or they meet no subscription and prove nothing.
            wait_until(
                lambda: any(t["id"] == started["id"] for t in b.json("transfers")),
                20,
                what="bob receiving the second transfer",
            )
            topic = f"peerd/v1/test/x/{a.peer_id}/{started['id']}"
            for pkt in recorded:
                proxy.inject(TO_CLIENT, topic, pkt.payload)
            proxy.inject(TO_CLIENT, topic, os.urandom(CHUNK + 64))

            def rejected() -> int:
                counts = b.status()["rejections"]
                return sum(v for k, v in counts.items() if k.startswith("chunk-"))

            wait_until(lambda: rejected() >= len(recorded) + 1, 20, what="every forgery rejected")
            proxy.remove_rule(hold)
            proxy.release(hold)
            wait_until(
                lambda: _transfer(a, started["id"])["state"] == "verified", 30, what="verified"
            )
            got = b.dir / "inbox" / a.peer_id / "second.bin"
            assert sha256(got) == sha256(second)
        finally:
            a.kill()
            b.kill()


def test_the_sender_blocking_a_receiver_mid_transfer_stops_it(
    tmp_path: Path, broker: Broker
) -> None:
    with HostileProxy(broker.port) as proxy:
        a, b = _proxied_pair(tmp_path, broker, proxy, behind="bob")
        try:
            src = random_file(tmp_path / "model.bin", 200 * CHUNK)
            hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold(), skip=10)
            started = a.json("send", str(src), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 20, what="chunks flowing")
            a.cli("block", b.peer_id)
            wait_until(lambda: _transfer(a, started["id"])["state"] == "failed", 20, what="stopped")
            assert "blocked" in json.dumps(_transfer(a, started["id"]))
            proxy.remove_rule(hold)
            proxy.release(hold)
            time.sleep(1)
            assert not received_files(b, a)  # at most a window reached bob: never a final file
        finally:
            a.kill()
            b.kill()


def test_the_receiver_revoking_trust_mid_transfer_stops_it(tmp_path: Path, broker: Broker) -> None:
    with HostileProxy(broker.port) as proxy:
        a, b = _proxied_pair(tmp_path, broker, proxy, behind="bob")
        try:
            src = random_file(tmp_path / "model.bin", 200 * CHUNK)
            hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold(), skip=10)
            started = a.json("send", str(src), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 20, what="chunks flowing")
            wait_until(lambda: partial_files(b), 10, what="bob's partial file")
            b.cli("block", a.peer_id)
            wait_until(
                lambda: any(
                    t["id"] == started["id"] and t["state"] == "failed" for t in b.json("transfers")
                ),
                20,
                what="bob stops receiving",
            )
            proxy.remove_rule(hold)
            proxy.release(hold)
            wait_until(lambda: not partial_files(b), 10, what="the partial file removed")
            assert not received_files(b, a)
        finally:
            a.kill()
            b.kill()


@pytest.mark.slow
def test_one_gib_exact(pair_ab: tuple[Node, Node], tmp_path: Path) -> None:
    a, b = pair_ab
    src = random_file(tmp_path / "model-1g.bin", 1 << 30)
    result = a.json("send", str(src), "--to", b.peer_id, "--wait", timeout=600)
    assert result["state"] == "verified"
    (got,) = received_files(b, a)
    assert got.stat().st_size == 1 << 30
    assert sha256(got) == sha256(src)


@pytest.mark.slow
@pytest.mark.parametrize("client", ["builtin", "aiomqtt"])
def test_a_stalled_broker_connection_is_replaced_and_the_transfer_completes(
    tmp_path: Path, broker: Broker, client: str
) -> None:
    """Issue 13 item 4: the sender's broker connection stalls mid-transfer (nothing passes
    either way, nothing is closed, as behind a dead NAT entry). Its client notices through its
    keepalive, connects again, and the transfer completes with the right bytes."""
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    with HostileProxy(broker.port) as proxy:
        conf = a.config.read_text().replace(broker.url, proxy.url)
        conf = conf.replace("keepalive = 60", "keepalive = 5", 1)  # the least the config takes
        a.config.write_text(conf.replace('client = "builtin"', f'client = "{client}"', 1))
        a.broker_url = proxy.url
        a.start()
        b.start()
        try:
            pair(a, b)
            src = random_file(tmp_path / "model.bin", 60 * CHUNK)
            hold = proxy.add_rule(TO_BROKER, "peerd/v1/+/x/#", Hold(), skip=20)
            started = a.json("send", str(src), "--to", b.peer_id)
            wait_until(lambda: hold.applied > 0, 20, what="a third of the chunks through")
            accepted = proxy.accepted
            assert proxy.freeze_connections() == 1
            proxy.remove_rule(hold)  # what it held was in the stalled connection: lost with it
            wait_until(lambda: proxy.accepted > accepted, 60, what="alice to connect again")
            wait_until(
                lambda: _transfer(a, started["id"])["state"] == "verified", 90, what="verified"
            )
            (got,) = received_files(b, a)
            assert sha256(got) == sha256(src)
        finally:
            a.kill()
            b.kill()
