"""What the MQTT connection tells its owner: one event per packet the broker sent (or refused).

The two events of the hot path (`Publish`, `PubAck`) are NamedTuples: immutable like the rest,
and built with one C call instead of a frozen dataclass's `__setattr__` per field, which shows at
tens of thousands of messages a second. The others are frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "BrokerLimits",
    "ConnAck",
    "Disconnect",
    "Dropped",
    "Event",
    "PingResp",
    "PubAck",
    "Publish",
    "SubAck",
    "UnsubAck",
    "Violation",
]


class Publish(NamedTuple):
    """A message from the broker. `payload` is immutable bytes owned by this message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


class PubAck(NamedTuple):
    """The broker acknowledged our QoS 1 publish `mid`; `reason` >= 0x80 (MQTT 5) refused it."""

    mid: int
    reason: int = 0


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """What the broker's CONNACK allows (MQTT 5 properties; a 3.1.1 CONNACK says nothing, so
    every field keeps its default: no packet limit, 65535 in flight, QoS 1, retain available)."""

    max_packet_size: int | None = None
    receive_maximum: int = 65535
    maximum_qos: int = 2
    retain_available: bool = True
    wildcard_available: bool = True
    session_expiry: int | None = None
    server_keepalive: int | None = None
    assigned_client_id: str | None = None


@dataclass(frozen=True, slots=True)
class ConnAck:
    """The broker's answer to CONNECT. `code` 0 accepts; otherwise the 3.1.1 return code or
    the MQTT 5 reason code (>= 0x80)."""

    code: int
    session_present: bool
    version: int
    limits: BrokerLimits
    reason_string: str | None = None

    @property
    def accepted(self) -> bool:
        return self.code == 0

    @property
    def version_refused(self) -> bool:
        """The broker does not speak the protocol level we asked for (3.1.1 code 1, or MQTT 5
        reason 0x84 Unsupported Protocol Version): try the older one."""
        return self.code in (0x01, 0x84)


@dataclass(frozen=True, slots=True)
class SubAck:
    """Granted QoS (0-2) or a refusal (>= 0x80) per filter of SUBSCRIBE `mid`."""

    mid: int
    codes: bytes


@dataclass(frozen=True, slots=True)
class UnsubAck:
    """UNSUBSCRIBE `mid` done; `codes` per filter in MQTT 5 (empty in 3.1.1)."""

    mid: int
    codes: bytes = b""


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The broker closes the connection and says why (MQTT 5 only)."""

    reason: int
    reason_string: str | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """A PUBLISH the connection refused to deliver: `reason` is "oversize" (above the packet
    limit we announced; acknowledged if QoS 1, so it holds no broker slot) or "bad-topic"."""

    reason: str
    size: int


@dataclass(frozen=True, slots=True)
class Violation:
    """The broker broke the protocol; the connection is dead and must be closed. Last event."""

    what: str


Event = Publish | PubAck | ConnAck | SubAck | UnsubAck | PingResp | Disconnect | Dropped | Violation
