"""Several broker URLs (`[broker] urls`): which one the link uses, and why it left the others.

A node given the URLs of a broker cluster (or of brokers bridged to each other) must not be
offline while one of them is down (issue 12: with one URL a receiver whose cluster node died
never reconnected anywhere). The link asks `BrokerSet` for the broker to try; after every failed
attempt and every lost connection it `leave()`s that one, naming the reason, and the next
attempt goes to the next URL in order, round the list, under the link's usual backoff. The
reasons stay for `peerd status`: the broker in use and, for each other URL, why it was left.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peerd.mqtt.errors import BrokerSettingsError
from peerd.mqtt.settings import BrokerSettings

__all__ = ["MAX_URLS", "BrokerSet"]

MAX_URLS = 16  # a cluster or a few bridged brokers; a longer list is a mistake


@dataclass(slots=True)
class _Entry:
    settings: BrokerSettings
    last_error: str | None = None
    left_at: float | None = None  # wall-clock time it was last left
    connects: int = 0


class BrokerSet:
    """The brokers a link may use, in order, and the one it uses now."""

    def __init__(self, brokers: Sequence[BrokerSettings]) -> None:
        if not brokers:
            raise BrokerSettingsError("no broker URL given")
        if len(brokers) > MAX_URLS:
            raise BrokerSettingsError(f"{len(brokers)} broker URLs: at most {MAX_URLS}")
        urls = [b.url for b in brokers]
        if len(set(urls)) != len(urls):
            dup = next(u for u in urls if urls.count(u) > 1)
            raise BrokerSettingsError(f"the broker URL {dup} is given twice")
        if len({b.client_id for b in brokers}) != 1:
            raise BrokerSettingsError("every broker URL must log in with the same client id")
        self._entries = [_Entry(b) for b in brokers]
        self._index = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def current(self) -> BrokerSettings:
        """The broker to connect to (or connected to) now."""
        return self._entries[self._index].settings

    def connected(self) -> None:
        """The current broker accepted us: its old reason to be left no longer holds."""
        entry = self._entries[self._index]
        entry.connects += 1
        entry.last_error = None

    def leave(self, why: str, now: float | None = None) -> BrokerSettings:
        """Record why the current broker is left and move to the next; return it. With one
        URL it stays the current one (the reason is still recorded)."""
        entry = self._entries[self._index]
        entry.last_error = why
        entry.left_at = time.time() if now is None else now
        self._index = (self._index + 1) % len(self._entries)
        return self.current

    def all_failing(self) -> bool:
        """Every broker was left and none accepted us since: the node is offline."""
        return all(e.last_error is not None for e in self._entries)

    def view(self) -> list[dict[str, Any]]:
        """For `peerd status`: each URL, whether in use, and why it was last left."""
        return [
            {
                "url": e.settings.url,
                "current": i == self._index,
                "last_error": e.last_error,
                "left_at": e.left_at,
                "connects": e.connects,
            }
            for i, e in enumerate(self._entries)
        ]
