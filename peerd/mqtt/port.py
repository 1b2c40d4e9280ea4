"""The transport port: what the daemon needs of a broker link, and how one is chosen.

The daemon depends on `BrokerLink`, not on a concrete client. Two implementations stand behind
it, chosen by `[broker] client`: `MqttLink` (peerd's own client over `protocol.mqtt`, the
default: measured faster, docs/ARCHITECTURE.md) and `AiomqttLink` (an adapter on aiomqtt, the
standard asyncio client, an optional extra). Both keep the same promises: subscriptions restored
after every reconnect, publishes held in a bounded outbox during an outage, incoming messages
in bounded per-subscription queues or a synchronous handler, errors from the Broker* family.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal, Protocol, TypeVar

from peerd.config import BrokerConfig
from peerd.mqtt.errors import BrokerError, BrokerSettingsError, SubscribeRefused
from peerd.mqtt.limits import LinkLimits
from peerd.mqtt.link import MqttLink
from peerd.mqtt.probe import ProbePlan
from peerd.mqtt.settings import Backoff, BrokerSettings, url_uses_tls
from peerd.mqtt.subscription import LinkStats, Message, Subscription
from peerd.mqtt.urls import BrokerSet

__all__ = [
    "CLIENTS",
    "BrokerLink",
    "ClientName",
    "LinkLimits",
    "link_for_config",
    "open_link",
    "subscribe_steadily",
]

log = logging.getLogger("peerd.mqtt")

ClientName = Literal["builtin", "aiomqtt"]
CLIENTS: tuple[ClientName, ...] = ("builtin", "aiomqtt")


class BrokerLink(Protocol):
    """What the daemon needs of the broker: see the module docstring."""

    settings: BrokerSettings  # the broker in use (its URL) and how we connect to it
    brokers: BrokerSet  # every broker URL it may use, and why it left the others
    stats: LinkStats
    last_error: BrokerError | None
    probe_plan: ProbePlan | None  # what to probe of the broker's packet limit (probe.py)

    @property
    def connected(self) -> bool: ...

    @property
    def queued(self) -> int: ...

    @property
    def limits(self) -> LinkLimits: ...

    async def run(self) -> None:
        """Keep a connection up until `close()`: reconnect with backoff, restore subscriptions."""

    async def close(self) -> None: ...

    async def settled(self, timeout: float) -> LinkLimits: ...  # noqa: ASYNC109 - a bound

    def reprobe(self) -> None: ...

    async def wait_connected(self, timeout: float | None = None) -> None: ...  # noqa: ASYNC109 - a BrokerTimeout that says what timed out

    async def drain(self, timeout: float | None = None) -> None: ...  # noqa: ASYNC109 - a BrokerTimeout that says what timed out

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        qos: int = 0,
        retain: bool = False,
    ) -> None: ...

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
        handler: Callable[[Message], None] | None = None,
        max_messages: int = 1024,
        max_bytes: int = 16 << 20,
        timeout: float | None = None,  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
    ) -> Subscription: ...


def open_link(
    settings: BrokerSettings | BrokerSet,
    *,
    client: str = "builtin",
    on_state: Callable[[bool], None] | None = None,
    backoff: Backoff | None = None,
) -> BrokerLink:
    """A link of the chosen client. `aiomqtt` is an optional extra: selecting it without the
    package installed is a settings error that says how to install it."""
    if client == "builtin":
        link: MqttLink = MqttLink(settings, on_state=on_state, backoff=backoff)
        return link
    if client == "aiomqtt":
        try:
            from peerd.mqtt.aiomqtt_link import AiomqttLink  # noqa: PLC0415 - optional extra
        except ImportError as exc:
            raise BrokerSettingsError(
                "[broker] client = 'aiomqtt' needs the aiomqtt package",
                hint="install it with `pip install 'peerd[aiomqtt]'`, or use client = 'builtin'",
            ) from exc
        return AiomqttLink(settings, on_state=on_state, backoff=backoff)
    raise BrokerSettingsError(f"unknown MQTT client {client!r}: use one of {', '.join(CLIENTS)}")


def link_for_config(
    broker: BrokerConfig, *, client_id: str, on_state: Callable[[bool], None] | None = None
) -> BrokerLink:
    """The link a `[broker]` section describes, logging in as `client_id` (the peer id)."""
    password = None
    if broker.password_file is not None:
        try:
            password = broker.password_file.read_text().strip()
        except OSError as exc:
            raise BrokerSettingsError(f"cannot read the broker password file: {exc}") from exc
    brokers = BrokerSet(
        [
            BrokerSettings.from_url(
                url,
                client_id=client_id,
                # Several URLs may mix plain and TLS: the TLS files go to the TLS ones.
                ca_file=broker.ca_file if url_uses_tls(url) else None,
                cert_file=broker.cert_file if url_uses_tls(url) else None,
                key_file=broker.key_file if url_uses_tls(url) else None,
                username=broker.username,
                password=password,
                keepalive=broker.keepalive,
                max_packet_size=broker.max_packet_size,
                mqtt_version=broker.protocol_level,
            )
            for url in broker.broker_urls
        ]
    )
    return open_link(brokers, client=broker.client, on_state=on_state)


S_co = TypeVar("S_co", covariant=True)


class _Subscribes(Protocol[S_co]):
    async def subscribe(
        self, topic_filter: str, *, qos: int = 1, handler: Callable[[Message], None] | None = None
    ) -> S_co: ...


async def subscribe_steadily(
    link: _Subscribes[S_co],
    topic_filter: str,
    *,
    qos: int,
    handler: Callable[[Message], None],
    backoff: Backoff | None = None,
) -> S_co:
    """Subscribe, trying again with backoff while the broker refuses: a subscription the node
    cannot run without (its inbox, revocations) must not end the daemon because a clustered
    broker refused it for a moment (NATS while its JetStream elects a leader). Each refusal is
    a warning in the log; `close()` of the link ends the wait."""
    backoff = backoff or Backoff(initial=1.0, maximum=30.0)
    while True:
        try:
            return await link.subscribe(topic_filter, qos=qos, handler=handler)
        except SubscribeRefused as exc:
            delay = backoff.next_delay()
            log.warning("%s; trying again in %.0fs", exc, delay)
            await asyncio.sleep(delay)
