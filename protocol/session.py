"""Authenticated sessions between peers, sans-IO (SPEC.md sections 3-5).

`SessionManager` holds every session and handshake of one node. The shell feeds it frames from
the node's inbox (`receive`), asks it to open sessions (`connect`, `join`) and to send
(`send`), and calls `on_timer` at `next_deadline()`. Every call returns a list of outputs:
frames to publish to a peer's inbox and events. Trust decisions are delegated to a
`TrustPolicy` the shell provides (the trust store's in-memory view): the manager calls it
synchronously in the middle of a handshake, so the initiator can abort before its third message
when the responder is not who it meant.

Sessions are `Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2b`: XX with an ephemeral ML-KEM-768
exchange mixed in beside X25519 (hybrid forward secrecy against a recording quantum adversary;
`XXhfs+psk0` with a network PSK; `XXhfs+psk3` with an invite's PSK when pairing). There is no
classic mode: a HELLO too short to carry a KEM key is refused (`classic-handshake`). With a peer
met before, a node opens the next session in one round trip instead: every session leaves both
sides a single-use resumption ticket, and the next handshake is
`Noise_KKhfs+psk0_25519+MLKEM768_ChaChaPoly_BLAKE2b` with it (protocol/resumption.py,
SPEC.md 4.7); without a ticket, or when the peer no longer has it, XX as before. Transport
frames carry an explicit 64-bit counter checked against a
sliding replay window, because MQTT may duplicate and reorder across reconnects. A session is
replaced by a fresh handshake (rekey) after a time or message budget; superseded sessions keep
receiving for a grace period so frames in flight are not lost, then their keys are dropped.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import nacl.utils

from protocol import frames
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.noise import (
    MLKEM768,
    CipherState,
    HandshakeState,
    KeyPair,
    message_overheads,
    parse_protocol_name,
)
from protocol.resumption import (
    NOISE_RESUME,
    Ticket,
    TicketBook,
    derive_tickets,
    early_key,
    resume_psk,
)

PROTOCOL_VERSION = 1
# Every handshake is hybrid (SPEC.md 4.1): the names bind the KEM into the transcript (they
# initialise the handshake hash and are part of the prologue), so no classic variant can pass
# for one of these.
NOISE_XX = "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2b"
NOISE_XXPSK3 = "Noise_XXhfs+psk3_25519+MLKEM768_ChaChaPoly_BLAKE2b"
# With a network PSK the PSK goes first: a HELLO made without it fails to decrypt (its KEM key
# is already encrypted) before the responder does any DH or KEM work, so the PSK doubles as a
# cheap filter against strangers' floods.
NOISE_XXPSK0 = "Noise_XXhfs+psk0_25519+MLKEM768_ChaChaPoly_BLAKE2b"
MAX_NETWORK_LEN = 64
# A transport plaintext is one kind byte and a body; a Noise message is at most 65535 bytes.
MAX_PAYLOAD = 65535 - 16 - 1
MAX_HELLO_PAYLOAD = 256
MAX_RESUME_PAYLOAD = 4096  # message 1 of a resumption carries the initiator's credentials

# Kinds of transport plaintext (the first byte).
KIND_CLOSE = 0x00
KIND_PING = 0x01
KIND_PONG = 0x02
KIND_CONFIRM = 0x03  # the responder's first message: the initiator's key confirmation
KIND_APP = 0x10


def prologue(network: str, protocol_name: str) -> bytes:
    """SPEC.md 1.1: binds protocol version, network and suite into every handshake."""
    net = network.encode("utf-8")
    name = protocol_name.encode("ascii")
    if not 0 < len(net) <= MAX_NETWORK_LEN:
        raise LocalProtocolError(f"a network name has 1..{MAX_NETWORK_LEN} UTF-8 bytes")
    return b"peerd\x00" + bytes([PROTOCOL_VERSION, len(net)]) + net + bytes([len(name)]) + name


def combine_psk(network_psk: bytes | None, invite_psk: bytes) -> bytes:
    """The PSK of an invite handshake: the invite's own, keyed by the network PSK if any."""
    if network_psk is None:
        return invite_psk
    return hashlib.blake2b(
        b"peerd/v1/invite-psk\x00" + invite_psk, key=network_psk, digest_size=32
    ).digest()


# -- the trust policy the shell provides ---------------------------------------------------------


class Authenticated(Protocol):
    """What a successful authentication yields; the trust module's result type satisfies it."""

    @property
    def peer_id(self) -> str: ...


class TrustPolicy(Protocol):
    def authenticate(
        self,
        credentials: bytes,
        remote_static: bytes,
        now: float,
        *,
        expected_peer: str | None = None,
        allow_unknown: bool = False,
    ) -> Authenticated:
        """Check the peer's credentials; raise RemoteProtocolError (with a reason) to refuse."""
        ...

    def refuse_hello(self, peer_id: str) -> str | None:
        """Cheap pre-check before any cryptography: the reason a handshake claiming to come
        from `peer_id` could never be accepted (e.g. "unknown-peer", "blocked"), else None."""
        ...

    def invite_psk(self, invite_id: bytes, now: float) -> bytes | None:
        """The PSK of an open, unexpired, unused invite, else None."""
        ...

    def closed_invite(self, invite_id: bytes) -> str | None:
        """ "used" or "expired" for an invite this node issued and closed, else None."""
        ...


# -- limits ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Every timer and bound of the session layer (SPEC.md 5 gives the reasons)."""

    handshake_timeout: float = 1.0  # first retry; doubles each attempt
    handshake_attempts: int = 5
    max_half_open: int = 1024  # responder handshakes awaiting message 3, all peers
    max_half_open_per_peer: int = 4
    hello_rate: float = 2000.0  # HELLOs processed per second, all peers (token bucket)
    hello_burst: float = 4000.0
    hello_rate_per_peer: float = 20.0
    hello_burst_per_peer: float = 40.0
    max_tracked_peers: int = 4096  # per-peer buckets kept (LRU)
    rekey_after_time: float = 600.0
    rekey_after_messages: int = 2**32
    reject_after_time: float = 900.0
    reject_after_messages: int = 2**60
    half_open_timeout: float = 10.0  # a responder forgets a handshake without message 3
    stale_after: float = 5.0  # sent, nothing heard: PING; twice as long: new handshake
    previous_grace: float = 60.0  # superseded sessions keep receiving this long
    max_sessions_per_peer: int = 3
    replay_window: int = 8192
    ticket_lifetime: float = 86400.0  # a resumption ticket unused this long is dropped
    # Early data an initiator keeps until the resumption answers (sent again on the session
    # that replaces it if it does not): bounded in messages and bytes.
    max_early_messages: int = 32
    max_early_bytes: int = 256 * 1024


# -- outputs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Publish `frame` to `peer_id`'s inbox."""

    peer_id: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class SessionUp:
    peer_id: str
    auth: Authenticated
    initiator: bool
    started_at: float  # initiator: first HELLO of the attempt; responder: HELLO received
    completed_at: float
    session_id: tuple[int, int]  # (initiator's index, responder's index): same on both sides
    invite_id: bytes | None  # set when the session paired two nodes by invite
    rekey: bool  # another session with this peer was already up
    protocol: str  # the Noise protocol name of its handshake


@dataclass(frozen=True, slots=True)
class SessionDown:
    peer_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Message:
    peer_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """Something received was refused; counted in `SessionManager.rejections`."""

    reason: str
    peer_id: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """A handshake this node started gave up (after retries) or was refused."""

    peer_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class TicketIssued:
    """A session left a resumption ticket: the shell stores it (a secret: erased for real)."""

    ticket: Ticket


@dataclass(frozen=True, slots=True)
class TicketSpent:
    """A ticket was used, refused or replaced: the shell erases its stored copy."""

    ticket: Ticket


Output = (
    SendFrame
    | SessionUp
    | SessionDown
    | Message
    | Rejected
    | HandshakeFailed
    | TicketIssued
    | TicketSpent
)


# -- replay window -------------------------------------------------------------------------------


class ReplayWindow:
    """RFC 6479-style sliding window over explicit 64-bit counters.

    `check` before decrypting, `update` only after the frame authenticated: an attacker cannot
    move the window with forged counters.
    """

    __slots__ = ("_bits", "_mask", "_size", "top")

    def __init__(self, size: int) -> None:
        self._size = size
        self._mask = (1 << size) - 1
        self._bits = 0
        self.top = -1

    def check(self, counter: int) -> None:
        if counter > self.top:
            return
        behind = self.top - counter
        if behind >= self._size:
            raise RemoteProtocolError("counter below the replay window", reason="too-old")
        if self._bits >> behind & 1:
            raise RemoteProtocolError("counter already received", reason="replay")

    def update(self, counter: int) -> None:
        if counter > self.top:
            shift = counter - self.top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self._size else 1
            self.top = counter
        else:
            self._bits |= 1 << (self.top - counter)


class TokenBucket:
    """`burst` at once, then `rate` per second (the shell's rate limits use it too)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


# -- sessions and handshakes -------------------------------------------------------------------


@dataclass(slots=True)
class _Handshake:
    local_index: int
    peer_id: str  # initiator: the peer meant; responder: the peer the HELLO claims to be
    initiator: bool
    state: HandshakeState
    started_at: float
    deadline: float
    attempt: int = 1
    invite_id: bytes | None = None
    psk: bytes | None = None
    remote_index: int = 0  # responder: the initiator's index, to address REPLY and DATA
    # Initiator: the session after message 3, unusable until the responder's first transport
    # message confirms that it accepted message 3 (it may have refused us, silently).
    session: Session | None = None
    # Initiator of a resumption: the key of its EARLY frames until the REPLY arrives.
    early: CipherState | None = None
    early_counter: int = 0
    # Application payloads sent as early data: sent again on the session that replaces a
    # resumption that got no answer (the peer may never have read them).
    queued: list[bytes] = field(default_factory=list)
    # Initiator: an attempt that timed out and was followed by another, still answerable until
    # that next attempt's deadline: a late REPLY (a slow path, a busy broker connection) then
    # completes the handshake instead of meeting a dropped state, and a join is not refused
    # as "invite used" by an inviter that completed the earlier attempt.
    lingering: bool = False
    refused: str | None = None  # an inviter's refusal, held while an earlier attempt may answer


@dataclass(slots=True)
class _EarlyRx:
    """Responder: how to read the EARLY frames that follow an accepted resumption."""

    peer_id: str
    cipher: CipherState
    window: ReplayWindow
    deadline: float


@dataclass(slots=True)
class Session:
    local_index: int
    remote_index: int
    peer_id: str
    auth: Authenticated
    initiator: bool
    sender: CipherState
    receiver: CipherState
    window: ReplayWindow
    established_at: float
    seq: int  # establishment order on this node: newer sessions win for sending
    send_counter: int = 0
    last_received: float = 0.0
    awaiting_since: float | None = None  # first send not yet answered by anything
    # Since when the peer has left a send unanswered past stale_after (its daemon or broker is
    # gone, as far as we can tell); cleared by anything it sends. Survives the reconnect
    # attempts, so `peerd peers` shows "stale" instead of "up" while the peer stays away.
    silent_since: float | None = None
    pinged: bool = False
    superseded_at: float | None = None
    confirmed: bool = True
    invite_id: bytes | None = None
    started_at: float = 0.0
    protocol: str = NOISE_XX  # the Noise protocol name of its handshake
    # What its tickets are made of, until it is activated (then the ticket book has them).
    resumption: tuple[bytes, bytes] | None = None
    local_static: bytes = b""
    peer_static: bytes = b""

    def wipe(self) -> None:
        self.resumption = None
        self.sender.clear()
        self.receiver.clear()


@dataclass(slots=True)
class _Peer:
    sessions: list[Session] = field(default_factory=list)  # newest last
    handshake: _Handshake | None = None  # the one this node initiated, if any

    def current(self) -> Session | None:
        return self.sessions[-1] if self.sessions else None


_INDEX = struct.Struct(">I")


def _lingering(hs: _Handshake) -> bool:
    return hs.lingering


class SessionManager:
    def __init__(
        self,
        *,
        peer_id: str,
        network: str,
        static: KeyPair,
        credentials: bytes,
        trust: TrustPolicy,
        network_psk: bytes | None = None,
        limits: SessionLimits | None = None,
        random: Callable[[int], bytes] = nacl.utils.random,
    ) -> None:
        self.peer_id = peer_id
        self.network = network
        self.static = static
        self.credentials = credentials
        self.trust = trust
        self.network_psk = network_psk
        self.limits = limits or SessionLimits()
        self._random = random
        self._protocol = NOISE_XXPSK0 if network_psk else NOISE_XX
        self._prologue = prologue(network, self._protocol)
        self._psk_prologue = prologue(network, NOISE_XXPSK3)
        self._resume_prologue = prologue(network, NOISE_RESUME)
        self._min_resume = message_overheads(NOISE_RESUME)[0]
        self._cipher = parse_protocol_name(NOISE_RESUME)[3]
        self.tickets = TicketBook(self.limits.ticket_lifetime)
        self._early_rx: OrderedDict[int, _EarlyRx] = OrderedDict()  # by the initiator's index
        # The shortest message 1 each protocol allows (its payload empty): anything shorter
        # cannot carry an ML-KEM key, i.e. it is a classic handshake.
        self._min_hello = message_overheads(self._protocol)[0]
        self._min_hello_psk = message_overheads(NOISE_XXPSK3)[0]
        MLKEM768.generate()  # fail at start, clearly, on a cryptography build without ML-KEM
        self._peers: dict[str, _Peer] = {}
        self._by_index: dict[int, Session] = {}
        self._half_open: OrderedDict[int, _Handshake] = OrderedDict()  # responder, LRU
        self._initiating: dict[int, _Handshake] = {}
        self._hello_bucket = TokenBucket(self.limits.hello_rate, self.limits.hello_burst, 0.0)
        self._peer_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._seq = 0
        self.rejections: Counter[str] = Counter()

    # -- identity ---------------------------------------------------------------------------

    def set_identity(self, static: KeyPair, credentials: bytes) -> list[Output]:
        """After a key rotation: new handshakes use the new key; sessions keep theirs. Every
        ticket names the old key as a pre-message: they are dropped (the next session with
        each peer is XX, and leaves new ones)."""
        self.static = static
        self.credentials = credentials
        return [TicketSpent(t) for t in self.tickets.drop_all()]

    def load_tickets(self, tickets: list[Ticket], now: float) -> list[Output]:
        """The tickets the shell stored (at start); expired ones come back to be erased."""
        return [TicketSpent(t) for t in tickets if not self.tickets.load(t, now)]

    def forget_tickets(self, peer_id: str) -> list[Output]:
        """No resumption with `peer_id` any more (it was revoked or blocked)."""
        return [TicketSpent(t) for t in self.tickets.drop_peer(peer_id)]

    def can_resume(self, peer_id: str, now: float) -> bool:
        """Whether the next handshake with `peer_id` would be a resumption."""
        return self.tickets.has_out(peer_id, self.static.public, now)

    # -- queries ---------------------------------------------------------------------------

    def has_session(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.current() is not None

    def is_connecting(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.handshake is not None

    def connected_peers(self) -> list[str]:
        return [p for p, peer in self._peers.items() if peer.current() is not None]

    def session(self, peer_id: str) -> Session | None:
        peer = self._peers.get(peer_id)
        return peer.current() if peer else None

    def sessions_for(self, peer_id: str) -> list[Session]:
        """Every established session with `peer_id`, oldest first (superseded ones included:
        a revocation must end those too)."""
        peer = self._peers.get(peer_id)
        return list(peer.sessions) if peer else []

    @property
    def half_open_count(self) -> int:
        return len(self._half_open)

    # -- starting handshakes -----------------------------------------------------------------

    def connect(self, peer_id: str, now: float) -> list[Output]:
        """Start a handshake with `peer_id` unless one is already under way."""
        if peer_id == self.peer_id:
            raise LocalProtocolError("a node cannot open a session with itself")
        peer = self._peers.setdefault(peer_id, _Peer())
        if peer.handshake is not None:
            return []
        out: list[Output] = []
        ticket = self.tickets.take_out(peer_id)
        if ticket is not None:
            out.append(TicketSpent(ticket))  # used once, whatever the answer
            if ticket.expires <= now or ticket.local_static != self.static.public:
                ticket = None
        return out + self._start(peer_id, peer, now, invite_id=None, psk=None, ticket=ticket)

    def join(self, inviter: str, invite_id: bytes, invite_psk: bytes, now: float) -> list[Output]:
        """Pair with the node that issued an invite: XXpsk3 with the invite's PSK."""
        if len(invite_id) != frames.INVITE_ID_LEN:
            raise LocalProtocolError("an invite id has 16 bytes")
        peer = self._peers.setdefault(inviter, _Peer())
        if peer.handshake is not None:
            self._drop_handshake(peer.handshake)
            peer.handshake = None
        psk = combine_psk(self.network_psk, invite_psk)
        return self._start(inviter, peer, now, invite_id=invite_id, psk=psk)

    def _new_index(self) -> int:
        while True:
            index: int = _INDEX.unpack(self._random(4))[0]
            if (
                index
                and index not in self._by_index
                and index not in self._initiating
                and (index not in self._half_open)
            ):
                return index

    def _start(
        self,
        peer_id: str,
        peer: _Peer,
        now: float,
        *,
        invite_id: bytes | None,
        psk: bytes | None,
        attempt: int = 1,
        started_at: float | None = None,
        ticket: Ticket | None = None,
        queued: list[bytes] | None = None,
    ) -> list[Output]:
        if ticket is not None:
            state = HandshakeState(
                NOISE_RESUME,
                True,
                self._resume_prologue,
                s=self.static,
                rs=ticket.peer_static,
                psks=[resume_psk(self.network_psk, ticket.secret)],
            )
        else:
            state = self._handshake_state(True, psk)
        index = self._new_index()
        hs = _Handshake(
            local_index=index,
            peer_id=peer_id,
            initiator=True,
            state=state,
            started_at=now if started_at is None else started_at,
            deadline=now + self.limits.handshake_timeout * 2 ** (attempt - 1),
            attempt=attempt,
            invite_id=invite_id,
            psk=psk,
            queued=queued or [],
        )
        peer.handshake = hs
        self._initiating[index] = hs
        if ticket is not None:
            noise = state.write_message(self.credentials)
            hs.early = CipherState(self._cipher, early_key(state.symmetric.ck))
            frame = frames.encode_resume(index, self.peer_id, ticket.ticket_id, noise)
        else:
            frame = frames.encode_hello(index, self.peer_id, state.write_message(b""), invite_id)
        return [SendFrame(peer_id, frame)]

    def _handshake_state(self, initiator: bool, psk: bytes | None) -> HandshakeState:
        """XX (XXpsk0 with the network PSK) for a session; XXpsk3 with `psk`, an invite's PSK
        combined with the network PSK, for pairing."""
        if psk is None:
            psks = [self.network_psk] if self.network_psk else []
            return HandshakeState(
                self._protocol, initiator, self._prologue, s=self.static, psks=psks
            )
        return HandshakeState(
            NOISE_XXPSK3, initiator, self._psk_prologue, s=self.static, psks=[psk]
        )

    def _drop_handshake(self, hs: _Handshake) -> None:
        self._initiating.pop(hs.local_index, None)
        self._half_open.pop(hs.local_index, None)
        if hs.session is not None:
            self._forget(hs.session)
            hs.session = None

    def _settle(self, peer_id: str, winner: _Handshake | None) -> list[bytes]:
        """End every attempt we initiated with `peer_id` (the current one and those lingering)
        but keep `winner`'s session; the payloads still queued for the peer."""
        peer = self._peers.get(peer_id)
        queued = peer.handshake.queued if peer is not None and peer.handshake is not None else []
        if peer is not None:
            peer.handshake = None
        for hs in [h for h in self._initiating.values() if h.peer_id == peer_id]:
            if hs is winner:
                self._initiating.pop(hs.local_index, None)
            else:
                self._drop_handshake(hs)
        return queued

    # -- receiving -------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Output]:
        """One frame from this node's inbox. Never raises for bad input: it is counted."""
        try:
            frame = frames.decode(data)
            if isinstance(frame, frames.Data):
                return self._on_data(frame, now)
            if isinstance(frame, frames.Early):
                return self._on_early(frame, now)
            if isinstance(frame, frames.Hello):
                if frame.ticket_id is not None:
                    return self._on_resume(frame, now)
                return self._on_hello(frame, now)
            if isinstance(frame, frames.Reply):
                return self._on_reply(frame, now)
            if isinstance(frame, frames.Refused):
                return self._on_refused(frame)
            return self._on_finish(frame, now)
        except RemoteProtocolError as exc:
            return [self._reject(exc.reason, None, str(exc))]

    def _reject(self, reason: str, peer_id: str | None, detail: str) -> Rejected:
        self.rejections[reason] += 1
        return Rejected(reason, peer_id, detail)

    def _on_hello(self, hello: frames.Hello, now: float) -> list[Output]:
        claimed = hello.reply_to
        if claimed == self.peer_id:
            return [self._reject("self", claimed, "a HELLO claiming to come from this node")]
        psk: bytes | None = None
        if hello.invite_id is not None:
            invite_psk = self.trust.invite_psk(hello.invite_id, now)
            if invite_psk is None:
                return self._refuse_invite(hello, now)
            psk = combine_psk(self.network_psk, invite_psk)
        elif (refusal := self.trust.refuse_hello(claimed)) is not None:
            return [self._reject(refusal, claimed, "HELLO from a peer that cannot be accepted")]
        if not self._hello_bucket.take(now) or not self._peer_bucket(claimed, now).take(now):
            return [self._reject("rate-limited", claimed, "too many handshakes")]
        if len(hello.noise) < (self._min_hello if psk is None else self._min_hello_psk):
            # No downgrade: a peer that speaks X25519-only Noise (an older peerd, or someone
            # stripping the KEM) is told apart before any cryptography, and counted by name.
            return [
                self._reject(
                    "classic-handshake",
                    claimed,
                    "HELLO without an ML-KEM-768 key: peerd sessions are hybrid only "
                    f"({NOISE_XXPSK3 if psk else self._protocol}); the peer must upgrade",
                )
            ]
        state = self._handshake_state(False, psk)
        try:
            payload = state.read_message(hello.noise)
            if len(payload) > MAX_HELLO_PAYLOAD:
                raise RemoteProtocolError("HELLO payload too large", reason="oversize")
            index = self._new_index()
            reply = state.write_message(self.credentials)
        except RemoteProtocolError as exc:
            return [self._reject(exc.reason, claimed, str(exc))]
        self._admit_half_open(claimed)
        self._half_open[index] = _Handshake(
            local_index=index,
            peer_id=claimed,
            initiator=False,
            state=state,
            started_at=now,
            deadline=now + self.limits.half_open_timeout,
            invite_id=hello.invite_id,
            remote_index=hello.sender_index,
        )
        return [SendFrame(claimed, frames.encode_reply(hello.sender_index, index, reply))]

    def _on_resume(self, hello: frames.Hello, now: float) -> list[Output]:
        """Message 1 of a resumption (SPEC.md 4.7): answered only with the ticket it names,
        which is erased at once, so a replay of it is refused by the same check."""
        claimed = hello.reply_to
        if claimed == self.peer_id:
            return [self._reject("self", claimed, "a HELLO claiming to come from this node")]
        if (refusal := self.trust.refuse_hello(claimed)) is not None:
            return [self._reject(refusal, claimed, "HELLO from a peer that cannot be accepted")]
        if not self._hello_bucket.take(now) or not self._peer_bucket(claimed, now).take(now):
            return [self._reject("rate-limited", claimed, "too many handshakes")]
        assert hello.ticket_id is not None
        ticket = self.tickets.take_in(hello.ticket_id)
        if ticket is None:
            # Never issued, already used (a replay), or forgotten (a restart without it, a
            # rotation): no answer, and the initiator falls back to XX after its timeout.
            return [self._reject("unknown-ticket", claimed, "RESUME with no ticket of ours")]
        out: list[Output] = [TicketSpent(ticket)]
        if ticket.peer_id != claimed:
            return [*out, self._reject("wrong-peer", claimed, "a ticket of another peer")]
        if ticket.expires <= now or ticket.local_static != self.static.public:
            return [*out, self._reject("stale-ticket", claimed, "an expired or rotated ticket")]
        if len(hello.noise) < self._min_resume:
            return [*out, self._reject("classic-handshake", claimed, "RESUME without a KEM key")]
        state = HandshakeState(
            NOISE_RESUME,
            False,
            self._resume_prologue,
            s=self.static,
            rs=ticket.peer_static,
            psks=[resume_psk(self.network_psk, ticket.secret)],
        )
        try:
            creds = state.read_message(hello.noise)
            if len(creds) > MAX_RESUME_PAYLOAD:
                raise RemoteProtocolError("RESUME payload too large", reason="oversize")
            early = CipherState(self._cipher, early_key(state.symmetric.ck))
            auth = self.trust.authenticate(creds, ticket.peer_static, now, expected_peer=claimed)
            if auth.peer_id != claimed:
                raise RemoteProtocolError(
                    f"HELLO claimed {claimed} but credentials are {auth.peer_id}",
                    reason="wrong-peer",
                )
            index = self._new_index()
            reply = state.write_message(self.credentials)
        except ProtocolError as exc:
            reason = exc.reason if isinstance(exc, RemoteProtocolError) else "local-error"
            return [*out, self._reject(reason, claimed, str(exc))]
        hs = _Handshake(
            local_index=index,
            peer_id=claimed,
            initiator=False,
            state=state,
            started_at=now,
            deadline=now,
            remote_index=hello.sender_index,
        )
        # Message 1 was fresh (its ticket is gone now) and authenticated both statics: the
        # session is up for the responder once it has written message 2.
        session = self._new_session(hs, hello.sender_index, auth, now, confirmed=True)
        window = ReplayWindow(self.limits.replay_window)
        deadline = now + self.limits.half_open_timeout
        self._early_rx[hello.sender_index] = _EarlyRx(claimed, early, window, deadline)
        self._early_rx.move_to_end(hello.sender_index)
        while len(self._early_rx) > self.limits.max_half_open:
            self._early_rx.popitem(last=False)
        out.append(SendFrame(claimed, frames.encode_reply(hello.sender_index, index, reply)))
        out.extend(self._activate(session, now))
        return out

    def _on_early(self, early: frames.Early, now: float) -> list[Output]:
        rx = self._early_rx.get(early.sender_index)
        if rx is None:
            return [self._reject("unknown-session", None, "EARLY for no resumption of ours")]
        try:
            rx.window.check(early.counter)
            plaintext = rx.cipher.decrypt_with_nonce(early.counter, early.header, early.ciphertext)
        except RemoteProtocolError as exc:
            return [self._reject(exc.reason, rx.peer_id, str(exc))]
        rx.window.update(early.counter)
        if not self.has_session(rx.peer_id):
            return [self._reject("unknown-session", rx.peer_id, "EARLY after the session ended")]
        if not plaintext or plaintext[0] != KIND_APP:
            return [self._reject("malformed", rx.peer_id, "early data that is not APP")]
        return [Message(rx.peer_id, plaintext[1:])]

    def _peer_bucket(self, peer_id: str, now: float) -> TokenBucket:
        bucket = self._peer_buckets.get(peer_id)
        if bucket is None:
            bucket = TokenBucket(
                self.limits.hello_rate_per_peer, self.limits.hello_burst_per_peer, now
            )
            self._peer_buckets[peer_id] = bucket
            if len(self._peer_buckets) > self.limits.max_tracked_peers:
                self._peer_buckets.popitem(last=False)
        else:
            self._peer_buckets.move_to_end(peer_id)
        return bucket

    def _admit_half_open(self, claimed: str) -> None:
        """Make room: evict the oldest half-open handshakes (of this peer, then of all).

        Eviction instead of refusal means a flood shortens how long a bogus handshake may
        stay half-open, but never locks a legitimate peer out: a real handshake completes in
        about one broker round trip."""
        mine = [i for i, h in self._half_open.items() if h.peer_id == claimed]
        while len(mine) >= self.limits.max_half_open_per_peer:
            self._half_open.pop(mine.pop(0))
            self.rejections["evicted"] += 1
        while len(self._half_open) >= self.limits.max_half_open:
            self._half_open.popitem(last=False)
            self.rejections["evicted"] += 1

    def _refuse_invite(self, hello: frames.Hello, now: float) -> list[Output]:
        """A HELLO_PSK naming no open invite. For one this node closed (used, expired) the
        joiner is told at once, within the HELLO rate limits; an id never issued here gets
        silence, as before: a guesser learns nothing (SECURITY.md 3.1)."""
        claimed = hello.reply_to
        assert hello.invite_id is not None
        closed = self.trust.closed_invite(hello.invite_id)
        if closed is None:
            return [self._reject("unknown-invite", claimed, "no open invite with that id")]
        if not self._hello_bucket.take(now) or not self._peer_bucket(claimed, now).take(now):
            return [self._reject("rate-limited", claimed, "too many handshakes")]
        refusal = frames.encode_refused(hello.sender_index, closed)
        return [
            SendFrame(claimed, refusal),
            self._reject(f"invite-{closed}", claimed, f"HELLO_PSK for an invite {closed}"),
        ]

    def _on_refused(self, refused: frames.Refused) -> list[Output]:
        """The inviter says our join's invite is closed: end that join now, not at timeout."""
        hs = self._initiating.get(refused.receiver_index)
        if hs is None or hs.session is not None or hs.invite_id is None:
            return [self._reject("unknown-session", None, "REFUSED for no join of ours")]
        peer = self._peers.get(hs.peer_id)
        if hs.lingering or peer is None or peer.handshake is not hs:
            self._drop_handshake(hs)
            return []
        reason = f"invite-{refused.reason}"
        waiting = [
            h
            for h in self._initiating.values()
            if h.peer_id == hs.peer_id and h.session is not None
        ]
        if waiting:
            # Our earlier attempt sent message 3 and may be what used the invite: its
            # confirmation is on the way, or the refusal stands at that attempt's deadline.
            hs.refused = reason
            hs.attempt = self.limits.handshake_attempts
            hs.deadline = max(h.deadline for h in waiting)
            return []
        self._drop_handshake(hs)
        peer.handshake = None
        return [HandshakeFailed(hs.peer_id, reason)]

    def _on_reply(self, reply: frames.Reply, now: float) -> list[Output]:
        hs = self._initiating.get(reply.receiver_index)
        if hs is None or hs.session is not None:
            return [self._reject("unknown-session", None, "REPLY for no handshake of ours")]
        if hs.early is not None:
            return self._on_resume_reply(hs, reply, now)
        try:
            creds = hs.state.read_message(reply.noise)
            assert hs.state.rs is not None
            auth = self.trust.authenticate(
                creds,
                hs.state.rs,
                now,
                expected_peer=hs.peer_id,
                allow_unknown=hs.invite_id is not None,
            )
            if auth.peer_id != hs.peer_id:
                raise RemoteProtocolError(
                    f"the responder is {auth.peer_id}, not {hs.peer_id}", reason="wrong-peer"
                )
            finish = hs.state.write_message(self.credentials)
        except ProtocolError as exc:
            # Abort before message 3: nothing about this node is revealed to the responder.
            self._drop_handshake(hs)
            reason = exc.reason if isinstance(exc, RemoteProtocolError) else "local-error"
            rejected = self._reject(reason, hs.peer_id, str(exc))
            peer = self._peers.get(hs.peer_id)
            if peer is None or peer.handshake is not hs:
                return [rejected]  # a lingering attempt: the current one goes on
            peer.handshake = None
            return [rejected, HandshakeFailed(hs.peer_id, reason)]
        hs.session = self._new_session(hs, reply.sender_index, auth, now, confirmed=False)
        return [SendFrame(hs.peer_id, frames.encode_finish(reply.sender_index, finish))]

    def _on_resume_reply(self, hs: _Handshake, reply: frames.Reply, now: float) -> list[Output]:
        """Message 2 of our resumption: it authenticates the responder and shows it accepted
        message 1 (and so read our early data), so the session is up at once."""
        try:
            creds = hs.state.read_message(reply.noise)
            assert hs.state.rs is not None
            auth = self.trust.authenticate(creds, hs.state.rs, now, expected_peer=hs.peer_id)
            if auth.peer_id != hs.peer_id:
                raise RemoteProtocolError(
                    f"the responder is {auth.peer_id}, not {hs.peer_id}", reason="wrong-peer"
                )
        except ProtocolError as exc:
            reason = exc.reason if isinstance(exc, RemoteProtocolError) else "local-error"
            # Not a hang: XX at once, as after a resumption that got no answer.
            out: list[Output] = [self._reject(reason, hs.peer_id, str(exc))]
            return out + self._fall_back(hs, now)
        self._settle(hs.peer_id, hs)
        assert hs.early is not None
        hs.early.clear()
        hs.early = None
        hs.queued.clear()
        session = self._new_session(hs, reply.sender_index, auth, now, confirmed=True)
        return self._activate(session, now)

    def _fall_back(self, hs: _Handshake, now: float) -> list[Output]:
        """Replace a resumption that failed by an XX handshake, keeping its early data."""
        self._drop_handshake(hs)
        peer = self._peers.get(hs.peer_id)
        if peer is None or peer.handshake is not hs:
            return []
        peer.handshake = None
        return self._start(
            hs.peer_id,
            peer,
            now,
            invite_id=None,
            psk=None,
            attempt=hs.attempt + 1,
            started_at=hs.started_at,
            queued=hs.queued,
        )

    def _on_finish(self, finish: frames.Finish, now: float) -> list[Output]:
        hs = self._half_open.pop(finish.receiver_index, None)
        if hs is None:
            return [self._reject("unknown-session", None, "FINISH for no handshake of ours")]
        try:
            creds = hs.state.read_message(finish.noise)
            assert hs.state.rs is not None
            auth = self.trust.authenticate(
                creds,
                hs.state.rs,
                now,
                expected_peer=hs.peer_id,
                allow_unknown=hs.invite_id is not None,
            )
            if auth.peer_id != hs.peer_id:
                # Misbinding: the HELLO claimed one inbox, the credentials prove another.
                raise RemoteProtocolError(
                    f"HELLO claimed {hs.peer_id} but credentials are {auth.peer_id}",
                    reason="wrong-peer",
                )
        except RemoteProtocolError as exc:
            return [self._reject(exc.reason, hs.peer_id, str(exc))]
        session = self._new_session(hs, hs.remote_index, auth, now, confirmed=True)
        out = self._activate(session, now)
        out.extend(self._send_on(session, bytes([KIND_CONFIRM])))
        return out

    def _new_session(
        self,
        hs: _Handshake,
        remote_index: int,
        auth: Authenticated,
        now: float,
        *,
        confirmed: bool,
    ) -> Session:
        c1, c2 = hs.state.split()
        sender, receiver = (c1, c2) if hs.initiator else (c2, c1)
        name = hs.state.protocol_name
        assert hs.state.s is not None
        assert hs.state.rs is not None
        material = derive_tickets(name, hs.state.symmetric.ck)
        session = Session(
            local_index=hs.local_index,
            remote_index=remote_index,
            peer_id=hs.peer_id,
            auth=auth,
            initiator=hs.initiator,
            sender=sender,
            receiver=receiver,
            window=ReplayWindow(self.limits.replay_window),
            established_at=now,
            seq=0,
            last_received=now,
            confirmed=confirmed,
            invite_id=hs.invite_id,
            started_at=hs.started_at,
            protocol=name,
            resumption=material,
            local_static=hs.state.s.public,
            peer_static=hs.state.rs,
        )
        self._by_index[session.local_index] = session
        return session

    def _activate(
        self, session: Session, now: float, queued: list[bytes] | None = None
    ) -> list[Output]:
        """A confirmed session becomes the peer's newest, superseding older ones."""
        self._seq += 1
        session.seq = self._seq
        session.established_at = now
        peer = self._peers.setdefault(session.peer_id, _Peer())
        rekey = bool(peer.sessions)
        for old in peer.sessions:
            if old.superseded_at is None:
                old.superseded_at = now
        peer.sessions.append(session)
        while len(peer.sessions) > self.limits.max_sessions_per_peer:
            self._forget(peer.sessions.pop(0))
        local, remote = session.local_index, session.remote_index
        out: list[Output] = [
            SessionUp(
                session.peer_id,
                session.auth,
                session.initiator,
                session.started_at,
                now,
                (local, remote) if session.initiator else (remote, local),
                session.invite_id,
                rekey,
                session.protocol,
            )
        ]
        out.extend(self._issue_tickets(session, now))
        if queued is None:
            queued = peer.handshake.queued if peer.handshake is not None else []
        # Early data of a resumption that got no answer: the peer may never have read it.
        for payload in queued:
            out.extend(self._send_on(session, bytes([KIND_APP]) + payload))
        queued.clear()
        return out

    def _issue_tickets(self, session: Session, now: float) -> list[Output]:
        material, session.resumption = session.resumption, None
        if material is None:
            return []
        installed, replaced = self.tickets.issue(
            session.peer_id,
            session_initiator=session.initiator,
            material=material,
            local_static=session.local_static,
            peer_static=session.peer_static,
            now=now,
        )
        return [*(TicketSpent(t) for t in replaced), *(TicketIssued(t) for t in installed)]

    def _forget(self, session: Session) -> None:
        self._by_index.pop(session.local_index, None)
        session.wipe()

    # -- transport -------------------------------------------------------------------------

    def _on_data(self, data: frames.Data, now: float) -> list[Output]:
        session = self._by_index.get(data.receiver_index)
        if session is None:
            return [self._reject("unknown-session", None, "DATA for no session of ours")]
        try:
            session.window.check(data.counter)
            plaintext = session.receiver.decrypt_with_nonce(
                data.counter, data.header, data.ciphertext
            )
        except RemoteProtocolError as exc:
            return [self._reject(exc.reason, session.peer_id, str(exc))]
        session.window.update(data.counter)
        session.last_received = now
        session.awaiting_since = None
        session.silent_since = None
        session.pinged = False
        out: list[Output] = []
        if not session.confirmed:
            session.confirmed = True
            owner = next((h for h in self._initiating.values() if h.session is session), None)
            out = self._activate(session, now, self._settle(session.peer_id, owner))
        if not plaintext:
            return [*out, self._reject("malformed", session.peer_id, "empty transport message")]
        kind = plaintext[0]
        if kind == KIND_APP:
            out.append(Message(session.peer_id, plaintext[1:]))
            return out
        if kind == KIND_PING:
            return out + self._send_on(session, bytes([KIND_PONG]))
        if kind in (KIND_PONG, KIND_CONFIRM):
            return out
        if kind == KIND_CLOSE:
            reason = plaintext[1:200].decode("utf-8", "replace") or "closed by peer"
            return out + self._close_session(session, f"peer closed: {reason}")
        return [*out, self._reject("malformed", session.peer_id, f"unknown transport kind {kind}")]

    def send(self, peer_id: str, payload: bytes, now: float) -> list[Output]:
        """Encrypt `payload` for `peer_id` on its newest session.

        Raises LocalProtocolError when there is no usable session: the shell queues the
        payload (bounded) and calls `connect`.
        """
        if len(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(f"a session message is at most {MAX_PAYLOAD} bytes")
        peer = self._peers.get(peer_id)
        session = peer.current() if peer else None
        if session is None or not self._usable(session, now):
            if peer is not None and peer.handshake is not None:
                return self._send_early(peer.handshake, payload)
            raise LocalProtocolError(f"no session with {peer_id}")
        out = self._send_on(session, bytes([KIND_APP]) + payload)
        if session.awaiting_since is None:
            session.awaiting_since = now
        if self._wants_rekey(session, now):
            out.extend(self.connect(peer_id, now))
        return out

    def _send_early(self, hs: _Handshake, payload: bytes) -> list[Output]:
        """Early data: right behind our RESUME, before its answer (SPEC.md 4.7)."""
        limits = self.limits
        if (
            hs.early is None
            or len(hs.queued) >= limits.max_early_messages
            or sum(map(len, hs.queued)) + len(payload) > limits.max_early_bytes
        ):
            raise LocalProtocolError(f"no session with {hs.peer_id}")
        counter = hs.early_counter
        hs.early_counter = counter + 1
        header = frames.early_header(hs.local_index, counter)
        ciphertext = hs.early.encrypt_with_nonce(counter, header, bytes([KIND_APP]) + payload)
        hs.queued.append(payload)
        return [SendFrame(hs.peer_id, header + ciphertext)]

    def _usable(self, session: Session, now: float) -> bool:
        return (
            now - session.established_at < self.limits.reject_after_time
            and session.send_counter < self.limits.reject_after_messages
        )

    def _wants_rekey(self, session: Session, now: float) -> bool:
        """The session's initiator rekeys on time; the responder too if the initiator has not
        done so a grace period later (it may be gone); either side on the message budget."""
        age = now - session.established_at
        due = self._rekey_age(session)
        return session.send_counter >= self.limits.rekey_after_messages or age >= due

    def _rekey_age(self, session: Session) -> float:
        """The age at which `session` is due for a rekey on time (see `_wants_rekey`)."""
        return self.limits.rekey_after_time + (0.0 if session.initiator else 30.0)

    def _send_on(self, session: Session, plaintext: bytes) -> list[Output]:
        counter = session.send_counter
        session.send_counter = counter + 1
        header = frames.data_header(session.remote_index, counter)
        ciphertext = session.sender.encrypt_with_nonce(counter, header, plaintext)
        return [SendFrame(session.peer_id, header + ciphertext)]

    # -- closing -----------------------------------------------------------------------------

    def close(self, peer_id: str, reason: str, now: float, *, notify: bool = True) -> list[Output]:
        """Close every session and handshake with `peer_id` (revoked, blocked, shutting down)."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return []
        out: list[Output] = []
        for hs in [h for h in self._initiating.values() if h.peer_id == peer_id]:
            self._drop_handshake(hs)  # the current attempt and any lingering one
        for index in [i for i, h in self._half_open.items() if h.peer_id == peer_id]:
            del self._half_open[index]
        note = bytes([KIND_CLOSE]) + reason.encode("utf-8")[:180]
        for session in peer.sessions:
            if notify and self._usable(session, now):
                out.extend(self._send_on(session, note))
            self._forget(session)
        if peer.sessions:
            out.append(SessionDown(peer_id, reason))
        return out

    def close_session(self, session: Session, reason: str, now: float) -> list[Output]:
        """End one session (e.g. the one whose certificate was just revoked), telling the peer."""
        out: list[Output] = []
        if self._usable(session, now):
            out.extend(self._send_on(session, bytes([KIND_CLOSE]) + reason.encode()[:180]))
        return out + self._close_session(session, reason)

    def _close_session(self, session: Session, reason: str) -> list[Output]:
        peer = self._peers.get(session.peer_id)
        self._forget(session)
        if peer is None:
            return []
        if session in peer.sessions:
            peer.sessions.remove(session)
        if not peer.sessions:
            return [SessionDown(session.peer_id, reason)]
        return []

    # -- timers -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines: list[float] = [h.deadline for h in self._initiating.values()]
        if self._half_open:
            deadlines.append(next(iter(self._half_open.values())).deadline)
        if self._early_rx:
            deadlines.append(next(iter(self._early_rx.values())).deadline)
        limits = self.limits
        for peer in self._peers.values():
            for s in peer.sessions:
                if s.superseded_at is not None:
                    deadlines.append(s.superseded_at + limits.previous_grace)
                deadlines.append(s.established_at + limits.reject_after_time)
                if s is peer.sessions[-1] and peer.handshake is None:
                    deadlines.append(s.established_at + self._rekey_age(s))
                if s.awaiting_since is not None:
                    deadlines.append(s.awaiting_since + limits.stale_after * (2 if s.pinged else 1))
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        limits = self.limits
        # The current attempts first: a lingering one lives as long as its peer's handshake.
        due = sorted((h for h in self._initiating.values() if h.deadline <= now), key=_lingering)
        for hs in due:
            peer = self._peers.get(hs.peer_id)
            if hs.lingering or peer is None or peer.handshake is not hs:
                newer = peer.handshake if peer is not None else None
                if hs.lingering and newer is not None and newer.deadline > now:
                    # A slow path (a broker connection busy for seconds) may answer it after
                    # several later attempts left: answerable while the handshake goes on.
                    hs.deadline = newer.deadline
                    continue
                self._drop_handshake(hs)
                continue
            peer.handshake = None
            if hs.attempt >= limits.handshake_attempts:
                self._settle(hs.peer_id, None)
                if hs.refused is None:
                    self.rejections["handshake-timeout"] += 1
                out.append(HandshakeFailed(hs.peer_id, hs.refused or "timeout"))
                continue
            out.extend(
                self._start(
                    hs.peer_id,
                    peer,
                    now,
                    invite_id=hs.invite_id,
                    psk=hs.psk,
                    attempt=hs.attempt + 1,
                    started_at=hs.started_at,
                    queued=hs.queued,
                )
            )
            hs.lingering = True  # still in _initiating: a late answer completes it
            hs.deadline = peer.handshake.deadline if peer.handshake is not None else now
        while self._half_open:
            index, hs = next(iter(self._half_open.items()))
            if hs.deadline > now:
                break
            del self._half_open[index]
            self.rejections["handshake-timeout"] += 1
        while self._early_rx:
            index, rx = next(iter(self._early_rx.items()))
            if rx.deadline > now:
                break
            del self._early_rx[index]
            rx.cipher.clear()
        for peer_id, peer in list(self._peers.items()):
            for s in list(peer.sessions):
                expired = now - s.established_at >= limits.reject_after_time
                stale_prev = s.superseded_at is not None and (
                    now - s.superseded_at >= limits.previous_grace
                )
                if expired or stale_prev:
                    out.extend(self._close_session(s, "expired" if expired else "superseded"))
            current = peer.current()
            if current is None:
                if peer.handshake is None and not peer.sessions:
                    self._peers.pop(peer_id, None)
                continue
            if current.awaiting_since is not None:
                waited = now - current.awaiting_since
                if waited >= limits.stale_after and current.silent_since is None:
                    current.silent_since = current.awaiting_since
                if waited >= 2 * limits.stale_after:
                    current.awaiting_since = None
                    current.pinged = False
                    out.extend(self.connect(peer_id, now))
                elif waited >= limits.stale_after and not current.pinged:
                    current.pinged = True
                    out.extend(self._send_on(current, bytes([KIND_PING])))
            if self._wants_rekey(current, now):
                out.extend(self.connect(peer_id, now))
        return out
