"""Errors of the identity layer.

Every refusal of evidence (a certificate, a statement, a credential bundle, a trust change the
rules forbid) is a `TrustError`, a `RemoteProtocolError` with a stable `reason` label that the
daemon counts. Text typed or pasted by a person (peer id, fingerprint, invite token, authority
key) that does not parse is `InvalidText`, with a hint saying what to check.
"""

from __future__ import annotations

from protocol.errors import ProtocolError, RemoteProtocolError


class InvalidText(ProtocolError):
    """A peer id, fingerprint, token or key typed or pasted by a person does not parse."""

    hint = "check that it was copied completely and without typos"


class TrustError(RemoteProtocolError):
    """Evidence or a trust change was refused by the trust rules."""

    reason = "refused"


class MalformedObject(TrustError):
    """The bytes are not a well-formed, canonical object of the expected kind."""

    reason = "malformed"


class BadSignature(TrustError):
    reason = "bad-signature"
    hint = "the object was forged or corrupted"


class Expired(TrustError):
    reason = "expired"


class NotYetValid(TrustError):
    reason = "not-yet-valid"
    hint = "check that both clocks are right"


class Revoked(TrustError):
    reason = "revoked"


class Rollback(TrustError):
    reason = "rollback"
    hint = "a newer certificate of this peer is already known; old ones are never accepted again"


class UnknownPeer(TrustError):
    reason = "unknown-peer"
    hint = "pair first: `peerd invite` / `peerd join`, or `peerd trust PEER --fingerprint FP`"


class WrongPeer(TrustError):
    reason = "wrong-peer"


class Blocked(TrustError):
    reason = "blocked"


class Conflict(TrustError):
    """Two signed objects of one peer contradict each other (equivocation or a forked chain)."""

    reason = "conflict"


__all__ = [
    "BadSignature",
    "Blocked",
    "Conflict",
    "Expired",
    "InvalidText",
    "MalformedObject",
    "NotYetValid",
    "Revoked",
    "Rollback",
    "TrustError",
    "UnknownPeer",
    "WrongPeer",
]
