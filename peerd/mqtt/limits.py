"""The limits in force on a broker connection, as both clients report them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LinkLimits"]


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

    def max_payload(self, topic: str) -> int:
        """The largest payload a PUBLISH to `topic` may carry (QoS 1 and MQTT 5 headers counted
        at their largest)."""
        return self.max_packet_size - (len(topic.encode()) + 2 + 2 + 5 + 1 + 7)
