"""The text forms of authority mode people copy between machines.

One line each, checksummed like invite tokens, so a damaged paste is reported rather than
misread: `peerd-member-request-1-...` (what a member asks the authority to sign: network, peer
id, current identity key), `peerd-membership-1-...` (the signed certificate) and
`peerd-revocation-1-...` (any revocation statement, so one can be carried to a node that
publishes it). Each is `prefix version "-" base32(payload || check)` with `check` the first 4
bytes of BLAKE2b-256(context || payload), base32 and parsing as in spec 6.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Self

from peerd.errors import PeerdError
from protocol.identity import (
    AuthorityRevocation,
    InvalidText,
    MalformedObject,
    Membership,
    Revocation,
    check_network_name,
    decode_statement,
    fingerprint,
    format_authority_key,
    is_peer_id,
)
from protocol.identity._codec import (
    bytes_to_text,
    decode_symbols,
    digest,
    pack,
    text_to_bytes,
    unpack,
    want_bytes,
    want_str,
    want_version,
)

TEXT_VERSION: Final = 1
_CHECK_BYTES: Final = 4
MAX_TEXT: Final = 4096  # characters of a pasted text form; the largest (a statement) is ~1.7 k

# -- text forms ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TextForm:
    prefix: str
    context: bytes
    what: str
    hint: str

    def encode(self, payload: bytes) -> str:
        check = digest(self.context, payload)[:_CHECK_BYTES]
        return f"{self.prefix}{TEXT_VERSION}-{bytes_to_text(payload + check)}"

    def decode(self, text: str) -> bytes:
        if len(text) > MAX_TEXT:
            raise InvalidText(f"this is too long to be a {self.what}", hint=self.hint)
        cleaned = "".join(text.split()).lower()
        if not cleaned.startswith(self.prefix):
            raise InvalidText(f"this is not a {self.what} ({self.prefix}...)", hint=self.hint)
        version, sep, body = cleaned[len(self.prefix) :].partition("-")
        # ASCII digits only, and few (see InviteToken.from_text: found by fuzzing).
        if not sep or not (version.isascii() and version.isdigit()) or len(version) > 6:
            raise InvalidText(f"the {self.what} has no version", hint=self.hint)
        if int(version) != TEXT_VERSION:
            raise InvalidText(
                f"the {self.what} has version {version}; this peerd reads version {TEXT_VERSION}",
                hint="use a peerd of the same version on both sides",
            )
        raw = text_to_bytes(
            decode_symbols(body, what=self.what, hint=self.hint), what=self.what, hint=self.hint
        )
        if len(raw) <= _CHECK_BYTES:
            raise InvalidText(f"the {self.what} is truncated", hint=self.hint)
        payload, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
        if digest(self.context, payload)[:_CHECK_BYTES] != check:
            raise InvalidText(f"the {self.what} is damaged (checksum mismatch)", hint=self.hint)
        return payload


REQUEST_TEXT = _TextForm(
    "peerd-member-request-",
    b"peerd/v1/member-request\0",
    "membership request",
    "copy the whole line `peerd membership request` printed on the member",
)
MEMBERSHIP_TEXT = _TextForm(
    "peerd-membership-",
    b"peerd/v1/membership-text\0",
    "membership certificate",
    "copy the whole line `peerd authority issue` printed",
)
STATEMENT_TEXT = _TextForm(
    "peerd-revocation-",
    b"peerd/v1/revocation-text\0",
    "revocation statement",
    "copy the whole line `peerd authority revoke` or `peerd revoke --identity` printed",
)


@dataclass(frozen=True, slots=True)
class MembershipRequest:
    """What a member asks the authority to certify. Unsigned on purpose: a certificate for
    someone else's key is useless to whoever asked, since only the key's holder can present it;
    the authority decides *whom* to admit by comparing the fingerprint out of band."""

    network: str
    peer_id: str
    identity_public: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity_public)

    def encode(self) -> bytes:
        return pack([TEXT_VERSION, self.network, self.peer_id, self.identity_public])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="membership request", max_size=128, length=4)
        want_version(f[0], "membership request", TEXT_VERSION)
        network = want_str(f[1], "membership request network", 32)
        peer_id = want_str(f[2], "membership request peer id", 23)
        if not is_peer_id(peer_id):
            raise MalformedObject("the membership request names no valid peer id")
        try:
            check_network_name(network)
        except PeerdError as exc:
            raise MalformedObject(f"the membership request's network: {exc}") from exc
        return cls(network, peer_id, want_bytes(f[3], "membership request identity key", 32))

    def to_text(self) -> str:
        return REQUEST_TEXT.encode(self.encode())

    @classmethod
    def from_text(cls, text: str) -> Self:
        payload = REQUEST_TEXT.decode(text)
        try:
            return cls.decode(payload)
        except MalformedObject as exc:
            raise InvalidText(f"the membership request is invalid: {exc}") from exc


def membership_to_text(membership: Membership) -> str:
    return MEMBERSHIP_TEXT.encode(membership.encode())


def membership_from_text(text: str) -> Membership:
    payload = MEMBERSHIP_TEXT.decode(text)
    try:
        return Membership.decode(payload)
    except MalformedObject as exc:
        raise InvalidText(f"the membership certificate is invalid: {exc}") from exc


def statement_to_text(statement: bytes) -> str:
    return STATEMENT_TEXT.encode(statement)


def statement_from_text(text: str) -> bytes:
    """The encoded statement (either kind), checked to decode; signatures are not checked."""
    payload = STATEMENT_TEXT.decode(text)
    try:
        decode_statement(payload)
    except MalformedObject as exc:
        raise InvalidText(f"the revocation statement is invalid: {exc}") from exc
    return payload


def describe_statement(statement: Revocation | AuthorityRevocation) -> dict[str, Any]:
    if isinstance(statement, AuthorityRevocation):
        return {
            "peer": statement.peer_id,
            "kind": "authority",
            "network": statement.network,
            "authority_key": format_authority_key(statement.authority_public),
            "issued_at": statement.issued_at,
            "reason": statement.reason,
        }
    return {
        "peer": statement.peer_id,
        "kind": statement.kind,
        "serial": statement.serial,
        "issued_at": statement.issued_at,
        "reason": statement.reason,
    }


def describe_membership(membership: Membership) -> dict[str, Any]:
    return {
        "peer": membership.peer_id,
        "network": membership.network,
        "fingerprint": fingerprint(membership.identity_public),
        "authority_key": format_authority_key(membership.authority_public),
        "not_before": membership.not_before,
        "not_after": membership.not_after,
    }
