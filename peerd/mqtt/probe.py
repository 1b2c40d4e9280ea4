"""Finding a broker's packet limit where nobody says it (issue 12).

A 3.1.1 broker has no way to tell a client its limit, and an MQTT 5 one may leave it out (or
state more than it carries): Mosquitto's `message_size_limit` drops a larger publish silently
(measured: QoS 0 and QoS 1 alike, the QoS 1 acknowledged), and its `max_packet_size` makes it
close a 3.1.1 client's connection. A transfer whose chunks the broker drops would wait for
acknowledgements that never come.

So after connecting, the link publishes probes on a topic of its own that it subscribes to: one
payload of each size a transfer's chunk frames could have, smallest first, each followed by a
small marker. One publisher's messages on one topic arrive in order, so the marker coming back
before the probe means the probe was dropped, at once, without waiting out a deadline; a
connection lost in between means the broker refused the probe by closing. The first size the
broker refused either way ends the probe: the largest that came back is the limit in force for
that broker URL (cached for the life of the link), and transfers choose their chunk size to fit
it.

A size for which neither the probe nor its marker came back within `PROBE_TIMEOUT`, with the
connection up, is no evidence of a limit: the broker is slow, not refusing (Mosquitto 2.0.11's
websockets listener reads a client 4 KiB per pass, ~40 KB/s, and took a 256 KiB probe for a
limit of 128 KiB). The probe then ends with no limit found, and a transfer whose chunks a broker
really drops still fails within seconds naming its chunk size (the sender's stall check,
peerd/transfers/sending.py).

Cost, bounded: one subscription and at most `len(payloads)` probes (the sum of the chunk frame
sizes, ~0.5 MiB with 256 KiB chunks) and as many markers per broker URL, QoS 0 (a QoS 1 probe
the broker closes the connection over would be sent again after every reconnect), and at most
`PROBE_TIMEOUT` per size where the broker answers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from peerd.mqtt.errors import BrokerError
from peerd.mqtt.limits import PUBLISH_OVERHEAD, LinkLimits
from peerd.mqtt.subscription import Subscription

if TYPE_CHECKING:
    from peerd.mqtt.settings import BrokerSettings
    from peerd.mqtt.subscription import LinkStats

__all__ = ["PROBE_TIMEOUT", "ProbePlan", "probe_packet_limit"]

log = logging.getLogger("peerd.mqtt")

PROBE_TIMEOUT = 5.0  # per size, where neither the probe nor its marker comes back
_MARK = b"\x01"  # a marker's last byte; a probe's is 0


class Probed(Protocol):
    """What a probe uses of a link (both clients have it)."""

    settings: BrokerSettings
    stats: LinkStats

    @property
    def limits(self) -> LinkLimits: ...

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
    ) -> None: ...

    async def subscribe(
        self,
        topic_filter: str,
        *,
        qos: int = 1,
        max_messages: int = 1024,
        max_bytes: int = 16 << 20,
    ) -> Subscription: ...


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """What to probe: `payloads` (ascending) on `topic`, which the node may publish and read,
    with as many bytes as the topics the limit is for (a chunk topic: same length, so a payload
    that came back fits there too)."""

    topic: str
    payloads: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.payloads or list(self.payloads) != sorted(set(self.payloads)):
            raise ValueError("probe payload sizes must be distinct and ascending")
        if self.payloads[0] < 16:
            raise ValueError("a probe payload needs at least 16 bytes")


async def probe_packet_limit(link: Probed, plan: ProbePlan) -> int | None:
    """The packet limit `plan` found on the broker `link` is connected to: the size of the
    largest PUBLISH that came back (counted as `LinkLimits.max_payload` counts), None if every
    size came back. Raises BrokerError if the probe itself could not be made (the link went
    away before subscribing)."""
    overhead = len(plan.topic.encode()) + PUBLISH_OVERHEAD
    sub = await link.subscribe(
        plan.topic, qos=0, max_messages=4, max_bytes=2 * plan.payloads[-1] + 64
    )
    try:
        passed = 0
        for size in plan.payloads:
            if size + overhead > link.limits.max_packet_size:
                break  # the limit in force (configured, or the broker's) is already below it
            came_back = await _one(link, sub, plan.topic, size)
            if came_back is None:
                return None  # no evidence either way: see the module docstring
            if not came_back:
                return passed + overhead if passed else plan.payloads[0] - 1 + overhead
            passed = size
        return None
    finally:
        with contextlib.suppress(BrokerError):
            await sub.close()


async def _one(link: Probed, sub: Subscription, topic: str, size: int) -> bool | None:
    """Whether a `size`-byte payload on `topic` came back: True, False (the broker dropped it
    or closed the connection over it), None (nothing came back in time: no evidence)."""
    while sub.get_nowait() is not None:
        pass  # late echoes of an earlier size
    nonce = os.urandom(15)
    payload = bytearray(size)
    payload[:15] = nonce
    drops = link.stats.disconnects
    started = time.monotonic()
    try:
        await link.publish(topic, payload, qos=0, timeout=PROBE_TIMEOUT)
        await link.publish(topic, nonce + _MARK, qos=0, timeout=PROBE_TIMEOUT)
    except BrokerError:
        # Refused by closing, or not even written in time (a slow listener): only the first is
        # evidence of a limit.
        return False if link.stats.disconnects != drops else None
    while (left := PROBE_TIMEOUT - (time.monotonic() - started)) > 0:
        try:
            async with asyncio.timeout(min(left, 0.25)):
                msg = await sub.get()
        except TimeoutError:
            if link.stats.disconnects != drops:
                log.info(
                    "broker %s: closed the connection over a %d-byte probe", link.settings.url, size
                )
                return False
            continue
        data = msg.payload
        if data[:15] != nonce:
            continue
        if len(data) == size:
            return True
        if len(data) == 16 and data[15:] == _MARK:
            log.info("broker %s: dropped a %d-byte probe", link.settings.url, size)
            return False
    log.info(
        "broker %s: no answer to a %d-byte probe in %gs; assuming no packet limit below what"
        " is configured or stated",
        link.settings.url,
        size,
        PROBE_TIMEOUT,
    )
    return None
