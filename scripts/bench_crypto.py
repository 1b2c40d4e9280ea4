#!/usr/bin/env python3
"""Measurements behind the transfer's choices (protocol/SPEC.md section 7).

  .venv/bin/python scripts/bench_crypto.py [--quick]

1. Bulk AEADs (libsodium through PyNaCl's cffi module) at several chunk sizes, encrypting into a
   reused buffer and into fresh ones.
2. Whole-file hashes at the chunk size: BLAKE3 (one thread), SHA-256, BLAKE2b.
3. What hashing the file before sending would cost: a read pass of a file in the page cache
   into a reused buffer, plus the hash.
4. The transfer state machines end to end in one process, without I/O: the sender's CPU per
   GiB (next_read + read hand-back + hash + encrypt + frame) and the receiver's (frame checks +
   decrypt + hash + sync/ack bookkeeping), so the daemon knows its CPU budget.
5. What a fresh 256 KiB buffer costs with glibc's default allocator settings and tuned ones.

Each figure is the best of several rounds (the machine is shared; the best is the least
disturbed). Numbers are indicative.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3
import nacl
import nacl.signing
from nacl._sodium import ffi, lib  # type: ignore[import-not-found]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import sodium
from protocol.transfer import (
    ReceiverTransfer,
    SendControl,
    SenderTransfer,
    Sync,
    TransferConfig,
    frame_buffer,
)
from scripts.benchmarks import common

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def best_rate(fn: Callable[[], None], nbytes: int, *, rounds: int, per_round: int) -> float:
    """Best throughput in bytes/s over `rounds` rounds of `per_round` calls of `fn`."""
    fn()
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per_round):
            fn()
        dt = time.perf_counter() - t
        best = max(best, nbytes * per_round / dt)
    return best


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """The benchmarks' markdown table, then a blank line."""
    common.table(headers, rows)
    print()


def gbs(rate: float) -> str:
    return f"{rate / 1e9:.2f}"


# -- 1. AEADs --------------------------------------------------------------------------------


def _aead_into(name: str, size: int) -> Callable[[], None]:
    key = os.urandom(32)
    plaintext = bytearray(os.urandom(size))
    out = bytearray(size + 32)
    ad = b"h" * 32
    clen = ffi.new("unsigned long long *")
    src = ffi.from_buffer(plaintext)
    dst = ffi.from_buffer(out, require_writable=True)
    if name == "AEGIS-256":
        nonce = os.urandom(32)
        return lambda: sodium.aegis256_encrypt_into(out, key, nonce, ad, memoryview(plaintext))
    func, nonce = {
        "AES-256-GCM": (lib.crypto_aead_aes256gcm_encrypt, os.urandom(12)),
        "ChaCha20-Poly1305": (lib.crypto_aead_chacha20poly1305_ietf_encrypt, os.urandom(12)),
    }[name]
    return lambda: func(dst, clen, src, size, ad, len(ad), ffi.NULL, nonce, key)


def _aead_fresh(name: str, size: int) -> Callable[[], None]:
    key = os.urandom(32)
    plaintext = os.urandom(size)
    if name == "AEGIS-256":
        nonce = os.urandom(32)
        return lambda: sodium.aegis256_encrypt(key, nonce, b"", plaintext)
    nonce = os.urandom(12)
    if name == "AES-256-GCM":
        return lambda: sodium.aes256gcm_encrypt(key, nonce, b"", plaintext)
    return lambda: sodium.chacha20poly1305_encrypt(key, nonce, b"", plaintext)


def bench_aeads(quick: bool) -> None:
    print("## 1. Bulk AEAD, GB/s (encrypt; decrypt is within a few percent)\n")
    names = ["AEGIS-256", "AES-256-GCM", "ChaCha20-Poly1305"]
    if not sodium.HAVE_AESGCM:
        names.remove("AES-256-GCM")
    rows = []
    for size in (64 * KIB, 256 * KIB, 512 * KIB):
        n = max(50, (200 if quick else 1500) * 256 * KIB // size)
        for name in names:
            into = best_rate(_aead_into(name, size), size, rounds=5, per_round=n)
            fresh = best_rate(_aead_fresh(name, size), size, rounds=5, per_round=max(20, n // 4))
            rows.append([f"{size // KIB} KiB", name, gbs(into), gbs(fresh)])
    table(["chunk", "AEAD", "into a reused buffer", "fresh bytes each time"], rows)


# -- 2. hashes ---------------------------------------------------------------------------------


def bench_hashes(quick: bool) -> dict[str, float]:
    print("## 2. Whole-file hash fed 256 KiB at a time, GB/s\n")
    data = memoryview(bytearray(os.urandom(256 * KIB)))
    n = 200 if quick else 2000
    hashers: dict[str, Callable[[], object]] = {
        "BLAKE3 (1 thread)": lambda: blake3.blake3(max_threads=1),
        "BLAKE3 (all cores)": lambda: blake3.blake3(max_threads=blake3.blake3.AUTO),
        "SHA-256 (hashlib)": hashlib.sha256,
        "BLAKE2b-512 (hashlib)": hashlib.blake2b,
    }
    rates = {}
    rows = []
    for name, make in hashers.items():
        h = make()
        rate = best_rate(lambda h=h: h.update(data), len(data), rounds=5, per_round=n)  # type: ignore[attr-defined,misc]
        rates[name] = rate
        rows.append([name, gbs(rate), f"{GIB / rate:.3f}"])
    table(["hash", "GB/s", "CPU s per GiB"], rows)
    return rates


# -- 3. hashing before sending ---------------------------------------------------------------


def bench_prehash(quick: bool) -> None:
    print("## 3. Hashing the file before sending: a read pass from the page cache + BLAKE3\n")
    size = (64 if quick else 512) * MIB
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR")) as f:
        block = os.urandom(MIB)
        for _ in range(size // MIB):
            f.write(block)
        f.flush()
        fd = f.fileno()
        buf = bytearray(256 * KIB)
        view = memoryview(buf)

        def read_pass(hasher: Callable[[], object] | None) -> float:
            best = float("inf")
            for _ in range(3):
                h = hasher() if hasher else None
                t = time.perf_counter()
                offset = 0
                while offset < size:
                    got = os.preadv(fd, [buf], offset)
                    if h is not None:
                        h.update(view[:got])  # type: ignore[attr-defined]
                    offset += got
                best = min(best, time.perf_counter() - t)
            return best * GIB / size

        read_only = read_pass(None)
        with_hash = read_pass(lambda: blake3.blake3(max_threads=1))
    table(
        ["pass over the file", "s per GiB"],
        [
            ["read only (page cache, reused 256 KiB buffer)", f"{read_only:.3f}"],
            ["read + BLAKE3", f"{with_hash:.3f}"],
        ],
    )
    print(
        f"At ~600 MB/s a 1 GiB transfer takes ~{GIB / 600e6:.2f} s: a hash pass first would add "
        f"~{with_hash / (GIB / 600e6) * 100:.0f}% before the first chunk. Hashing while sending "
        "costs the hash CPU only.\n"
    )


# -- 4. the state machines -------------------------------------------------------------------


def _run_machines(size: int, n_receivers: int, rounds: int) -> tuple[float, float, int]:
    """Best sender CPU seconds, best CPU seconds of one receiver, frames published."""
    config = TransferConfig()
    key = nacl.signing.SigningKey.generate()
    chunk = memoryview(bytearray(os.urandom(config.chunk_size)))
    frame_out = frame_buffer(config.chunk_size)
    plain_out = bytearray(config.chunk_size)
    peers = [f"r{i}" for i in range(n_receivers)]
    best_send = best_recv = float("inf")
    published = 0
    for _ in range(rounds):
        t_send = t_recv = 0.0
        now = 1000.0
        sender = SenderTransfer(
            name="model.safetensors",
            size=size,
            receivers=peers,
            sender="alice",
            signing_key=key,
            now=now,
            config=config,
        )
        offer = next(a.message for a in sender.take_actions() if isinstance(a, SendControl))
        receivers = {
            p: ReceiverTransfer(
                offer, sender="alice", sender_key=bytes(key.verify_key), now=now, config=config
            )
            for p in peers
        }
        to_sender = [
            (p, a.message)
            for p, rt in receivers.items()
            for a in rt.take_actions()
            if isinstance(a, SendControl)
        ]
        # One chunk per step, handed over without a copy: the frame is a view of frame_out.
        while any(rt.state == "receiving" for rt in receivers.values()):
            t = time.perf_counter()
            for p, m in to_sender:
                sender.receive(p, m, now)
            frame = None
            read = sender.next_read(now)
            if read is not None:
                frame = sender.on_chunk_read(read, chunk[: read.length], frame_out)
            to_receiver = [a for a in sender.take_actions() if isinstance(a, SendControl)]
            t_send += time.perf_counter() - t
            t = time.perf_counter()
            to_sender = []
            for a in to_receiver:
                receivers[a.peer].receive(a.message, now)
            for p, rt in receivers.items():
                if frame is not None:
                    rt.on_frame(frame, plain_out, now)
                for action in rt.take_actions():
                    if isinstance(action, Sync):
                        rt.on_synced(action, now)
                        to_sender.extend(
                            (p, a.message) for a in rt.take_actions() if isinstance(a, SendControl)
                        )
                    elif isinstance(action, SendControl):
                        to_sender.append((p, action.message))
            t_recv += time.perf_counter() - t
            now += 0.0001
            if frame is None and not to_sender and not to_receiver:
                raise AssertionError("the in-memory transfer stalled")
        best_send = min(best_send, t_send)
        best_recv = min(best_recv, t_recv / n_receivers)
        published = sender.published_frames
    return best_send, best_recv, published


def bench_machines(quick: bool) -> None:
    print("## 4. Transfer state machines, in memory, 256 KiB chunks\n")
    rows = []
    for n in (1, 8):
        size = (128 if quick or n > 1 else 1024) * MIB
        send, recv, published = _run_machines(size, n, 2 if quick else 3)
        chunks = size // (256 * KIB)
        scale = GIB / size
        rows.append(
            [
                n,
                f"{send * scale:.3f}",
                f"{send / chunks * 1e6:.1f}",
                f"{recv * scale:.3f}",
                f"{recv / chunks * 1e6:.1f}",
                f"{published / chunks:.2f}",
            ]
        )
    table(
        [
            "receivers",
            "sender CPU s/GiB",
            "sender us/chunk",
            "each receiver CPU s/GiB",
            "receiver us/chunk",
            "frames published / chunks",
        ],
        rows,
    )
    print(
        "Sender: next_read + hash + encrypt + frame + acknowledgement bookkeeping. Receiver: "
        "header checks + decrypt + hash + sync/ack bookkeeping. Excluded on both sides: file "
        "reads and writes, fsync, MQTT and Noise, and any copy of the frame (see 5).\n"
    )


# -- 5. the allocator -------------------------------------------------------------------------

_COPY_PROBE = """
import time
frame = memoryview(bytearray(262144 + 64))
held = []
best = 1e9
for _ in range(3):
    t = time.perf_counter()
    for _ in range(2000):
        held.append(bytes(frame))
        if len(held) >= 16:
            held.clear()
    best = min(best, (time.perf_counter() - t) / 2000)
print(best)
"""


def bench_allocator(quick: bool) -> None:
    print("## 5. Fresh 256 KiB buffers: copies of a frame held in a queue of 16\n")
    tuned = {"MALLOC_MMAP_THRESHOLD_": str(4 * MIB), "MALLOC_TRIM_THRESHOLD_": str(256 * MIB)}
    rows = []
    for label, extra in (("glibc defaults", {}), ("mmap threshold 4 MiB, trim 256 MiB", tuned)):
        env = {**os.environ, **extra}
        out = subprocess.run(
            [sys.executable, "-c", _COPY_PROBE],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        per_copy = float(out)
        rows.append([label, f"{per_copy * 1e6:.0f}", f"{per_copy * GIB / (256 * KIB):.2f}"])
    table(["allocator", "us per copy", "s per GiB"], rows)
    print(
        "With glibc's defaults a 256 KiB buffer is returned to the kernel when freed and "
        "page-faults back in when the next one is allocated: each copy that a client library "
        "makes of a frame (paho builds every PUBLISH in a new bytearray; each received payload "
        "is new bytes) then costs more than the AEAD. The daemon can set the same two values "
        "with mallopt() at start-up.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    args = parser.parse_args()
    print(f"# peerd transfer crypto benchmarks, {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"# {platform.node()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"PyNaCl {nacl.__version__}, "
        f"blake3 {blake3.__version__}\n"
    )
    bench_aeads(args.quick)
    bench_hashes(args.quick)
    bench_prehash(args.quick)
    bench_machines(args.quick)
    bench_allocator(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
