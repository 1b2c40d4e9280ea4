"""A full in-memory Noise_XX_25519_ChaChaPoly_BLAKE2b handshake, both sides, ours against the
`noiseprotocol` package, interleaved in one run so that machine drift hits both alike.
Goal (issue 2): ours takes at most 0.6x the time of noiseprotocol."""

from __future__ import annotations

import time

from noise.connection import Keypair as NPKeypair
from noise.connection import NoiseConnection

from protocol.noise import HandshakeState, KeyPair
from scripts.benchmarks.common import median, percentile, table, verdict

NAME = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
GOAL = 0.6


def ours(i_static: KeyPair, r_static: KeyPair) -> None:
    i = HandshakeState(NAME, True, b"bench", s=i_static)
    r = HandshakeState(NAME, False, b"bench", s=r_static)
    r.read_message(i.write_message())
    i.read_message(r.write_message())
    r.read_message(i.write_message())
    i.split()
    r.split()


def theirs(i_static: bytes, r_static: bytes) -> None:
    i = NoiseConnection.from_name(NAME.encode())
    r = NoiseConnection.from_name(NAME.encode())
    i.set_as_initiator()
    r.set_as_responder()
    i.set_keypair_from_private_bytes(NPKeypair.STATIC, i_static)
    r.set_keypair_from_private_bytes(NPKeypair.STATIC, r_static)
    i.set_prologue(b"bench")
    r.set_prologue(b"bench")
    i.start_handshake()
    r.start_handshake()
    r.read_message(i.write_message())
    i.read_message(r.write_message())
    r.read_message(i.write_message())
    assert i.handshake_finished
    assert r.handshake_finished


def run(quick: bool = False) -> bool:
    iterations = 50 if quick else 500
    a, b = KeyPair.generate(), KeyPair.generate()
    ours_t: list[float] = []
    theirs_t: list[float] = []
    clock = time.perf_counter
    for _ in range(50):  # warm-up: caches, lazy imports, CPU frequency
        ours(a, b)
        theirs(a.private, b.private)
    for _ in range(iterations):
        t0 = clock()
        ours(a, b)
        t1 = clock()
        theirs(a.private, b.private)
        t2 = clock()
        ours_t.append(t1 - t0)
        theirs_t.append(t2 - t1)
    ratio = median(ours_t) / median(theirs_t)
    ms = 1e3
    table(
        ["engine", "median ms", "p99 ms"],
        [
            [
                "peerd protocol/noise",
                f"{median(ours_t) * ms:.3f}",
                f"{percentile(ours_t, 99) * ms:.3f}",
            ],
            [
                "noiseprotocol 0.3",
                f"{median(theirs_t) * ms:.3f}",
                f"{percentile(theirs_t, 99) * ms:.3f}",
            ],
        ],
    )
    ok = ratio <= GOAL
    print(f"\nratio ours/noiseprotocol = {ratio:.2f} (goal <= {GOAL}): {verdict(ok)}")
    return ok
