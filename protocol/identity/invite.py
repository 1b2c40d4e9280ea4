"""Invite tokens: one line of text that lets a new node pair with the inviter.

The token carries the network, the inviter's peer id and identity key (so the joiner pins the
right inviter, not whoever answers first), a random invite id (so the inviter finds the PSK), a
one-time random 32-byte PSK for `Noise_XXhfs+psk3_25519+MLKEM768_ChaChaPoly_BLAKE2b`, and an
expiry. Whoever holds the token can join once: it is a secret, like a password, until it is
used or expires.

Text form: `peerd-invite-1-` then Crockford base32 (lowercase) of `payload || check`, where
`payload` is the msgpack array below and `check` the first 4 bytes of
BLAKE2b-256("peerd/v1/invite\\0" || payload). Parsing ignores case, spaces, dashes and line
breaks in the base32 part, so a token survives being wrapped by a mail client.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

import nacl.utils

from protocol.errors import LocalProtocolError
from protocol.identity._codec import (
    ED25519_PUBLIC_BYTES,
    bytes_to_text,
    decode_symbols,
    digest,
    pack,
    text_to_bytes,
    unpack,
    want_bytes,
    want_int,
    want_str,
    want_version,
)
from protocol.identity.errors import Expired, InvalidText, MalformedObject
from protocol.identity.ids import is_peer_id
from protocol.identity.objects import MAX_TIME, check_network_name

TOKEN_VERSION = 1
TOKEN_PREFIX = "peerd-invite-"  # noqa: S105 - a label, not a secret
INVITE_ID_BYTES = 16
PSK_BYTES = 32
MAX_INVITE_TTL = 30 * 86400
MAX_TOKEN_PAYLOAD = 256
_CHECK_CONTEXT = b"peerd/v1/invite\0"
_CHECK_BYTES = 4
_HINT = "copy the whole token, as printed by `peerd invite` (one line starting peerd-invite-)"


@dataclass(frozen=True, slots=True, repr=False)
class InviteToken:
    network: str
    inviter: str
    inviter_identity: bytes
    invite_id: bytes
    psk: bytes
    expires_at: int

    def __repr__(self) -> str:  # the PSK is a secret: never in logs or tracebacks
        return (
            f"InviteToken(network={self.network!r}, inviter={self.inviter!r}, "
            f"invite_id={self.invite_id.hex()}, expires_at={self.expires_at})"
        )

    def encode(self) -> bytes:
        return pack(
            [
                TOKEN_VERSION,
                self.network,
                self.inviter,
                self.inviter_identity,
                self.invite_id,
                self.psk,
                self.expires_at,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="invite token", max_size=MAX_TOKEN_PAYLOAD, length=7)
        want_version(f[0], "invite token", TOKEN_VERSION)
        network = want_str(f[1], "invite network", 64)
        inviter = want_str(f[2], "inviter peer id", 64)
        if not is_peer_id(inviter):
            raise MalformedObject("invite token: the inviter is not a canonical peer id")
        try:
            check_network_name(network)
        except InvalidText as exc:
            raise MalformedObject("invite token: not a valid network name") from exc
        return cls(
            network=network,
            inviter=inviter,
            inviter_identity=want_bytes(f[3], "inviter identity key", ED25519_PUBLIC_BYTES),
            invite_id=want_bytes(f[4], "invite id", INVITE_ID_BYTES),
            psk=want_bytes(f[5], "invite PSK", PSK_BYTES),
            expires_at=want_int(f[6], "invite expiry", hi=MAX_TIME),
        )

    def to_text(self) -> str:
        payload = self.encode()
        check = digest(_CHECK_CONTEXT, payload)[:_CHECK_BYTES]
        return f"{TOKEN_PREFIX}{TOKEN_VERSION}-{bytes_to_text(payload + check)}"

    @classmethod
    def from_text(cls, text: str) -> Self:
        """Parse a pasted token; `InvalidText` says what is wrong with it."""
        cleaned = "".join(text.split()).lower()
        if not cleaned.startswith(TOKEN_PREFIX):
            raise InvalidText("this is not a peerd invite token", hint=_HINT)
        version_text, sep, body = cleaned[len(TOKEN_PREFIX) :].partition("-")
        # ASCII digits only, and few: str.isdigit() also takes '²', which int() refuses, and
        # int() refuses more than 4300 digits (found by fuzzing).
        if (
            not sep
            or not (version_text.isascii() and version_text.isdigit())
            or (len(version_text) > 6)
        ):
            raise InvalidText("the invite token has no version", hint=_HINT)
        if int(version_text) != TOKEN_VERSION:
            raise InvalidText(
                f"the invite token has version {version_text}; this peerd reads version "
                f"{TOKEN_VERSION}",
                hint="upgrade peerd, or ask for a token from a peerd of the same version",
            )
        symbols = decode_symbols(body, what="invite token", hint=_HINT)
        raw = text_to_bytes(symbols, what="invite token", hint=_HINT)
        if len(raw) <= _CHECK_BYTES:
            raise InvalidText("the invite token is truncated", hint=_HINT)
        payload, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
        if digest(_CHECK_CONTEXT, payload)[:_CHECK_BYTES] != check:
            raise InvalidText("the invite token is damaged (checksum mismatch)", hint=_HINT)
        try:
            return cls.decode(payload)
        except MalformedObject as exc:
            raise InvalidText(f"the invite token is invalid: {exc}", hint=_HINT) from exc

    def check_fresh(self, now: float) -> None:
        if now >= self.expires_at:
            raise Expired(
                f"the invite token expired at {_utc(self.expires_at)}"
                f" ({_ago(now - self.expires_at)} ago)",
                hint="ask the inviter for a new token",
            )


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(seconds: float) -> str:
    """A short human span: 42 s, 17 min, 5 h, 3 days."""
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} days"


def new_invite(
    *, network: str, inviter: str, inviter_identity: bytes, now: float, ttl: float
) -> InviteToken:
    """A fresh token with a random invite id and PSK from the OS CSPRNG."""
    check_network_name(network)
    if not is_peer_id(inviter):
        raise LocalProtocolError(f"{inviter!r} is not a canonical peer id")
    if len(inviter_identity) != ED25519_PUBLIC_BYTES:
        raise LocalProtocolError("an identity public key is 32 bytes")
    if not 0 < ttl <= MAX_INVITE_TTL:
        raise LocalProtocolError(f"an invite lives 1 s .. {MAX_INVITE_TTL // 86400} days")
    return InviteToken(
        network=network,
        inviter=inviter,
        inviter_identity=inviter_identity,
        invite_id=nacl.utils.random(INVITE_ID_BYTES),
        psk=nacl.utils.random(PSK_BYTES),
        expires_at=int(now + ttl),
    )


__all__ = [
    "INVITE_ID_BYTES",
    "MAX_INVITE_TTL",
    "PSK_BYTES",
    "TOKEN_PREFIX",
    "InviteToken",
    "new_invite",
]
