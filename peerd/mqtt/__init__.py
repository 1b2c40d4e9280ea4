"""peerd's link to the MQTT broker (the wire itself is `protocol.mqtt`, sans-IO).

errors.py        the Broker* errors
settings.py      BrokerSettings (URL, TLS, credentials, limits) and the reconnect Backoff
topics.py        the topic layout of a network and filter matching
conn.py          one TCP/TLS connection: an asyncio protocol pumping protocol.mqtt.Connection
link.py          MqttLink: reconnects, outbox, QoS 1 retransmission, keepalive
urls.py          BrokerSet: several broker URLs, the one in use, why the others were left
subscribing.py   its subscribe/unsubscribe half
subscription.py  Subscription queues, routing of incoming messages, LinkStats
outgoing.py      the record of one publish, and Pipeline
"""

from peerd.mqtt.errors import (
    BrokerError,
    BrokerLimitError,
    BrokerProtocolError,
    BrokerQueueFull,
    BrokerRefused,
    BrokerSettingsError,
    BrokerTimeout,
    BrokerTlsError,
    BrokerUnreachable,
    LinkClosed,
    SubscribeRefused,
)
from peerd.mqtt.limits import LinkLimits
from peerd.mqtt.link import MqttLink
from peerd.mqtt.outgoing import Pipeline
from peerd.mqtt.port import CLIENTS, BrokerLink, link_for_config, open_link, subscribe_steadily
from peerd.mqtt.settings import DEFAULT_MAX_PACKET_SIZE, Backoff, BrokerSettings
from peerd.mqtt.subscription import LinkStats, Message, Subscription
from peerd.mqtt.topics import Topics, statement_id, topic_matches

__all__ = [
    "CLIENTS",
    "DEFAULT_MAX_PACKET_SIZE",
    "Backoff",
    "BrokerError",
    "BrokerLimitError",
    "BrokerLink",
    "BrokerProtocolError",
    "BrokerQueueFull",
    "BrokerRefused",
    "BrokerSettings",
    "BrokerSettingsError",
    "BrokerTimeout",
    "BrokerTlsError",
    "BrokerUnreachable",
    "LinkClosed",
    "LinkLimits",
    "LinkStats",
    "Message",
    "MqttLink",
    "Pipeline",
    "SubscribeRefused",
    "Subscription",
    "Topics",
    "link_for_config",
    "open_link",
    "statement_id",
    "subscribe_steadily",
    "topic_matches",
]
