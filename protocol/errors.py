"""The root of peerd's error hierarchy and the protocol's own errors.

`PeerdError` lives here, not in `peerd/`, because `protocol/` must not import the shell while
both packages raise errors of the one hierarchy. The protocol distinguishes local misuse (our own
code asked for something impossible: a bug or a bad argument) from remote misbehaviour (the bytes
we were given are malformed, forged or out of place), as h11 does: the shell answers the first by
failing loudly and the second by counting, logging and dropping.
"""

from __future__ import annotations


class PeerdError(Exception):
    """Every error peerd raises on purpose.

    `hint` is what the user can do about it, shown after the message on the one line a user sees.
    """

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        text = str(self) or type(self).__name__
        return f"{text} ({self.hint})" if self.hint else text


class ProtocolError(PeerdError):
    """A rule of the wire protocol was broken, locally or remotely."""


class LocalProtocolError(ProtocolError):
    """Local misuse: this side asked the protocol for something it must not do."""


class RemoteProtocolError(ProtocolError):
    """Remote misbehaviour: the bytes received break the protocol.

    `reason` is a short, stable, machine-readable label used to count rejections.
    """

    reason: str = "malformed"

    def __init__(self, message: str, *, reason: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        if reason is not None:
            self.reason = reason


class DecryptError(RemoteProtocolError):
    """An AEAD tag did not verify: the message was forged, corrupted or meant for another key."""

    reason = "decrypt"
