"""MQTT for peerd's broker link, sans-IO: packet encodings and a client `Connection` state
machine (bytes in, events out, bytes to send), for protocol levels 4 (3.1.1) and 5.

The asyncio shell in `peerd/mqtt/` owns the socket, the clock, reconnects and what outlives one
connection (subscriptions, unacknowledged publishes, packet ids); this package owns the wire.
"""

from protocol.mqtt.connection import Connection, State
from protocol.mqtt.events import (
    BrokerLimits,
    ConnAck,
    Disconnect,
    Dropped,
    Event,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    UnsubAck,
    Violation,
)
from protocol.mqtt.packets import MAX_REMAINING, V5, V311

__all__ = [
    "MAX_REMAINING",
    "V5",
    "V311",
    "BrokerLimits",
    "ConnAck",
    "Connection",
    "Disconnect",
    "Dropped",
    "Event",
    "PingResp",
    "PubAck",
    "Publish",
    "State",
    "SubAck",
    "UnsubAck",
    "Violation",
]
