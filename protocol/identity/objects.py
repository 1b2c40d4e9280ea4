"""The signed objects of peerd's identity layer, their byte-exact encodings and their checks.

Each object is a msgpack array with a fixed field order, the version first and the signature(s)
last. The signed body is the msgpack array of every field before the signatures; a signature is
Ed25519 over `context || body` with a context label of its own, so a signature made for one kind
of object never verifies as another. `decode` checks structure only (types, lengths, bounds,
canonical form); signatures and validity are checked by `verify*` / `check_validity`, which take
`now` (Unix seconds) from the caller.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

from protocol.errors import LocalProtocolError
from protocol.identity._codec import (
    ED25519_PUBLIC_BYTES,
    ED25519_SIGNATURE_BYTES,
    MAX_INT_FIELD,
    X25519_PUBLIC_BYTES,
    ed25519_public,
    pack,
    sign,
    unpack,
    verify,
    want_blob,
    want_bytes,
    want_int,
    want_str,
    want_version,
)
from protocol.identity.errors import (
    BadSignature,
    Conflict,
    Expired,
    InvalidText,
    MalformedObject,
    NotYetValid,
)
from protocol.identity.ids import is_peer_id, peer_id_for

VERSION = 1
DAY = 86400
# A clock ahead of ours by this much still sees a fresh certificate as valid.
CLOCK_SKEW = 300
MAX_CERTIFICATE_LIFETIME = 400 * DAY
MAX_MEMBERSHIP_LIFETIME = 3660 * DAY
MAX_CHAIN = 32  # identity successions a peer may present
MAX_REASON_BYTES = 256
MAX_TIME = 2**53  # integer seconds; far beyond any real date, exact in a double
MAX_OBJECT_SIZE = 1024  # every single signed object is far smaller
MAX_CREDENTIALS_SIZE = 16384  # a full chain of MAX_CHAIN successions fits with room to spare

CERT_CONTEXT = b"peerd/v1/cert\0"
SUCCESSION_CONTEXT = b"peerd/v1/succession\0"
SUCCESSION_ACCEPT_CONTEXT = b"peerd/v1/succession-accept\0"
REVOCATION_CONTEXT = b"peerd/v1/revocation\0"
MEMBERSHIP_CONTEXT = b"peerd/v1/membership\0"
AUTHORITY_REVOCATION_CONTEXT = b"peerd/v1/authority-revocation\0"

# One MQTT topic level and part of the prologue (SPEC sections 1.1 and 2.1).
_NETWORK_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def check_network_name(name: str) -> str:
    """A network name: 1..32 lowercase letters, digits and '-', not starting with '-'."""
    if not isinstance(name, str) or not _NETWORK_RE.fullmatch(name):
        raise InvalidText(
            f"{name!r} is not a valid network name",
            hint="use 1 to 32 lowercase letters, digits or '-', starting with a letter or digit",
        )
    return name


def _want_peer_id(value: Any, what: str) -> str:
    text = want_str(value, what, 64)
    if not is_peer_id(text):
        raise MalformedObject(f"{what} is not a canonical peer id")
    return text


def _want_network(value: Any, what: str) -> str:
    text = want_str(value, what, 64)
    try:
        return check_network_name(text)
    except InvalidText as exc:
        raise MalformedObject(f"{what} is not a valid network name") from exc


def _want_window(nb: Any, na: Any, what: str, max_lifetime: int) -> tuple[int, int]:
    not_before = want_int(nb, f"{what} not_before", hi=MAX_TIME)
    not_after = want_int(na, f"{what} not_after", hi=MAX_TIME)
    if not_after <= not_before:
        raise MalformedObject(f"{what}: not_after must be later than not_before")
    if not_after - not_before > max_lifetime:
        raise MalformedObject(f"{what}: validity longer than {max_lifetime // DAY} days")
    return not_before, not_after


def _check_window(not_before: int, not_after: int, now: float, what: str) -> None:
    if now + CLOCK_SKEW < not_before:
        raise NotYetValid(f"{what} is not valid before {not_before} (now {int(now)})")
    if now >= not_after:
        raise Expired(f"{what} expired at {not_after} (now {int(now)})")


def _time(now: float) -> int:
    if not 0 <= now < MAX_TIME:
        raise LocalProtocolError(f"now={now!r} is not a plausible Unix time")
    return int(now)


# -- key certificate ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyCertificate:
    """The identity key's statement "my Noise static key is `static_public`", with a serial.

    `peer_id` is the id of the node (derived from its first identity key), `identity_public` the
    key that signs (the node's current identity key).
    """

    peer_id: str
    identity_public: bytes
    static_public: bytes
    serial: int
    not_before: int
    not_after: int
    signature: bytes

    def _signed_fields(self) -> list[Any]:
        return [
            VERSION,
            self.peer_id,
            self.identity_public,
            self.static_public,
            self.serial,
            self.not_before,
            self.not_after,
        ]

    def body(self) -> bytes:
        return pack(self._signed_fields())

    def encode(self) -> bytes:
        return pack([*self._signed_fields(), self.signature])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="key certificate", max_size=MAX_OBJECT_SIZE, length=8)
        want_version(f[0], "key certificate", VERSION)
        not_before, not_after = _want_window(
            f[5], f[6], "key certificate", MAX_CERTIFICATE_LIFETIME
        )
        return cls(
            peer_id=_want_peer_id(f[1], "certificate peer id"),
            identity_public=want_bytes(f[2], "certificate identity key", ED25519_PUBLIC_BYTES),
            static_public=want_bytes(f[3], "certificate static key", X25519_PUBLIC_BYTES),
            serial=want_int(f[4], "certificate serial", lo=1),
            not_before=not_before,
            not_after=not_after,
            signature=want_bytes(f[7], "certificate signature", ED25519_SIGNATURE_BYTES),
        )

    def verify_signature(self) -> None:
        verify(
            self.identity_public,
            CERT_CONTEXT,
            self.body(),
            self.signature,
            what=f"key certificate {self.serial} of {self.peer_id}",
        )

    def check_validity(self, now: float) -> None:
        _check_window(self.not_before, self.not_after, now, f"key certificate {self.serial}")


def issue_certificate(
    identity_seed: bytes,
    *,
    peer_id: str,
    static_public: bytes,
    serial: int,
    now: float,
    lifetime: int,
) -> KeyCertificate:
    """Sign a certificate valid from `now` for `lifetime` seconds."""
    if not is_peer_id(peer_id):
        raise LocalProtocolError(f"{peer_id!r} is not a canonical peer id")
    if len(static_public) != X25519_PUBLIC_BYTES:
        raise LocalProtocolError("a static public key is 32 bytes")
    if not 1 <= serial <= MAX_INT_FIELD:
        raise LocalProtocolError("a certificate serial is 1 .. 2^63-1")
    if not 0 < lifetime <= MAX_CERTIFICATE_LIFETIME:
        raise LocalProtocolError(f"a certificate lifetime is 1 .. {MAX_CERTIFICATE_LIFETIME} s")
    start = _time(now)
    unsigned = KeyCertificate(
        peer_id, ed25519_public(identity_seed), static_public, serial, start, start + lifetime, b""
    )
    return replace(unsigned, signature=sign(identity_seed, CERT_CONTEXT, unsigned.body()))


# -- identity succession -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Succession:
    """Identity key `old` hands the peer id over to identity key `new` (link `index` of a chain).

    Signed by the old key (authority to hand over) and countersigned by the new key (proof that
    whoever made the record holds it).
    """

    peer_id: str
    index: int
    old_identity: bytes
    new_identity: bytes
    issued_at: int
    old_signature: bytes
    new_signature: bytes

    def _signed_fields(self) -> list[Any]:
        return [
            VERSION,
            self.peer_id,
            self.index,
            self.old_identity,
            self.new_identity,
            self.issued_at,
        ]

    def body(self) -> bytes:
        return pack(self._signed_fields())

    def encode(self) -> bytes:
        return pack([*self._signed_fields(), self.old_signature, self.new_signature])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="identity succession", max_size=MAX_OBJECT_SIZE, length=8)
        want_version(f[0], "identity succession", VERSION)
        old = want_bytes(f[3], "succession old key", ED25519_PUBLIC_BYTES)
        new = want_bytes(f[4], "succession new key", ED25519_PUBLIC_BYTES)
        if old == new:
            raise MalformedObject("an identity succession must change the key")
        return cls(
            peer_id=_want_peer_id(f[1], "succession peer id"),
            index=want_int(f[2], "succession index", lo=1, hi=MAX_CHAIN),
            old_identity=old,
            new_identity=new,
            issued_at=want_int(f[5], "succession time", hi=MAX_TIME),
            old_signature=want_bytes(f[6], "succession signature", ED25519_SIGNATURE_BYTES),
            new_signature=want_bytes(f[7], "succession countersignature", ED25519_SIGNATURE_BYTES),
        )

    def verify_signatures(self) -> None:
        body = self.body()
        what = f"identity succession {self.index} of {self.peer_id}"
        verify(self.old_identity, SUCCESSION_CONTEXT, body, self.old_signature, what=what)
        verify(self.new_identity, SUCCESSION_ACCEPT_CONTEXT, body, self.new_signature, what=what)


def issue_succession(
    old_seed: bytes, new_seed: bytes, *, peer_id: str, index: int, now: float
) -> Succession:
    if not 1 <= index <= MAX_CHAIN:
        raise LocalProtocolError(f"an identity chain has at most {MAX_CHAIN} successions")
    old, new = ed25519_public(old_seed), ed25519_public(new_seed)
    if old == new:
        raise LocalProtocolError("a succession needs a new identity key")
    unsigned = Succession(peer_id, index, old, new, _time(now), b"", b"")
    body = unsigned.body()
    return replace(
        unsigned,
        old_signature=sign(old_seed, SUCCESSION_CONTEXT, body),
        new_signature=sign(new_seed, SUCCESSION_ACCEPT_CONTEXT, body),
    )


def verify_chain(peer_id: str, chain: Sequence[Succession], first: bytes) -> tuple[bytes, ...]:
    """The identity keys of `peer_id`, first to current, after checking every link.

    `first` is the first identity key: it must hash to `peer_id`; each link must start from the
    key the previous one ended with, carry the next index, and be signed by both keys.
    """
    if peer_id_for(first) != peer_id:
        raise BadSignature(f"the first identity key does not belong to peer {peer_id}")
    if len(chain) > MAX_CHAIN:
        raise MalformedObject(f"an identity chain has at most {MAX_CHAIN} successions")
    keys = [first]
    for position, link in enumerate(chain, start=1):
        if link.peer_id != peer_id:
            raise Conflict(f"succession {position} is for another peer ({link.peer_id})")
        if link.index != position:
            raise MalformedObject(f"succession {position} has index {link.index}")
        if link.old_identity != keys[-1]:
            raise Conflict(f"succession {position} does not continue the chain")
        if link.new_identity in keys:
            raise MalformedObject(f"succession {position} returns to an earlier identity key")
        link.verify_signatures()
        keys.append(link.new_identity)
    return tuple(keys)


# -- revocation statements ---------------------------------------------------------------------

REVOKE_STATIC = "static"
REVOKE_IDENTITY = "identity"


@dataclass(frozen=True, slots=True)
class Revocation:
    """A node's own statement that its key(s) must no longer be trusted.

    `kind == "static"`: every key certificate of `peer_id` with a serial <= `serial` is revoked.
    `kind == "identity"`: the whole peer id is revoked (`serial` is 0). `signer` is one of the
    node's identity keys (its first key, or one its succession chain leads to).
    """

    kind: str
    peer_id: str
    signer: bytes
    serial: int
    issued_at: int
    reason: str
    signature: bytes

    def _signed_fields(self) -> list[Any]:
        return [
            VERSION,
            self.kind,
            self.peer_id,
            self.signer,
            self.serial,
            self.issued_at,
            self.reason,
        ]

    def body(self) -> bytes:
        return pack(self._signed_fields())

    def encode(self) -> bytes:
        return pack([*self._signed_fields(), self.signature])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="revocation", max_size=MAX_OBJECT_SIZE, length=8)
        want_version(f[0], "revocation", VERSION)
        kind = want_str(f[1], "revocation kind", 16)
        if kind == REVOKE_STATIC:
            serial = want_int(f[4], "revoked serial", lo=1)
        elif kind == REVOKE_IDENTITY:
            serial = want_int(f[4], "revoked serial", lo=0, hi=0)
        else:
            raise MalformedObject(f"unknown revocation kind {kind!r}")
        return cls(
            kind=kind,
            peer_id=_want_peer_id(f[2], "revocation peer id"),
            signer=want_bytes(f[3], "revocation signer", ED25519_PUBLIC_BYTES),
            serial=serial,
            issued_at=want_int(f[5], "revocation time", hi=MAX_TIME),
            reason=want_str(f[6], "revocation reason", MAX_REASON_BYTES),
            signature=want_bytes(f[7], "revocation signature", ED25519_SIGNATURE_BYTES),
        )

    def verify_signature(self) -> None:
        verify(
            self.signer,
            REVOCATION_CONTEXT,
            self.body(),
            self.signature,
            what=f"revocation of {self.peer_id}",
        )


def issue_revocation(
    identity_seed: bytes,
    *,
    peer_id: str,
    kind: str,
    now: float,
    serial: int = 0,
    reason: str = "",
) -> Revocation:
    if kind == REVOKE_STATIC and not 1 <= serial <= MAX_INT_FIELD:
        raise LocalProtocolError("a static-key revocation names a serial >= 1")
    if kind == REVOKE_IDENTITY and serial != 0:
        raise LocalProtocolError("an identity revocation has serial 0")
    if kind not in (REVOKE_STATIC, REVOKE_IDENTITY):
        raise LocalProtocolError(f"unknown revocation kind {kind!r}")
    if len(reason.encode("utf-8")) > MAX_REASON_BYTES:
        raise LocalProtocolError(f"a revocation reason has at most {MAX_REASON_BYTES} bytes")
    signer = ed25519_public(identity_seed)
    unsigned = Revocation(kind, peer_id, signer, serial, _time(now), reason, b"")
    return replace(unsigned, signature=sign(identity_seed, REVOCATION_CONTEXT, unsigned.body()))


# -- authority mode ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Membership:
    """The network authority's certificate: `peer_id` with identity key `identity_public` is a
    member of `network` from `not_before` to `not_after`."""

    network: str
    peer_id: str
    identity_public: bytes
    authority_public: bytes
    not_before: int
    not_after: int
    signature: bytes

    def _signed_fields(self) -> list[Any]:
        return [
            VERSION,
            self.network,
            self.peer_id,
            self.identity_public,
            self.authority_public,
            self.not_before,
            self.not_after,
        ]

    def body(self) -> bytes:
        return pack(self._signed_fields())

    def encode(self) -> bytes:
        return pack([*self._signed_fields(), self.signature])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="membership certificate", max_size=MAX_OBJECT_SIZE, length=8)
        want_version(f[0], "membership certificate", VERSION)
        not_before, not_after = _want_window(f[5], f[6], "membership", MAX_MEMBERSHIP_LIFETIME)
        return cls(
            network=_want_network(f[1], "membership network"),
            peer_id=_want_peer_id(f[2], "membership peer id"),
            identity_public=want_bytes(f[3], "membership identity key", ED25519_PUBLIC_BYTES),
            authority_public=want_bytes(f[4], "membership authority key", ED25519_PUBLIC_BYTES),
            not_before=not_before,
            not_after=not_after,
            signature=want_bytes(f[7], "membership signature", ED25519_SIGNATURE_BYTES),
        )

    def verify_signature(self) -> None:
        verify(
            self.authority_public,
            MEMBERSHIP_CONTEXT,
            self.body(),
            self.signature,
            what=f"membership certificate of {self.peer_id}",
        )

    def check_validity(self, now: float) -> None:
        _check_window(self.not_before, self.not_after, now, "membership certificate")


def issue_membership(
    authority_seed: bytes,
    *,
    network: str,
    peer_id: str,
    identity_public: bytes,
    now: float,
    lifetime: int,
) -> Membership:
    check_network_name(network)
    if not is_peer_id(peer_id):
        raise LocalProtocolError(f"{peer_id!r} is not a canonical peer id")
    if len(identity_public) != ED25519_PUBLIC_BYTES:
        raise LocalProtocolError("an identity public key is 32 bytes")
    if not 0 < lifetime <= MAX_MEMBERSHIP_LIFETIME:
        raise LocalProtocolError(f"a membership lifetime is 1 .. {MAX_MEMBERSHIP_LIFETIME} s")
    start = _time(now)
    authority = ed25519_public(authority_seed)
    unsigned = Membership(
        network, peer_id, identity_public, authority, start, start + lifetime, b""
    )
    return replace(unsigned, signature=sign(authority_seed, MEMBERSHIP_CONTEXT, unsigned.body()))


@dataclass(frozen=True, slots=True)
class AuthorityRevocation:
    """The network authority's statement that `peer_id` is no longer a member of `network`;
    nodes that trust the authority revoke the peer entirely."""

    network: str
    peer_id: str
    authority_public: bytes
    issued_at: int
    reason: str
    signature: bytes

    def _signed_fields(self) -> list[Any]:
        return [
            VERSION,
            self.network,
            self.peer_id,
            self.authority_public,
            self.issued_at,
            self.reason,
        ]

    def body(self) -> bytes:
        return pack(self._signed_fields())

    def encode(self) -> bytes:
        return pack([*self._signed_fields(), self.signature])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="authority revocation", max_size=MAX_OBJECT_SIZE, length=7)
        want_version(f[0], "authority revocation", VERSION)
        return cls(
            network=_want_network(f[1], "authority revocation network"),
            peer_id=_want_peer_id(f[2], "authority revocation peer id"),
            authority_public=want_bytes(f[3], "authority key", ED25519_PUBLIC_BYTES),
            issued_at=want_int(f[4], "authority revocation time", hi=MAX_TIME),
            reason=want_str(f[5], "authority revocation reason", MAX_REASON_BYTES),
            signature=want_bytes(f[6], "authority revocation signature", ED25519_SIGNATURE_BYTES),
        )

    def verify_signature(self) -> None:
        verify(
            self.authority_public,
            AUTHORITY_REVOCATION_CONTEXT,
            self.body(),
            self.signature,
            what=f"authority revocation of {self.peer_id}",
        )


def issue_authority_revocation(
    authority_seed: bytes, *, network: str, peer_id: str, now: float, reason: str = ""
) -> AuthorityRevocation:
    check_network_name(network)
    if not is_peer_id(peer_id):
        raise LocalProtocolError(f"{peer_id!r} is not a canonical peer id")
    if len(reason.encode("utf-8")) > MAX_REASON_BYTES:
        raise LocalProtocolError(f"a revocation reason has at most {MAX_REASON_BYTES} bytes")
    authority = ed25519_public(authority_seed)
    unsigned = AuthorityRevocation(network, peer_id, authority, _time(now), reason, b"")
    signature = sign(authority_seed, AUTHORITY_REVOCATION_CONTEXT, unsigned.body())
    return replace(unsigned, signature=signature)


def decode_statement(data: bytes) -> Revocation | AuthorityRevocation:
    """A revocation statement of either kind; they differ in field count (8 and 7), so the
    first byte of the canonical encoding (a msgpack fixarray header) tells them apart."""
    head = bytes(data[:1])
    if head == b"\x98":
        return Revocation.decode(data)
    if head == b"\x97":
        return AuthorityRevocation.decode(data)
    raise MalformedObject("not a revocation statement")


# -- the credential bundle of a handshake -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a node sends inside its Noise handshake payload to prove who it is."""

    successions: tuple[Succession, ...]
    certificate: KeyCertificate
    membership: Membership | None = None

    def encode(self) -> bytes:
        return pack(
            [
                VERSION,
                [s.encode() for s in self.successions],
                self.certificate.encode(),
                None if self.membership is None else self.membership.encode(),
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="credentials", max_size=MAX_CREDENTIALS_SIZE, length=4)
        want_version(f[0], "credentials", VERSION)
        if not isinstance(f[1], list) or len(f[1]) > MAX_CHAIN:
            raise MalformedObject(f"credentials: a chain of at most {MAX_CHAIN} successions")
        chain = tuple(Succession.decode(want_blob(s, "succession", MAX_OBJECT_SIZE)) for s in f[1])
        cert = KeyCertificate.decode(want_blob(f[2], "certificate", MAX_OBJECT_SIZE))
        membership = (
            None
            if f[3] is None
            else Membership.decode(want_blob(f[3], "membership", MAX_OBJECT_SIZE))
        )
        return cls(chain, cert, membership)

    @property
    def peer_id(self) -> str:
        return self.certificate.peer_id

    def first_identity(self) -> bytes:
        return (
            self.successions[0].old_identity
            if self.successions
            else (self.certificate.identity_public)
        )

    def verify(self, now: float) -> tuple[bytes, ...]:
        """Check the chain, the certificate's signature and validity; the identity keys.

        Says nothing about whether the peer is trusted (that is `TrustView.authenticate`) nor
        about the membership (checked against the configured authority key there).
        """
        keys = self.verify_signatures()
        self.certificate.check_validity(now)
        return keys

    def verify_signatures(self) -> tuple[bytes, ...]:
        """The time-independent part of `verify`: chain and certificate signatures."""
        cert = self.certificate
        keys = verify_chain(cert.peer_id, self.successions, self.first_identity())
        if cert.identity_public != keys[-1]:
            raise Conflict("the certificate is not signed by the current identity key")
        cert.verify_signature()
        return keys


__all__ = [
    "AUTHORITY_REVOCATION_CONTEXT",
    "CERT_CONTEXT",
    "CLOCK_SKEW",
    "MAX_CERTIFICATE_LIFETIME",
    "MAX_CHAIN",
    "MAX_CREDENTIALS_SIZE",
    "MAX_MEMBERSHIP_LIFETIME",
    "MEMBERSHIP_CONTEXT",
    "REVOCATION_CONTEXT",
    "REVOKE_IDENTITY",
    "REVOKE_STATIC",
    "SUCCESSION_ACCEPT_CONTEXT",
    "SUCCESSION_CONTEXT",
    "AuthorityRevocation",
    "Credentials",
    "KeyCertificate",
    "Membership",
    "Revocation",
    "Succession",
    "check_network_name",
    "decode_statement",
    "issue_authority_revocation",
    "issue_certificate",
    "issue_membership",
    "issue_revocation",
    "issue_succession",
    "verify_chain",
]
