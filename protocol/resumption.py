"""One-round-trip sessions with a known peer: resumption tickets and early data (SPEC.md 4.7).

Every session both sides complete leaves them a shared secret for the next one, a **ticket**:
`HKDF(ck, "peerd/v1/resumption")` of the handshake's final chaining key, one ticket for each
side to initiate with. The next handshake of that side is then
`Noise_KKhfs+psk0_25519+MLKEM768_ChaChaPoly_BLAKE2b` with the ticket's secret as the PSK and the
static keys of the previous session as the pre-messages: two messages, one round trip, still
hybrid (the responder's `ekem1` in message 2), and the session is usable by the initiator as
soon as message 2 arrives. A ticket is used once: each side erases it when it is used (or
refused), so a replayed message 1 finds no ticket. Application messages the initiator sends
before message 2 arrives travel as EARLY frames under a key derived after message 1 (which
already mixed in the ticket, so they are as post-quantum as the session the ticket came from).

This module holds what needs no manager state: the derivations and the book of tickets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from protocol.noise import parse_protocol_name

NOISE_RESUME = "Noise_KKhfs+psk0_25519+MLKEM768_ChaChaPoly_BLAKE2b"
TICKET_ID_LEN = 16
TICKET_SECRET_LEN = 32
_RESUMPTION_LABEL = b"peerd/v1/resumption"
_EARLY_LABEL = b"peerd/v1/early-data"


@dataclass(frozen=True, slots=True)
class Ticket:
    """A secret shared with `peer_id` by the session it came from.

    `initiator`: this node initiates with it (else it accepts it from the peer). The static
    keys are those of that session: the resumption's KK pre-messages. A ticket is a secret:
    the shell stores it where secrets are erased for real (peerd/store/erasure.py).
    """

    peer_id: str
    initiator: bool
    ticket_id: bytes
    secret: bytes
    local_static: bytes
    peer_static: bytes
    expires: float

    def __repr__(self) -> str:  # never print the secret
        return f"Ticket({self.peer_id!r}, initiator={self.initiator}, id={self.ticket_id.hex()})"


def _hkdf(protocol_name: str, ck: bytes, label: bytes) -> tuple[bytes, ...]:
    hash_ = parse_protocol_name(protocol_name)[4]
    return hash_.hkdf(ck, label, 2)


def derive_tickets(protocol_name: str, ck: bytes) -> tuple[bytes, bytes]:
    """(for the session's initiator, for its responder): each `secret (32) || id (16)`, from
    the final chaining key of a completed handshake of `protocol_name`."""
    t_init, t_resp = _hkdf(protocol_name, ck, _RESUMPTION_LABEL)
    n = TICKET_SECRET_LEN + TICKET_ID_LEN
    return t_init[:n], t_resp[:n]


def early_key(ck: bytes) -> bytes:
    """The key of the initiator's EARLY frames: from the chaining key after message 1 of a
    resumption (ticket PSK, es, ss mixed in)."""
    return _hkdf(NOISE_RESUME, ck, _EARLY_LABEL)[0][:32]


def resume_psk(network_psk: bytes | None, secret: bytes) -> bytes:
    """The PSK of a resumption: the ticket's secret, keyed by the network PSK if any (so a
    network PSK keeps filtering strangers' HELLOs before any DH, as in 4.1)."""
    if network_psk is None:
        return secret
    return hashlib.blake2b(
        b"peerd/v1/resume-psk\x00" + secret, key=network_psk, digest_size=32
    ).digest()


class TicketBook:
    """The tickets a node holds: at most one per peer and direction (bounded by the peers).

    Which ticket a new session leaves: the one for its own initiator replaces the old one; the
    one for its responder only fills an empty slot. Two handshakes that cross (both sides
    initiate at once) then leave both sides the same two tickets whatever order their sessions
    complete in: each side's initiating ticket comes from the session it initiated.
    """

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._out: dict[str, Ticket] = {}  # peer -> the ticket this node initiates with
        self._in: dict[bytes, Ticket] = {}  # ticket id -> a ticket a peer initiates with
        self._in_by_peer: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._out) + len(self._in)

    def all(self) -> list[Ticket]:
        return [*self._out.values(), *self._in.values()]

    def has_out(self, peer_id: str, local_static: bytes, now: float) -> bool:
        t = self._out.get(peer_id)
        return t is not None and t.expires > now and t.local_static == local_static

    def load(self, ticket: Ticket, now: float) -> bool:
        """Add a stored ticket (at start); False if it has expired."""
        if ticket.expires <= now:
            return False
        self._put(ticket)
        return True

    def _put(self, ticket: Ticket) -> Ticket | None:
        """Install `ticket`; returns the one it replaced, if any."""
        if ticket.initiator:
            old = self._out.get(ticket.peer_id)
            self._out[ticket.peer_id] = ticket
            return old
        old_id = self._in_by_peer.get(ticket.peer_id)
        old = self._in.pop(old_id, None) if old_id is not None else None
        self._in[ticket.ticket_id] = ticket
        self._in_by_peer[ticket.peer_id] = ticket.ticket_id
        return old

    def issue(
        self,
        peer_id: str,
        *,
        session_initiator: bool,
        material: tuple[bytes, bytes],
        local_static: bytes,
        peer_static: bytes,
        now: float,
    ) -> tuple[list[Ticket], list[Ticket]]:
        """The tickets a newly active session leaves: (installed, replaced)."""
        installed: list[Ticket] = []
        replaced: list[Ticket] = []
        for material_index, for_initiator in ((0, True), (1, False)):
            raw = material[material_index]
            # Whether *this node* initiates with it.
            mine = for_initiator == session_initiator
            ticket = Ticket(
                peer_id=peer_id,
                initiator=mine,
                ticket_id=raw[TICKET_SECRET_LEN:],
                secret=raw[:TICKET_SECRET_LEN],
                local_static=local_static,
                peer_static=peer_static,
                expires=now + self.lifetime,
            )
            if not for_initiator and self._has(peer_id, mine, now):
                continue  # the responder's ticket only fills an empty slot
            old = self._put(ticket)
            installed.append(ticket)
            if old is not None:
                replaced.append(old)
        return installed, replaced

    def _has(self, peer_id: str, initiator: bool, now: float) -> bool:
        if initiator:
            t = self._out.get(peer_id)
        else:
            tid = self._in_by_peer.get(peer_id)
            t = self._in.get(tid) if tid is not None else None
        return t is not None and t.expires > now

    def take_out(self, peer_id: str) -> Ticket | None:
        """The ticket to initiate with `peer_id`, removed: it is used once, whatever happens."""
        return self._out.pop(peer_id, None)

    def take_in(self, ticket_id: bytes) -> Ticket | None:
        """The ticket a HELLO names, removed: a replay of that HELLO finds nothing."""
        ticket = self._in.pop(ticket_id, None)
        if ticket is not None and self._in_by_peer.get(ticket.peer_id) == ticket_id:
            del self._in_by_peer[ticket.peer_id]
        return ticket

    def drop_peer(self, peer_id: str) -> list[Ticket]:
        out: list[Ticket] = []
        if (t := self._out.pop(peer_id, None)) is not None:
            out.append(t)
        tid = self._in_by_peer.pop(peer_id, None)
        if tid is not None and (t := self._in.pop(tid, None)) is not None:
            out.append(t)
        return out

    def drop_all(self) -> list[Ticket]:
        out = self.all()
        self._out.clear()
        self._in.clear()
        self._in_by_peer.clear()
        return out
