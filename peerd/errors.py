"""The shell's errors. All derive from `PeerdError` (defined in protocol/errors.py).

Foreign errors (aiomqtt, sqlite, OS) are translated into these at the boundary with
`raise ... from`, so a user sees one line saying what failed and what to do.
"""

from __future__ import annotations

from protocol.errors import (
    DecryptError,
    LocalProtocolError,
    PeerdError,
    ProtocolError,
    RemoteProtocolError,
)

__all__ = [
    "ConfigError",
    "DaemonError",
    "DecryptError",
    "LocalProtocolError",
    "PeerdError",
    "ProtocolError",
    "RemoteProtocolError",
    "UsageError",
]


class UsageError(PeerdError):
    """The command line or an API call was used wrongly."""


class ConfigError(PeerdError):
    """The configuration file is missing, unreadable or invalid."""

    hint = "fix the configuration file or pass --config"


class DaemonError(PeerdError):
    """The daemon cannot start or go on."""
