"""What the sending and the receiving side share: the host, the tunables, the rows, the
outcomes, and one task per transfer that the extension stops."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peerd.host import Host
    from peerd.transfers.outcomes import Outcomes
    from peerd.transfers.records import TransferRecords
    from protocol.transfer import TransferConfig


class Side(ABC):
    def __init__(
        self,
        host: Host,
        config: TransferConfig,
        records: TransferRecords,
        outcomes: Outcomes,
    ) -> None:
        self.host = host
        self.config = config
        self.records = records
        self.outcomes = outcomes

    @abstractmethod
    def tasks(self) -> list[asyncio.Task[None]]:
        """The tasks of the transfers under way."""

    @abstractmethod
    def close_files(self) -> None:
        """Close what the transfers under way hold open (after their tasks ended)."""
