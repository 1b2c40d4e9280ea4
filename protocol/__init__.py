"""The peerd wire protocol, sans-IO.

Everything in this package is pure: it takes bytes and the current time and returns bytes and
events. It never reads a clock, opens a file or a socket, or touches asyncio; `scripts/check`
enforces that. The language-neutral specification is `protocol/SPEC.md`.
"""

from protocol.errors import (
    DecryptError,
    LocalProtocolError,
    PeerdError,
    ProtocolError,
    RemoteProtocolError,
)

__all__ = [
    "DecryptError",
    "LocalProtocolError",
    "PeerdError",
    "ProtocolError",
    "RemoteProtocolError",
]
