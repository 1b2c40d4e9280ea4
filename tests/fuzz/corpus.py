"""A seed corpus of valid inputs for every parser that reads outside input, and the mutations
the fuzz tests apply to them.

Each seed is produced by the real encoder (a real handshake between two session managers over
real credentials, real transfer messages, real signed objects), so a mutated seed is "almost
valid": it gets past the first checks and into the deep ones, where random bytes never go.
Everything is deterministic (fixed keys and times) except the Noise ephemerals, which do not
matter to the parsers.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from peerd.sessions import SessionTrust
from protocol.identity import (
    Credentials,
    InviteToken,
    TrustView,
    format_authority_key,
    issue_authority_revocation,
    issue_membership,
    issue_revocation,
    issue_succession,
    peer_id_for,
)
from protocol.identity._codec import ed25519_public
from protocol.messaging import ChannelAck, ChannelMessage, RevocationPush
from protocol.session import Output, SendFrame, SessionManager
from protocol.transfer import (
    Abort,
    Accept,
    Ack,
    ChunkCipher,
    Manifest,
    Offer,
    Refuse,
    Request,
    Seal,
    Verified,
    file_hash,
    frame_buffer,
)
from tests.protocol.test_identity_helpers import DAY, NOW, Node

__all__ = ["NOW", "Node", "attempt", "inputs", "seeds", "texts"]

NETWORK = "lab"
AUTHORITY_SEED = bytes(range(100, 132))
TID = bytes(range(16))
CONTENT_KEY = bytes(range(200, 232))


def fuzz_settings(*, deadline: float | None, share: int = 1) -> settings:
    """Hypothesis settings of the fuzz tests: `PEERD_FUZZ_EXAMPLES` (300 by default) examples
    per test, divided by `share` for the slow ones; no example database, no health checks on
    slow or large data."""
    return settings(
        max_examples=int(os.environ.get("PEERD_FUZZ_EXAMPLES", "300")) // share,
        deadline=deadline,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


E = TypeVar("E", bound=BaseException)
R = TypeVar("R")


def attempt(fn: Callable[..., R], *args: Any, errors: type[E]) -> tuple[R | None, E | None]:
    """`fn(*args)`, and the error of type `errors` it raised (anything else propagates)."""
    try:
        return fn(*args), None
    except errors as exc:
        return None, exc


def trusting_view(owner: Node, *peers: Node) -> TrustView:
    """A view of `owner` that trusts `peers` (paired as an invite would)."""
    view = TrustView(self_peer_id=owner.peer_id, network=NETWORK, overlap=3600.0)
    for peer in peers:
        auth = view.authenticate(peer.credentials(), peer.static.public, NOW, allow_unknown=True)
        planned = view.plan_authenticated(auth, NOW)
        assert planned is not None
        view.put_peer(planned)
    return view


def manager(node: Node, view: TrustView) -> SessionManager:
    return SessionManager(
        peer_id=node.peer_id,
        network=NETWORK,
        static=node.static,
        credentials=node.credentials(),
        trust=SessionTrust(view),  # the daemon's own trust policy over the view
    )


def route(outputs: list[Output], to: SessionManager, wire: list[bytes]) -> list[Output]:
    """Deliver the frames of `outputs` addressed to `to`, recording them; the answers."""
    answers: list[Output] = []
    for out in outputs:
        if isinstance(out, SendFrame) and out.peer_id == to.peer_id:
            wire.append(out.frame)
            answers.extend(to.receive(out.frame, NOW))
    return answers


@dataclass
class World:
    """Two nodes that trust each other, with the frames of a real handshake and session."""

    alice: Node
    bob: Node
    a: SessionManager
    b: SessionManager
    frames: list[bytes] = field(default_factory=list)

    def handshake(self) -> None:
        out = self.a.connect(self.bob.peer_id, NOW)
        while out:
            replies = route(out, self.b, self.frames)
            out = route(replies, self.a, self.frames)

    def exchange(self, payloads: list[bytes]) -> None:
        for p in payloads:
            route(self.a.send(self.bob.peer_id, p, NOW), self.b, self.frames)
            route(self.b.send(self.alice.peer_id, p, NOW), self.a, self.frames)


def make_world() -> World:
    alice, bob = Node(bytes(range(32))), Node(bytes(range(1, 33)))
    world = World(
        alice,
        bob,
        manager(alice, trusting_view(alice, bob)),
        manager(bob, trusting_view(bob, alice)),
    )
    world.handshake()
    assert world.a.has_session(bob.peer_id)
    assert world.b.has_session(alice.peer_id)
    return world


# -- the seeds ----------------------------------------------------------------------------------


def _app_payloads() -> list[bytes]:
    stmt = issue_revocation(bytes(range(32)), peer_id=_pid(0), kind="static", serial=1, now=NOW)
    return [
        ChannelMessage("train/round", 7, b"weights please").encode(),
        ChannelMessage("x", 1, b"").encode(),
        ChannelAck("train/round", 7).encode(),
        RevocationPush(stmt.encode()).encode(),
        *_control_messages(),
    ]


def _pid(n: int) -> str:
    return peer_id_for(ed25519_public(bytes(range(n, n + 32))))


def _manifest() -> tuple[bytes, bytes]:
    node = Node(bytes(range(32)))
    data = b"model weights " * 100
    m = Manifest(TID, node.peer_id, "model.safetensors", len(data), 1024, 2, 1_750_000_000,
                 file_hash(data))  # fmt: skip
    signed = m.sign(_signing_key(node))
    return signed.body, signed.signature


def _signing_key(node: Node) -> Any:
    import nacl.signing  # noqa: PLC0415

    return nacl.signing.SigningKey(node.seed)


def _control_messages() -> list[bytes]:
    body, sig = _manifest()
    return [
        m.encode()
        for m in (
            Offer(TID, "model.safetensors", 1400, 1024, 2, 1_750_000_000, CONTENT_KEY),
            Accept(TID, 1, 0, 64, b""),
            Ack(TID, 2, 3, 67, b"\x05"),
            Request(TID, 1, ((0, 2), (5, 1))),
            Seal(TID, body, sig),
            Verified(TID, bytes(32)),
            Refuse(TID, "too-large", "1400 bytes is more than the limit"),
            Abort(TID, "hash-mismatch", ""),
        )
    ]


def _chunk_frames() -> list[bytes]:
    cipher = ChunkCipher(CONTENT_KEY, TID)
    out = []
    for index, last, size in ((0, False, 1024), (1, True, 376), (0, True, 0)):
        buf = frame_buffer(1024)
        n = cipher.seal_into(buf, index, last, bytes(size), bytes(8))
        out.append(bytes(buf[:n]))
    return out


def _signed_objects() -> dict[str, list[bytes]]:
    node = Node(bytes(range(32)))
    first_seed = node.seed
    link = node.succeed()
    member = node.join_authority(AUTHORITY_SEED, NETWORK)
    revocations: list[Any] = [
        issue_revocation(node.seed, peer_id=node.peer_id, kind="static", serial=3, now=NOW,
                         reason="key lost"),
        issue_revocation(first_seed, peer_id=node.peer_id, kind="identity", now=NOW),
        issue_authority_revocation(AUTHORITY_SEED, network=NETWORK, peer_id=node.peer_id,
                                   now=NOW, reason="left the consortium"),
    ]  # fmt: skip
    second = issue_succession(
        node.seed, bytes(range(64, 96)), peer_id=node.peer_id, index=2, now=NOW
    )
    membership = issue_membership(
        AUTHORITY_SEED,
        network=NETWORK,
        peer_id=node.peer_id,
        identity_public=node.identity_public,
        now=NOW,
        lifetime=365 * DAY,
    )
    return {
        "certificate": [node.cert.encode(), Node(bytes(range(2, 34))).cert.encode()],
        "succession": [link.encode(), second.encode()],
        "membership": [member.encode(), membership.encode()],
        "statement": [r.encode() for r in revocations],
        "credentials": [
            node.credentials(),
            node.credentials(with_membership=False),
            Node(bytes(range(3, 35))).credentials(),
            Credentials((), Node(bytes(range(4, 36))).cert, None).encode(),
        ],
    }


def _invite_texts() -> list[str]:
    node = Node(bytes(range(32)))
    token = InviteToken(
        network=NETWORK,
        inviter=node.peer_id,
        inviter_identity=node.identity_public,
        invite_id=bytes(16),
        psk=bytes(range(64, 96)),
        expires_at=1_750_086_400,
    )
    text = token.to_text()
    return [text, text.upper(), " ".join(text[i : i + 20] for i in range(0, len(text), 20))]


def _authority_texts() -> list[bytes]:
    """The text forms people carry between an authority and its members."""
    from peerd.authority import (  # noqa: PLC0415 - the shell's module, only for its seeds
        MembershipRequest,
        membership_to_text,
        statement_to_text,
    )

    node = Node(bytes(range(32)))
    member = node.join_authority(AUTHORITY_SEED, NETWORK)
    expel = issue_authority_revocation(
        AUTHORITY_SEED, network=NETWORK, peer_id=node.peer_id, now=NOW, reason="left"
    )
    return [
        MembershipRequest(NETWORK, node.peer_id, node.identity_public).to_text().encode(),
        membership_to_text(member).encode(),
        statement_to_text(expel.encode()).encode(),
    ]


def _safetensors() -> list[bytes]:
    def blob(header: dict[str, Any], data_len: int) -> bytes:
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + bytes(data_len)

    return [
        blob({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, 24),
        blob(
            {
                "__metadata__": {"format": "pt"},
                "a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
                "b": {"dtype": "F4", "shape": [2, 2], "data_offsets": [8, 10]},
            },
            10,
        ),
        blob({}, 0),
    ]


def _control_lines() -> list[bytes]:
    return [
        b'{"jsonrpc":"2.0","id":1,"method":"v1.status","params":{}}',
        b'{"jsonrpc":"2.0","id":"x","method":"v1.hello"}',
        b'[{"jsonrpc":"2.0","id":1,"method":"v1.status"},{"jsonrpc":"2.0","method":"v1.hello"}]',
        b'{"jsonrpc":"2.0","id":2,"method":"v1.subscribe","params":{"events":["session.*"]}}',
        b'{"jsonrpc":"2.0","id":3,"method":"v1.unsubscribe","params":{"subscription":1}}',
        b'{"jsonrpc":"2.0","id":4,"method":"v1.nope","params":[1,2]}',
    ]


def _configs() -> list[bytes]:
    return [
        b'[node]\nname = "lab-1"\nnetwork = "lab"\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n'
        b"keepalive = 30\n[keys]\ncertificate_days = 30\noverlap_hours = 24\n"
        b'[receive]\nmax_file_size = "10GiB"\nfree_space_margin = "1GiB"\n',
        b'[node]\nnetwork = "a-b"\n[control]\ngroup = "peerd"\n[network]\n'
        b'authority_key = "'
        + format_authority_key(ed25519_public(AUTHORITY_SEED)).encode()
        + b'"\n',
        b"",
    ]


@cache
def seeds() -> dict[str, list[bytes]]:
    """Valid inputs, by parser."""
    world = make_world()
    world.exchange([b"\x10hello", b"", bytes(300)])
    signed = _signed_objects()
    body, sig = _manifest()
    return {
        "frame": world.frames,
        "app": _app_payloads(),
        "control": _control_messages(),
        "chunk": _chunk_frames(),
        "manifest": [body],
        "signature": [sig],
        **signed,
        "invite": [t.encode() for t in _invite_texts()],
        "authority_text": _authority_texts(),
        "authority_key": [format_authority_key(ed25519_public(AUTHORITY_SEED)).encode()],
        "peer_id": [_pid(0).encode(), b"x8gbj-hzgqj-rdsnf-tppjh", b"X8GBJ HZGQJ RDSNF TPPJH"],
        "fingerprint": [b"7c16z-v2gq3-ce4n2-eb8pw-vb0j9-kwwdx"],
        "safetensors": _safetensors(),
        "control_line": _control_lines(),
        "config": _configs(),
    }


# -- mutations ----------------------------------------------------------------------------------


def _mutate(data: bytes, draw: st.DrawFn, splice_with: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "dup", "splice", "trunc"]))
        n = len(buf)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            i = draw(st.integers(0, n - 1))
            # Interesting bytes: msgpack type markers, lengths at their limits, 0, 0xff.
            buf[i] = draw(
                st.sampled_from(
                    [
                        0x00,
                        0x01,
                        0x7F,
                        0x80,
                        0x90,
                        0x9F,
                        0xA0,
                        0xC0,
                        0xC2,
                        0xC3,
                        0xC4,
                        0xC5,
                        0xC6,
                        0xCC,
                        0xCD,
                        0xCE,
                        0xCF,
                        0xD9,
                        0xDC,
                        0xDD,
                        0xFF,
                    ]
                )
                | st.integers(0, 255)
            )
        elif op == "cut" and n:
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(i, min(n, i + 64)))
            del buf[i:j]
        elif op == "insert":
            i = draw(st.integers(0, n))
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup" and n:
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(i, min(n, i + 64)))
            k = draw(st.integers(0, n))
            buf[k:k] = buf[i:j]
        elif op == "splice" and splice_with:
            i = draw(st.integers(0, n))
            j = draw(st.integers(0, len(splice_with)))
            buf = buf[:i] + bytearray(splice_with[j:])
        elif op == "trunc":
            buf = buf[: draw(st.integers(0, n))]
    return bytes(buf)


def inputs(*kinds: str, max_random: int = 512) -> st.SearchStrategy[bytes]:
    """Seeds of `kinds` as they are, mutated, spliced with each other, or random bytes."""
    pool = [s for k in kinds for s in seeds()[k]]

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        seed = draw(st.sampled_from(pool))
        other = draw(st.sampled_from(pool))
        return _mutate(seed, draw, other)

    return st.one_of(
        st.sampled_from(pool),
        mutated(),
        mutated(),
        mutated(),
        st.binary(max_size=max_random),
    )


def texts(*kinds: str) -> st.SearchStrategy[str]:
    """Like `inputs`, as text (invalid UTF-8 replaced), plus random unicode."""
    return st.one_of(
        inputs(*kinds).map(lambda b: b.decode("utf-8", "replace")),
        st.text(max_size=200),
    )
