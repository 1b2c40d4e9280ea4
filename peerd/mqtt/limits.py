"""The limits in force on a broker connection, as both clients report them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PUBLISH_OVERHEAD", "LinkLimits"]

# A PUBLISH's bytes besides its topic and payload, counted at their largest: the fixed header
# with its remaining length (5), the topic's length (2), the packet id (2), and MQTT 5
# properties (their length and room for one small property, 8).
PUBLISH_OVERHEAD = 2 + 2 + 5 + 1 + 7


@dataclass(frozen=True, slots=True)
class LinkLimits:
    """The limits in force on the current (or last) connection.

    `max_packet_size` bounds a whole PUBLISH packet: the smaller of what is configured and what
    the broker said in its CONNACK (MQTT 5). `receive_maximum` bounds the QoS 1 publishes in
    flight; `maximum_qos` and `retain_available` say what the broker accepts."""

    max_packet_size: int
    version: int = 4
    receive_maximum: int = 65535
    maximum_qos: int = 1
    retain_available: bool = True
    # Where max_packet_size comes from: "configured" ([broker] max_packet_size), "broker" (its
    # MQTT 5 CONNACK) or "probe" (found at connect: peerd/mqtt/probe.py).
    source: str = "configured"

    def max_payload(self, topic: str) -> int:
        """The largest payload a PUBLISH to `topic` may carry (QoS 1 and MQTT 5 headers counted
        at their largest)."""
        return self.max_packet_size - (len(topic.encode()) + PUBLISH_OVERHEAD)
