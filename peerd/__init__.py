"""peerd: exchange AI model files securely between organisations, through an untrusted broker.

AI code uses `peerd.Client` (async) or `peerd.SyncClient`; both talk to the local daemon.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Client", "SyncClient", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy: the client pulls in the config module (PyNaCl, msgpack); `import peerd` stays cheap.
    if name in ("Client", "SyncClient"):
        from peerd import client  # noqa: PLC0415 - deliberate lazy import

        return getattr(client, name)
    raise AttributeError(f"module 'peerd' has no attribute {name!r}")
