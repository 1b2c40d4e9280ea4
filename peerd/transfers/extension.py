"""The `Transfers` extension: routes what peers say to the sending and receiving sides, resumes
what was under way at start-up, and answers the control methods (peerd/transfers/rpc.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.errors import PeerdError, UsageError
from peerd.host import Extension
from peerd.transfers.files import PART_SUFFIX, TransferError, find_parts, remove_part
from peerd.transfers.outcomes import Outcomes
from peerd.transfers.receiving import Receiving
from peerd.transfers.records import TransferRecords
from peerd.transfers.rpc import TransferMethods
from peerd.transfers.sending import Sending, probe_plan
from protocol.errors import RemoteProtocolError
from protocol.messaging import TransferPayload
from protocol.transfer import (
    Abort,
    ControlMessage,
    Have,
    Offer,
    Recipe,
    Seal,
    TransferConfig,
    Verified,
)
from protocol.transfer.messages import decode_message

if TYPE_CHECKING:
    from peerd.config import Config
    from peerd.host import Host
    from peerd.mqtt.probe import ProbePlan
    from protocol.messaging import AppMessage

log = logging.getLogger("peerd.transfers")


class Transfers(TransferMethods, Extension):
    """File transfers, on the host's sessions (control messages) and broker link (chunks)."""

    events = ("transfer.progress", "transfer.done")

    def __init__(self, host: Host, config: TransferConfig | None = None) -> None:
        self.host = host
        self.config = config or TransferConfig(idle_timeout=host.config.receive.idle_timeout)
        self.records = TransferRecords(host.store)
        self.outcomes = Outcomes(host)
        self.sending = Sending(host, self.config, self.records, self.outcomes)
        self.receiving = Receiving(host, self.config, self.records, self.outcomes)
        self.control_rejected = 0
        self.orphans_removed = 0

    def probe_plan(self) -> ProbePlan:
        """What the broker link probes at connect: the chunk frames a transfer may use."""
        return probe_plan(self.host.topics, self.host.peer_id, self.config.chunk_size)

    # -- hooks -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Resume what was under way when the daemon stopped, then expire old records."""
        self.host.spawn(self.receiving.listen_early(), name="early chunks")
        await self._resume()
        await self._sweep()
        await self.receiving.index.drop_recipes_except(
            set(self.receiving.inc) | self.receiving.accepting
        )
        while True:
            await asyncio.sleep(3600)
            await self.host.store.fetchall("SELECT 1")  # keeps the loop honest about the store
            self.outcomes.expire(time.time())

    async def stop(self) -> None:
        tasks = self.sending.tasks() + self.receiving.tasks()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.sending.close_files()
        self.receiving.close_files()

    def reload(self, config: Config) -> None:
        """SIGHUP: transfers that start from now on use the new idle deadline."""
        self.config = dataclasses.replace(self.config, idle_timeout=config.receive.idle_timeout)
        self.sending.config = self.receiving.config = self.config

    async def peers_with_work(self) -> set[str]:
        return self.sending.peers_with_work() | self.receiving.peers_with_work()

    async def session_up(self, peer: str) -> None:
        self.sending.session_up(peer)

    def trust_changed(self) -> None:
        """A revoked or blocked peer gets no more of any file, and sends us no more."""
        self.sending.trust_changed()
        self.receiving.trust_changed()

    def status(self) -> dict[str, Any]:
        sending, receiving = len(self.sending.out), len(self.receiving.inc)
        counters = {
            "frames-rejected": self.receiving.frames_rejected,
            "control-rejected": self.control_rejected,
            "orphans-removed": self.orphans_removed,
            "late-recipes-waiting": self.sending.sent.waiting,
            "late-recipes-sent": self.sending.sent.late_sent,
            "late-recipes-dropped": self.sending.sent.late_dropped,
            "late-recipes-indexed": self.receiving.late.indexed,
            "held-chunk-bytes": self.receiving.held.used,  # of [limits] held_chunks_memory
        }
        return {
            "transfers": {
                "sending": sending,
                "receiving": receiving,
                "active": sending + receiving,
                **{k: v for k, v in counters.items() if v},
                "totals": self.outcomes.stats.as_dict(),
            }
        }

    def on_app(self, peer: str, app: AppMessage) -> None:
        if isinstance(app, TransferPayload):
            self.on_control(peer, app.raw)

    def on_control(self, peer: str, raw: bytes) -> None:
        """A transfer control message from `peer`'s session (synchronous, in the read path)."""
        try:
            msg = decode_message(raw)
        except RemoteProtocolError as exc:
            self._reject(exc.reason, peer, str(exc))
            return
        tid = msg.transfer_id
        if isinstance(msg, Recipe | Have):
            self._delta_message(peer, msg)
            return
        o = self.sending.out.get(tid)
        if o is not None:
            try:
                o.machine.receive(peer, msg, time.time())
            except RemoteProtocolError as exc:
                self._reject(exc.reason, peer, str(exc))
            o.wake.set()
            return
        i = self.receiving.inc.get(tid)
        if i is not None:
            if peer != i.sender:
                self._reject("not-the-sender", peer, "a message about another peer's transfer")
                return
            try:
                i.machine.receive(msg, time.time())
            except RemoteProtocolError as exc:
                self._reject(exc.reason, peer, str(exc))
            i.wake.set()
            return
        self.host.defer(lambda: self._unknown_transfer(peer, msg))

    def _delta_message(self, peer: str, msg: Recipe | Have) -> None:
        """Deltas (SPEC 7.11) live in the shells: a Recipe part waits for its Offer or goes to
        the transfer following it, a Have is the sender's report of what a receiver held."""
        tid = msg.transfer_id
        if isinstance(msg, Have):
            o = self.sending.out.get(tid)
            if o is not None and peer in o.receivers:
                o.held[peer] = msg.held
            return
        if tid in self.sending.out:
            return
        late = self.receiving.late.part(peer, msg, time.time())
        if late is not None:  # the recipe of a file verified without one
            if not late:
                self._reject("recipe-refused", peer, "a late recipe over the bound or misrouted")
            return
        if tid in self.receiving.inc and not self.receiving.recipes.following(tid):
            return  # a transfer without a recipe, or whose recipe is over: changes nothing
        if not self.receiving.recipes.add(peer, msg, time.time()):
            self._reject("recipe-refused", peer, "over the bound or contradicting")

    def _reject(self, reason: str, peer: str | None, detail: str) -> None:
        self.control_rejected += 1
        self.host.count_rejection(f"transfer-{reason}")
        log.debug("transfer message from %s rejected (%s): %s", peer, reason, detail)

    async def _unknown_transfer(self, peer: str, msg: ControlMessage) -> None:
        tid = msg.transfer_id
        if tid in self.receiving.inc or tid in self.sending.out:
            self.on_control(peer, msg.encode())  # it started while this waited in the queue
            return
        if tid in self.receiving.accepting:
            return  # the same offer again, while the first is being accepted
        row = await self.records.get(tid)
        if row is not None:
            if row.role == "receive" and row.peers == [peer]:
                if row.state == "verified" and isinstance(msg, Offer | Seal):
                    assert row.file_hash is not None
                    self.host.transmit(peer, Verified(tid, row.file_hash).encode())
                elif not isinstance(msg, Abort):
                    self.host.transmit(peer, Abort(tid, "cancelled", "already ended").encode())
            return
        if isinstance(msg, Offer):
            await self.receiving.accept_offer(peer, msg)
        elif not isinstance(msg, Abort):
            self.receiving.refuse(peer, Abort(tid, "unknown-transfer", ""))

    async def _resume(self) -> None:
        now = time.time()
        for row in await self.records.active():
            try:
                if row.snapshot is None:
                    raise TransferError("no resumable state was recorded")
                if row.role == "send":
                    await self.sending.resume(row, row.snapshot, now)
                else:
                    await self.receiving.resume(row, row.snapshot, now)
            except (PeerdError, OSError) as exc:
                log.warning("cannot resume transfer %s: %s", row.tid.hex(), exc)
                # Its .part (if any) is an orphan now: the sweep removes it.
                await self.records.update(
                    row.tid,
                    state="failed",
                    reason="resume-failed",
                    detail=str(exc),
                    snapshot=None,
                    finished_at=now,
                )

    async def _sweep(self) -> None:
        """Remove the `.part` files of no transfer being received (left by a crash between
        creating one and recording it, or by a store restored from a backup): each holds
        reserved space. Off the event loop: an inbox may list many files."""
        root = self.host.config.node.inbox_dir
        found = await asyncio.to_thread(find_parts, root)
        # Decided here, on the loop, against the transfers of this moment: an offer accepted
        # while the thread listed the inbox has a .part that is no orphan.
        busy = {i.temp.name for i in self.receiving.inc.values()}
        busy |= {f".{tid.hex()}{PART_SUFFIX}" for tid in self.receiving.accepting}
        removed = size = 0
        for sender, name, n in found:
            if name not in busy and remove_part(root, sender, name):
                removed += 1
                size += n
        if removed:
            self.orphans_removed += removed
            log.warning("removed %d orphaned .part files (%d bytes)", removed, size)

    # -- what the control methods do ---------------------------------------------------------

    async def send(
        self, path: Path, receivers: list[str], *, answer_within: float | None = None
    ) -> dict[str, Any]:
        return await self.sending.send(path, receivers, answer_within=answer_within)

    def transfers(self) -> list[dict[str, Any]]:
        items = [self.sending.describe(o) for o in self.sending.out.values()]
        items += [self.receiving.describe(i) for i in self.receiving.inc.values()]
        items += list(self.outcomes.finished.values())
        return sorted(items, key=lambda t: t["started_at"])

    async def wait(self, tid: bytes, within: float | None) -> dict[str, Any]:
        known = self.sending.out.get(tid) or self.receiving.inc.get(tid)
        if known is None:
            if tid in self.outcomes.finished:
                return self.outcomes.finished[tid]
            row = await self.records.get(tid)
            if row is None:
                raise UsageError(f"no transfer {tid.hex()}")
            return {
                "id": tid.hex(),
                "direction": row.role,
                "name": row.name,
                "path": row.path,
                "state": row.state,
                "reason": row.reason,
            }
        assert known.done is not None
        try:
            return await asyncio.wait_for(asyncio.shield(known.done), within)
        except TimeoutError:
            raise TransferError(
                f"transfer {tid.hex()} did not finish within {within} s",
                hint="it goes on; `peerd transfers` shows it",
            ) from None

    async def received(
        self, *, since: float, peer: str | None, name: str | None, within: float
    ) -> dict[str, Any] | None:
        return await self.outcomes.received(since=since, peer=peer, name=name, within=within)

    def cancel(self, tid: bytes) -> dict[str, Any]:
        o = self.sending.out.get(tid)
        if o is not None:
            self.sending.cancel(o)
            return {"id": tid.hex(), "cancelled": True}
        i = self.receiving.inc.get(tid)
        if i is not None:
            self.receiving.cancel(i)
            return {"id": tid.hex(), "cancelled": True}
        raise UsageError(f"no active transfer {tid.hex()}")
