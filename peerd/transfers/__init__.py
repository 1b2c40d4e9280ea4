"""File transfers: the daemon's shell around `protocol.transfer`'s state machines.

- `extension.py`: the `Transfers` extension (`peerd.host.Extension`): routes peers' control
  messages, resumes at start-up, implements the control methods;
- `rpc.py`: the control methods' parameters (`v1.send`, `v1.transfers`, `v1.transfer.wait`,
  `v1.transfer.received`, `v1.cancel`);
- `sending.py`, `receiving.py`: one side each, around `SenderTransfer` / `ReceiverTransfer`;
- `records.py`: the `transfers` table of the trust store (all the SQL);
- `files.py`: the source file, space reservation, and the durable final link;
- `outcomes.py`: transfers that ended, for listing and waiting.

Memory per transfer is two chunk-sized buffers and the machines' window bookkeeping, whatever
the file size.
"""

from __future__ import annotations

from peerd.transfers.extension import Transfers
from peerd.transfers.files import TransferError

__all__ = ["TransferError", "Transfers"]
