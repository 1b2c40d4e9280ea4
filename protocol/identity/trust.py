"""The trust decision: pure, synchronous, in memory.

`TrustView` is a snapshot of what the trust store knows: every peer with its state and pinned
identity, the highest certificate serial seen, revoked serials, open invites and the configured
authority key. The daemon asks it during a Noise handshake (`authenticate`, microseconds, no
sqlite round trip) and while a session lives (`check_session`). The store keeps it current: it
plans every change with the `plan_*` methods here (which enforce the rules and raise on a
violation, so a refused change writes nothing), commits the change to sqlite, then applies it
with the `put_*` methods. The rules live in this one place; the store only persists.

Rules (protocol/SPEC.md section 6 states them for implementers):
- A peer's identity is pinned on first contact: the chain of identity keys it presents must
  extend the pinned chain; a shorter chain (an identity key already succeeded) is a rollback, a
  diverging one a conflict.
- Certificate serials only increase. A lower serial is a rollback; the same serial with other
  content is a conflict. A new handshake is accepted only with the highest serial seen (a
  superseded certificate never authenticates anything again); a session established under a
  superseded certificate may continue for `overlap` seconds after we first saw its successor.
- A static-key revocation with serial S revokes every certificate of that peer with serial <= S.
  An identity revocation (by the peer itself, with any of its identity keys, or by the configured
  network authority) revokes the peer id for good. Revocations only accumulate: replaying one
  changes nothing, and nothing un-revokes.
- Blocked and revoked peers are refused whatever else they present; a pending peer (added by
  fingerprint) is accepted when its current identity key has that fingerprint, and refused when it
  has another; an unknown peer is accepted with a valid membership certificate of the configured
  authority, or when the caller says the handshake itself authenticated it (an invite PSK).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import StrEnum

from protocol.errors import LocalProtocolError
from protocol.identity.errors import (
    Blocked,
    Conflict,
    Expired,
    Revoked,
    Rollback,
    TrustError,
    UnknownPeer,
    WrongPeer,
)
from protocol.identity.ids import fingerprint, peer_id_for
from protocol.identity.invite import INVITE_ID_BYTES, PSK_BYTES
from protocol.identity.objects import (
    REVOKE_IDENTITY,
    AuthorityRevocation,
    Credentials,
    KeyCertificate,
    Membership,
    Revocation,
    Succession,
    decode_statement,
)

MAX_SUPERSEDED = 8  # superseded certificates remembered per peer for sessions in their overlap
MAX_PEERS = 100_000  # the view refuses to grow beyond this (a bound, not a product limit)
MAX_INVITES = 1000
# Closed invites remembered (newest first out of the window) so that a joiner with a used or
# expired token is told so at once (SPEC 3, REFUSED) instead of waiting for an answer.
MAX_CLOSED_INVITES = 1024
VERIFIED_CACHE = 512  # credentials whose signatures are known good (LRU)
# Owner-signed revocations of peers this node has never met are kept (a peer met later is held
# to them), but anyone can mint identities and retain their self-revocations on the broker: past
# this many, further ones are refused (counted), so junk cannot fill the peer table.
MAX_UNMET_REVOCATIONS = 4096


class PeerState(StrEnum):
    PENDING = "pending"  # expected (by fingerprint or invite) but its key not yet seen
    TRUSTED = "trusted"
    BLOCKED = "blocked"  # refused by a local decision; `trust` lifts it
    REVOKED = "revoked"  # refused for good by a revocation statement


class TrustSource(StrEnum):
    INVITE = "invite"
    FINGERPRINT = "fingerprint"
    AUTHORITY = "authority"


@dataclass(frozen=True, slots=True)
class Superseded:
    serial: int
    superseded_at: float  # our clock when we first saw a higher serial
    not_after: int


@dataclass(frozen=True, slots=True)
class PeerTrust:
    """Everything the trust rules need to know about one peer."""

    peer_id: str
    state: PeerState
    source: TrustSource | None = None
    expected_fingerprint: str | None = None
    identities: tuple[bytes, ...] = ()  # pinned identity keys, first to current; () = unseen
    successions: tuple[Succession, ...] = ()
    certificate: KeyCertificate | None = None  # the highest serial seen
    superseded: tuple[Superseded, ...] = ()
    membership: Membership | None = None
    updated_at: float = 0.0

    @property
    def identity(self) -> bytes | None:
        return self.identities[-1] if self.identities else None

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the current identity key, or the expected one while pending."""
        return fingerprint(self.identities[-1]) if self.identities else self.expected_fingerprint


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A peer that passed `TrustView.authenticate`; hand it to the store to record."""

    peer_id: str
    identity_public: bytes
    certificate: KeyCertificate
    certificate_is_new: bool  # a first certificate or a rotation: the store must record it
    source: TrustSource
    state_before: PeerState | None  # None: the peer was unknown
    identities: tuple[bytes, ...]
    successions: tuple[Succession, ...]
    membership: Membership | None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity_public)

    @property
    def serial(self) -> int:
        return self.certificate.serial


@dataclass(frozen=True, slots=True, repr=False)
class InviteGrant:
    """An invite we issued that is still open: its PSK, for the responder of an XXpsk3."""

    invite_id: bytes
    psk: bytes
    expires_at: int

    def __repr__(self) -> str:
        return f"InviteGrant(invite_id={self.invite_id.hex()}, expires_at={self.expires_at})"


@dataclass(frozen=True, slots=True)
class RevocationPlan:
    """What a verified revocation statement changes: `peer` is the peer's new record if its
    state changes, `revoked_through` the new revoked serial if it rises. Both None: a replay."""

    statement: Revocation | AuthorityRevocation
    encoded: bytes
    peer: PeerTrust | None
    revoked_through: int | None

    @property
    def changes(self) -> bool:
        return self.peer is not None or self.revoked_through is not None


class TrustView:
    """The in-memory trust state of one node. Mutated only by the store (`put_*`)."""

    def __init__(
        self,
        *,
        self_peer_id: str | None,
        network: str,
        overlap: float,
        authority_key: bytes | None = None,
    ) -> None:
        self.self_peer_id = self_peer_id
        # This node's current identity key (the store keeps it): the only owner key that may
        # revoke this node, checked like a pinned chain's last key (SPEC 6.8).
        self.self_identity: bytes | None = None
        self.network = network
        self.configure(overlap=overlap, authority_key=authority_key)
        self._peers: dict[str, PeerTrust] = {}
        self._revoked_through: dict[str, int] = {}
        self._invites: dict[bytes, InviteGrant] = {}
        self._closed_invites: OrderedDict[bytes, str] = OrderedDict()
        # Credentials whose signatures verified, by their exact bytes. A peer presents the
        # same bytes at every handshake until it rotates, and Ed25519 verification is most of
        # the cost of `authenticate` (~40 us of ~80): only the time-independent checks are
        # cached, the validity window and every trust rule are applied each time.
        self._verified: OrderedDict[bytes, tuple[Credentials, tuple[bytes, ...]]] = OrderedDict()
        self._unmet_revoked: set[str] = set()  # revoked before we ever saw their key

    def configure(self, *, overlap: float, authority_key: bytes | None) -> None:
        """Settings from the configuration (the daemon calls this again on reload)."""
        if overlap < 0:
            raise LocalProtocolError("the overlap window cannot be negative")
        if authority_key is not None and len(authority_key) != 32:
            raise LocalProtocolError("an authority key is a 32-byte Ed25519 public key")
        self.overlap = float(overlap)
        self.authority_key = authority_key

    # -- reading --------------------------------------------------------------------------

    def peer(self, peer_id: str) -> PeerTrust | None:
        return self._peers.get(peer_id)

    def peers(self) -> Iterator[PeerTrust]:
        return iter(list(self._peers.values()))

    def __len__(self) -> int:
        return len(self._peers)

    def revoked_through(self, peer_id: str) -> int:
        """Every certificate of `peer_id` with a serial up to this one is revoked (0: none)."""
        return self._revoked_through.get(peer_id, 0)

    def invites(self) -> Iterator[InviteGrant]:
        return iter(list(self._invites.values()))

    def invite_psk(self, invite_id: bytes, now: float) -> bytes:
        """The PSK of an open invite, for the responder of an XXpsk3 handshake."""
        grant = self._invites.get(bytes(invite_id))
        if grant is None:
            raise TrustError(
                "no open invite with this id (unknown or already used)", reason="unknown-invite"
            )
        if now >= grant.expires_at:
            raise Expired("the invite expired", hint="issue a new one with `peerd invite`")
        return grant.psk

    def could_accept(self, peer_id: str) -> bool:
        """Whether a handshake claiming `peer_id` could ever succeed without an invite: the
        cheap check before any cryptography (SPEC 4.6). True for trusted and pending peers,
        and for unknown ones when an authority is configured (they may be members)."""
        record = self._peers.get(peer_id)
        if record is None:
            return self.authority_key is not None
        return record.state in (PeerState.TRUSTED, PeerState.PENDING)

    def is_trusted(self, peer_id: str) -> bool:
        record = self._peers.get(peer_id)
        return record is not None and record.state is PeerState.TRUSTED

    # -- the handshake decision -----------------------------------------------------------

    def authenticate(
        self,
        credentials: bytes,
        remote_static: bytes,
        now: float,
        *,
        expected_peer: str | None = None,
        allow_unknown: bool = False,
    ) -> Authenticated:
        """Decide whether the peer behind a Noise handshake is who it claims and is trusted.

        `credentials` is the peer's encoded `Credentials`, `remote_static` the Noise static key
        the handshake proved it holds. Returns `Authenticated` or raises a `TrustError` whose
        `reason` says why not. Changes nothing: record the result with the store.
        """
        creds, keys = self._verified_credentials(credentials)
        cert = creds.certificate
        cert.check_validity(now)
        if cert.static_public != remote_static:
            raise TrustError(
                "the certificate is for another static key than the one of the handshake",
                reason="static-mismatch",
            )
        peer_id = cert.peer_id
        if expected_peer is not None and peer_id != expected_peer:
            raise WrongPeer(f"expected peer {expected_peer}, but this is {peer_id}")
        if peer_id == self.self_peer_id:
            raise TrustError("the peer presents our own identity", reason="self")
        record = self._peers.get(peer_id)
        is_new, source = self._decide(
            record,
            peer_id,
            keys,
            cert,
            membership=creds.membership,
            now=now,
            allow_unknown=allow_unknown,
        )
        return Authenticated(
            peer_id=peer_id,
            identity_public=keys[-1],
            certificate=cert,
            certificate_is_new=is_new,
            source=source,
            state_before=None if record is None else record.state,
            identities=keys,
            successions=creds.successions,
            membership=creds.membership,
        )

    def _verified_credentials(self, data: bytes) -> tuple[Credentials, tuple[bytes, ...]]:
        key = bytes(data)
        hit = self._verified.get(key)
        if hit is not None:
            self._verified.move_to_end(key)
            return hit
        creds = Credentials.decode(key)
        result = (creds, creds.verify_signatures())
        self._verified[key] = result
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return result

    def _decide(
        self,
        record: PeerTrust | None,
        peer_id: str,
        keys: tuple[bytes, ...],
        cert: KeyCertificate,
        *,
        membership: Membership | None,
        now: float,
        allow_unknown: bool,
    ) -> tuple[bool, TrustSource]:
        if cert.serial <= self.revoked_through(peer_id):
            raise Revoked(f"certificate {cert.serial} of {peer_id} is revoked")
        if record is None:
            return True, self._unknown_source(peer_id, keys, membership, now, allow_unknown)
        if record.state is PeerState.REVOKED:
            raise Revoked(f"peer {peer_id} is revoked")
        if record.state is PeerState.BLOCKED:
            raise Blocked(f"peer {peer_id} is blocked", hint="`peerd trust` lifts a block")
        _check_continuity(record, keys)
        is_new = _check_serial(record, cert)
        if record.state is PeerState.PENDING:
            if record.expected_fingerprint != fingerprint(keys[-1]):
                raise TrustError(
                    f"peer {peer_id} shows an identity key with another fingerprint than the "
                    "one it was added with",
                    reason="fingerprint-mismatch",
                    hint="compare fingerprints out of band again; this may be an impersonation",
                )
            return is_new, record.source or TrustSource.FINGERPRINT
        source = record.source or TrustSource.FINGERPRINT
        if source is TrustSource.AUTHORITY:
            self._check_membership(peer_id, keys, membership, now)
        return is_new, source

    def _unknown_source(
        self,
        peer_id: str,
        keys: tuple[bytes, ...],
        membership: Membership | None,
        now: float,
        allow_unknown: bool,
    ) -> TrustSource:
        if allow_unknown:
            return TrustSource.INVITE
        if membership is None or self.authority_key is None:
            raise UnknownPeer(f"peer {peer_id} is not known")
        self._check_membership(peer_id, keys, membership, now)
        return TrustSource.AUTHORITY

    def _check_membership(
        self, peer_id: str, keys: tuple[bytes, ...], membership: Membership | None, now: float
    ) -> None:
        if self.authority_key is None:
            raise UnknownPeer(
                f"peer {peer_id} was trusted through an authority, and none is configured"
            )
        if membership is None:
            raise TrustError(
                f"peer {peer_id} presents no membership certificate", reason="no-membership"
            )
        if membership.authority_public != self.authority_key:
            raise TrustError(
                "the membership certificate is from another authority", reason="wrong-authority"
            )
        if membership.network != self.network:
            raise TrustError(
                f"the membership certificate is for network {membership.network!r}",
                reason="wrong-network",
            )
        if membership.peer_id != peer_id or membership.identity_public != keys[-1]:
            raise TrustError(
                "the membership certificate is for another peer or key",
                reason="membership-mismatch",
            )
        membership.verify_signature()
        membership.check_validity(now)

    def check_session(self, peer_id: str, serial: int, now: float) -> float:
        """May a session established with certificate `serial` of `peer_id` go on?

        Returns the deadline (Unix seconds) by which it must end or rekey, or raises a
        `TrustError` if it must end now (revoked, blocked, superseded beyond the overlap,
        expired). Call it when the trust state changes and arm a timer for the deadline.
        """
        record = self._peers.get(peer_id)
        if record is None or record.state is PeerState.PENDING:
            raise UnknownPeer(f"peer {peer_id} is not trusted")
        if record.state is PeerState.REVOKED:
            raise Revoked(f"peer {peer_id} is revoked")
        if record.state is PeerState.BLOCKED:
            raise Blocked(f"peer {peer_id} is blocked")
        if serial <= self.revoked_through(peer_id):
            raise Revoked(f"certificate {serial} of {peer_id} is revoked")
        deadline: float
        if record.certificate is not None and serial == record.certificate.serial:
            deadline = record.certificate.not_after
        else:
            old = next((s for s in record.superseded if s.serial == serial), None)
            if old is None and (record.certificate is None or serial > record.certificate.serial):
                raise TrustError(
                    f"certificate {serial} of {peer_id} was never seen",
                    reason="unknown-certificate",
                )
            if old is None:
                raise Rollback(
                    f"certificate {serial} of {peer_id} is superseded", reason="superseded"
                )
            deadline = min(old.superseded_at + self.overlap, old.not_after)
        if record.source is TrustSource.AUTHORITY and record.membership is not None:
            deadline = min(deadline, record.membership.not_after)
        if now >= deadline:
            raise Expired(f"the session's certificate {serial} of {peer_id} is no longer valid")
        return deadline

    # -- planning changes (pure; raise if the rules forbid the change) --------------------

    def plan_pending(
        self, peer_id: str, expected_fingerprint: str, source: TrustSource, now: float
    ) -> PeerTrust | None:
        """Expect `peer_id` to show an identity key with this fingerprint (None: no change)."""
        record = self._peers.get(peer_id)
        if record is None:
            self._check_room()
            return PeerTrust(
                peer_id,
                PeerState.PENDING,
                source=source,
                expected_fingerprint=expected_fingerprint,
                updated_at=now,
            )
        if record.state is PeerState.REVOKED:
            raise Revoked(f"peer {peer_id} is revoked; nothing un-revokes it")
        if record.identities:
            if fingerprint(record.identities[-1]) != expected_fingerprint:
                raise Conflict(
                    f"peer {peer_id} is known with another fingerprint ({record.fingerprint})",
                    hint="compare fingerprints out of band again",
                )
            if record.state is PeerState.BLOCKED:
                raise Blocked(f"peer {peer_id} is blocked", hint="`peerd trust` lifts a block")
            return None
        if record.state is PeerState.BLOCKED:
            raise Blocked(f"peer {peer_id} is blocked", hint="`peerd trust` lifts a block")
        if record.expected_fingerprint == expected_fingerprint and record.source is source:
            return None
        return replace(
            record, source=source, expected_fingerprint=expected_fingerprint, updated_at=now
        )

    def plan_trust(
        self, peer_id: str, expected_fingerprint: str | None, now: float
    ) -> PeerTrust | None:
        """The `trust` command: lift a block, or expect a fingerprint (None: no change)."""
        record = self._peers.get(peer_id)
        if record is not None and record.state is PeerState.REVOKED:
            raise Revoked(f"peer {peer_id} is revoked; nothing un-revokes it")
        if record is None or not record.identities:
            if expected_fingerprint is None:
                raise UnknownPeer(
                    f"peer {peer_id} has never been seen",
                    hint="give its fingerprint (--fingerprint) or pair with an invite",
                )
            if record is None:
                self._check_room()
                record = PeerTrust(peer_id, PeerState.PENDING, updated_at=now)
            elif (
                record.state is PeerState.PENDING
                and record.expected_fingerprint == expected_fingerprint
                and record.source is TrustSource.FINGERPRINT
            ):
                return None
            return replace(
                record,
                state=PeerState.PENDING,
                source=TrustSource.FINGERPRINT,
                expected_fingerprint=expected_fingerprint,
                updated_at=now,
            )
        current = fingerprint(record.identities[-1])
        if expected_fingerprint is not None and expected_fingerprint != current:
            raise Conflict(
                f"peer {peer_id} has the fingerprint {current}, not {expected_fingerprint}",
                hint="compare fingerprints out of band again",
            )
        if record.state is PeerState.TRUSTED:
            return None
        source = record.source or TrustSource.FINGERPRINT
        if expected_fingerprint is not None:
            source = TrustSource.FINGERPRINT
        return replace(record, state=PeerState.TRUSTED, source=source, updated_at=now)

    def plan_block(self, peer_id: str, now: float) -> PeerTrust | None:
        record = self._peers.get(peer_id)
        if record is None:
            self._check_room()
            return PeerTrust(peer_id, PeerState.BLOCKED, updated_at=now)
        if record.state in (PeerState.BLOCKED, PeerState.REVOKED):
            return None
        return replace(record, state=PeerState.BLOCKED, updated_at=now)

    def plan_authenticated(self, auth: Authenticated, now: float) -> PeerTrust | None:
        """The peer's record after a successful handshake (None: nothing to record).

        The decision is taken again against the current state: a revocation, a block or a
        newer certificate may have been recorded since `authenticate` ran.
        """
        if auth.peer_id == self.self_peer_id:
            raise TrustError("the peer presents our own identity", reason="self")
        record = self._peers.get(auth.peer_id)
        is_new, source = self._decide(
            record,
            auth.peer_id,
            auth.identities,
            auth.certificate,
            membership=auth.membership,
            now=now,
            allow_unknown=auth.source is TrustSource.INVITE,
        )
        if record is None:
            self._check_room()
            record = PeerTrust(auth.peer_id, PeerState.PENDING)
        superseded = record.superseded
        old = record.certificate
        if is_new and old is not None:
            superseded = (*superseded, Superseded(old.serial, now, old.not_after))
        updated = replace(
            record,
            state=PeerState.TRUSTED,
            source=source,
            expected_fingerprint=None,
            identities=auth.identities,
            successions=auth.successions,
            certificate=auth.certificate if is_new else old,
            superseded=superseded[-MAX_SUPERSEDED:],
            membership=auth.membership if source is TrustSource.AUTHORITY else None,
            updated_at=record.updated_at,
        )
        if updated == record:
            return None
        return replace(updated, updated_at=now)

    def plan_revocation(self, statement: bytes, now: float) -> RevocationPlan:
        """Verify a revocation statement and say what it changes (maybe nothing: a replay)."""
        parsed = decode_statement(statement)
        peer_id = parsed.peer_id
        record = self._peers.get(peer_id)
        if isinstance(parsed, AuthorityRevocation):
            if self.authority_key is None:
                raise TrustError(
                    "an authority revocation, but no authority is configured", reason="no-authority"
                )
            if parsed.authority_public != self.authority_key:
                raise TrustError("a revocation from another authority", reason="wrong-authority")
            if parsed.network != self.network:
                raise TrustError(
                    f"an authority revocation for network {parsed.network!r}",
                    reason="wrong-network",
                )
            parsed.verify_signature()
            return RevocationPlan(
                parsed, bytes(statement), self._revoked_record(record, peer_id, now), None
            )
        known = record.identities if record is not None else ()
        if peer_id == self.self_peer_id and self.self_identity is not None:
            # A node has no record of itself, yet knows its own chain: without this its first
            # (succeeded) key, which hashes to its id, could expel it (SPEC 6.8).
            known = (*known, self.self_identity)
        if (
            not known
            and peer_id not in self._unmet_revoked
            and len(self._unmet_revoked) >= MAX_UNMET_REVOCATIONS
        ):
            raise TrustError(
                f"already {MAX_UNMET_REVOCATIONS} revocations of peers never met are kept",
                reason="unmet-revocations-full",
            )
        # Only the current identity key signs for a node (SPEC 6.8): the last key of the chain
        # this verifier pinned, or, with no chain pinned, the key that hashes to the peer id.
        # A succeeded key is refused even though it once was the node's: the node erased it
        # when it succeeded, so whoever still holds it is a thief (an old backup, the reason
        # for the succession), and an identity revocation would hand him a kill switch.
        current = known[-1] if known else None
        first = peer_id_for(parsed.signer) == peer_id
        if not (parsed.signer == current or (current is None and first)):
            if parsed.signer in known or first:
                raise TrustError(
                    f"the revocation of {peer_id} is signed by an identity key it has succeeded",
                    reason="superseded-signer",
                    hint="only the node's current identity key (or the authority) can revoke it",
                )
            raise TrustError(
                f"the revocation of {peer_id} is signed by a key not known to be its own",
                reason="unknown-signer",
                hint="it may be signed by a successor key we have not seen; meet the peer first",
            )
        parsed.verify_signature()
        if parsed.kind == REVOKE_IDENTITY:
            return RevocationPlan(
                parsed, bytes(statement), self._revoked_record(record, peer_id, now), None
            )
        if parsed.serial <= self.revoked_through(peer_id):
            return RevocationPlan(parsed, bytes(statement), None, None)
        if record is None and peer_id not in self._revoked_through:
            self._check_room()
        return RevocationPlan(parsed, bytes(statement), None, parsed.serial)

    def _revoked_record(
        self, record: PeerTrust | None, peer_id: str, now: float
    ) -> PeerTrust | None:
        if record is None:
            self._check_room()
            return PeerTrust(peer_id, PeerState.REVOKED, updated_at=now)
        if record.state is PeerState.REVOKED:
            return None
        return replace(record, state=PeerState.REVOKED, updated_at=now)

    def _check_room(self) -> None:
        if len(self._peers) >= MAX_PEERS:
            raise LocalProtocolError(f"the trust store holds its maximum of {MAX_PEERS} peers")

    # -- applying committed changes (the store calls these after COMMIT) ------------------

    def put_peer(self, record: PeerTrust) -> None:
        if record.state is not PeerState.REVOKED:
            existing = self._peers.get(record.peer_id)
            if existing is not None and existing.state is PeerState.REVOKED:
                raise LocalProtocolError(f"peer {record.peer_id} is revoked; cannot un-revoke")
        self._peers[record.peer_id] = record
        if record.identities:
            self._unmet_revoked.discard(record.peer_id)
        elif record.state is PeerState.REVOKED:
            self._unmet_revoked.add(record.peer_id)

    def put_revoked_through(self, peer_id: str, serial: int) -> None:
        self._revoked_through[peer_id] = max(serial, self._revoked_through.get(peer_id, 0))
        record = self._peers.get(peer_id)
        if record is None or not record.identities:
            self._unmet_revoked.add(peer_id)

    def put_invite(self, grant: InviteGrant) -> None:
        if len(grant.invite_id) != INVITE_ID_BYTES or len(grant.psk) != PSK_BYTES:
            raise LocalProtocolError("an invite has a 16-byte id and a 32-byte PSK")
        if grant.invite_id not in self._invites and len(self._invites) >= MAX_INVITES:
            raise LocalProtocolError(f"at most {MAX_INVITES} invites may be open at once")
        self._invites[grant.invite_id] = grant

    def drop_invite(self, invite_id: bytes, closed: str | None = None) -> None:
        """Forget an open invite; `closed` ("used", "expired") remembers why, for
        `closed_invite`."""
        invite_id = bytes(invite_id)
        self._invites.pop(invite_id, None)
        if closed is not None:
            self._closed_invites[invite_id] = closed
            self._closed_invites.move_to_end(invite_id)
            while len(self._closed_invites) > MAX_CLOSED_INVITES:
                self._closed_invites.popitem(last=False)

    def closed_invite(self, invite_id: bytes) -> str | None:
        """ "used" or "expired" for an invite this node issued and closed (among the last
        MAX_CLOSED_INVITES), else None (open, or never issued here)."""
        return self._closed_invites.get(bytes(invite_id))

    def open_invite_count(self) -> int:
        return len(self._invites)


def _check_continuity(record: PeerTrust, keys: tuple[bytes, ...]) -> None:
    known = record.identities
    if not known or keys[: len(known)] == known:
        return
    if len(keys) < len(known) and known[: len(keys)] == keys:
        raise Rollback(
            f"peer {record.peer_id} presents an identity key it has since succeeded",
            reason="superseded-identity",
        )
    raise Conflict(
        f"peer {record.peer_id} presents an identity chain that contradicts the pinned one"
    )


def _check_serial(record: PeerTrust, cert: KeyCertificate) -> bool:
    current = record.certificate
    if current is None:
        return True
    if cert.serial < current.serial:
        raise Rollback(
            f"certificate {cert.serial} of {record.peer_id} is older than {current.serial}"
        )
    if cert.serial == current.serial:
        if cert != current:
            raise Conflict(
                f"peer {record.peer_id} has two different certificates with serial {cert.serial}"
            )
        return False
    return True


__all__ = [
    "MAX_SUPERSEDED",
    "Authenticated",
    "InviteGrant",
    "PeerState",
    "PeerTrust",
    "RevocationPlan",
    "Superseded",
    "TrustSource",
    "TrustView",
]
