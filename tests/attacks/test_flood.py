"""A flood from a rogue MQTT client while a legitimate transfer runs: bogus HELLOs claiming a
trusted peer and unknown peers, DATA frames for no session, garbage, frames over the inbox
limit and packets over the MQTT limit, all into the receiver's inbox (and some into the
sender's). The daemons stay responsive (control calls answer throughout), their memory stays
bounded, the transfer completes byte-exact, and every kind of junk is counted under its reason
- in `peerd status --json` and in the human `peerd status`.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

from peerd.mqtt import Topics
from protocol.noise import MLKEM768
from tests.attacks.conftest import start_cluster
from tests.attacks.helpers import (
    SOON,
    Api,
    Wire,
    counted,
    rss,
)
from tests.support.broker import Broker
from tests.support.cluster import wait_until
from tests.support.files import random_file, received_files, sha256
from tests.support.hostile import HostileProxy

MIB = 1 << 20
# What the flood may add to a daemon's resident memory. The flood lasts for the whole transfer
# and for at least FLOOD_BYTES: a daemon that kept or queued a fraction of it would exceed this.
RSS_BOUND = 48 * MIB
FLOOD_BYTES = 4 * RSS_BOUND


class Junk:
    """Rogue traffic into `victim`'s inbox (and some into `trusted`'s) until `stop` is set."""

    def __init__(self, topics: Topics, victim: str, trusted: str, seed: int) -> None:
        self.topics, self.victim, self.trusted = topics, victim, trusted
        self.rng = random.Random(seed)
        self.sent = 0
        self.bytes = 0
        self.stop = threading.Event()
        self.kem_key = MLKEM768.generate().public

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while self.sent < 1_000_000 and not (self.stop.is_set() and self.bytes >= FLOOD_BYTES):
            topic, payload = self._next(self.sent)
            yield topic, payload
            self.sent += 1
            self.bytes += len(payload)

    def _hello(self, claim: str) -> bytes:
        # A hybrid HELLO's shape (an X25519 key, then a valid ML-KEM-768 key), so the ones
        # within the rate limit cost the victim a real answer, not a cheap classic refusal.
        rt = claim.encode()
        head = b"\x01\x01" + self.rng.randbytes(4) + bytes([len(rt)]) + rt
        return head + self.rng.randbytes(32) + self.kem_key

    def _next(self, i: int) -> tuple[str, bytes]:
        rng, inbox, trusted = self.rng, self.topics.inbox(self.victim), self.trusted
        kind = i % 6
        if kind == 0:
            return inbox, self._hello(trusted)  # a trusted peer's claim: rate-limited, evicted
        if kind == 1:
            return inbox, self._hello("".join(rng.choices("abcdefghjk0123456789", k=20)))
        if kind == 2:
            return inbox, b"\x01\x05" + rng.randbytes(12 + 16 + rng.randrange(64))
        if kind == 3:
            return inbox, rng.randbytes(rng.randrange(1, 80))
        if kind == 4 and i % 60 == 4:
            return inbox, b"\x01\x05" + bytes(100 * 1024)  # over the inbox frame limit
        if kind == 5 and i % 600 == 5:
            return inbox, bytes(MIB + 512 * 1024)  # over the MQTT packet limit
        return self.topics.inbox(trusted), rng.randbytes(rng.randrange(1, 80))


def test_flood_while_a_transfer_runs(
    tmp_path: Path, module_broker: Broker, proxy: HostileProxy
) -> None:
    alice, bob = start_cluster(tmp_path, module_broker, proxy, ["alice", "bob"])
    a, b = Api(alice), Api(bob)
    wire = Wire(module_broker.url)
    try:
        warm = random_file(tmp_path / "warm.bin", 4 * MIB, seed=1)
        assert a.call("v1.send", path=str(warm), to=[bob.peer_id])["state"] == "active"
        wait_until(lambda: received_files(bob, alice), SOON, what="the warm-up file")
        base = {n.name: rss(n) for n in (alice, bob)}
        before_a, before_b = a.rejections(), b.rejections()

        src = random_file(tmp_path / "model.bin", 24 * MIB, seed=2)
        peak = dict(base)
        answered = 0
        done = threading.Event()

        def poll() -> None:  # the daemons must keep answering while the flood lasts
            nonlocal answered
            while not done.is_set():
                for api, node in ((a, alice), (b, bob)):
                    api.status()
                    answered += 1
                    peak[node.name] = max(peak[node.name], rss(node))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        junk = Junk(Topics(alice.network), bob.peer_id, alice.peer_id, seed=3)
        flood = threading.Thread(target=wire.flood, args=(junk,), daemon=True)
        flood.start()
        # The whole transfer runs inside the flood: it starts once the flood is under way
        # and the flood stops only once the transfer has ended (and FLOOD_BYTES went out).
        wait_until(lambda: junk.sent > 2000, SOON, what="the flood under way")
        started = a.call("v1.send", path=str(src), to=[bob.peer_id])
        result = a.call("v1.transfer.wait", id=started["id"], timeout=120.0)
        junk.stop.set()
        flood.join(SOON * 4)
        done.set()
        poller.join(SOON)
        assert not poller.is_alive()
        assert not flood.is_alive()

        assert junk.bytes >= FLOOD_BYTES
        assert answered > 0
        assert result["state"] == "verified"
        got = [p for p in received_files(bob, alice) if p.name == "model.bin"]
        assert len(got) == 1
        assert sha256(got[0]) == sha256(src)
        for name, value in peak.items():
            assert value - base[name] < RSS_BOUND, (
                f"{name} grew by {(value - base[name]) >> 20} MiB"
            )

        new_b = counted(before_b, b.rejections())
        for label in (
            "rate-limited",  # HELLOs claiming alice beyond her bucket
            "unknown-peer",  # HELLOs claiming peers bob never met
            "unknown-session",  # DATA for no session
            "malformed",  # garbage
            "oversize",  # frames over the inbox limit
            "broker-oversize",  # packets over the MQTT limit, dropped unread by the link
        ):
            assert new_b.get(label, 0) > 0, (label, new_b)
        # REPLYs bob sent for the HELLOs that claimed alice land at alice, who has no such
        # handshake; the garbage published into her inbox is counted too.
        new_a = counted(before_a, a.rejections())
        assert new_a.get("malformed", 0) + new_a.get("version", 0) > 0, new_a

        # The human status prints the same reasons.
        text = bob.cli("status")
        line = next(x for x in text.splitlines() if x.startswith("rejected"))
        for label in ("rate-limited", "unknown-peer", "oversize", "broker-oversize"):
            assert f"{label} " in line, line
    finally:
        wire.close()
        a.close()
        b.close()
        alice.kill()
        bob.kill()
        os.sync()
