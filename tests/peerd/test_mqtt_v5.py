"""MQTT 5 in both clients: the broker's CONNACK limits bind what the link sends, and `auto` falls
back to 3.1.1 on a broker that refuses 5 (NATS)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from peerd.mqtt import (
    CLIENTS,
    Backoff,
    BrokerLimitError,
    BrokerLink,
    BrokerSettings,
    MqttLink,
    open_link,
)
from tests.e2e.test_other_brokers import nats_url  # noqa: F401 - a fixture of this module too
from tests.peerd.test_mqtt import next_msg
from tests.support.broker import Broker


def settings(url: str, version: int, **kw: int) -> BrokerSettings:
    return BrokerSettings.from_url(
        url, client_id=("v" + os.urandom(6).hex())[:23], mqtt_version=version, **kw
    )


def link_of(client: str, s: BrokerSettings) -> BrokerLink:
    return open_link(s, client=client, backoff=Backoff(0.02, 0.2))


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_brokers_packet_limit_binds_what_we_publish(tmp_path: Path, client: str) -> None:
    with Broker(tmp_path / "b", extra_conf="max_packet_size 131072\n") as broker:
        link = link_of(client, settings(broker.url, 0))
        task = asyncio.create_task(link.run())
        try:
            await link.wait_connected(10)
            assert link.limits.version == 5
            assert link.limits.max_packet_size == 131072
            topic = f"peerd/v1/t/in/{link.settings.client_id}"
            sub = await link.subscribe(topic, timeout=10)
            fits = bytes(link.limits.max_payload(topic))
            await link.publish(topic, fits, qos=1, timeout=10)
            assert (await next_msg(sub, limit=10)).payload == fits
            with pytest.raises(ValueError, match="packet limit of 131072"):
                await link.publish(topic, bytes(131072), qos=1)
            assert link.stats.connects == 1
        finally:
            await link.close()
            await task


async def test_mqtt_311_keeps_the_configured_limit(shared_broker: Broker) -> None:
    async with MqttLink(settings(shared_broker.url, 4, max_packet_size=65536)) as link:
        await link.wait_connected(10)
        assert link.limits.version == 4
        assert link.limits.max_packet_size == 65536


@pytest.mark.parametrize("client", CLIENTS)
async def test_auto_falls_back_to_311_on_nats(nats_url: str, client: str) -> None:  # noqa: F811 - the fixture
    link = link_of(client, settings(nats_url, 0))
    task = asyncio.create_task(link.run())
    try:
        await link.wait_connected(30)
        assert link.limits.version == 4
        topic = f"peerd/v1/t/in/{link.settings.client_id}"
        sub = await link.subscribe(topic, timeout=10)
        await link.publish(topic, b"over 3.1.1", qos=1, timeout=10)
        assert (await next_msg(sub, limit=10)).payload == b"over 3.1.1"
    finally:
        await link.close()
        await task


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_qos1_publish_the_broker_drops_the_connection_for_fails_instead_of_looping(
    tmp_path: Path, client: str
) -> None:
    """Mosquitto's `max_packet_size` cannot be said to a 3.1.1 client: it closes the connection
    on a larger packet. A QoS 1 publish is resent after every reconnect, so one too large for
    the broker cost the link a reconnect loop while the publisher waited; after a bounded
    number of drops with it in flight it now fails, naming the size, and the link goes on."""
    with Broker(tmp_path / "b", extra_conf="max_packet_size 131072\n") as broker:
        link = link_of(client, settings(broker.url, 4))
        task = asyncio.create_task(link.run())
        try:
            await link.wait_connected(10)
            topic = f"peerd/v1/t/in/{link.settings.client_id}"
            sub = await link.subscribe(topic, timeout=10)
            with pytest.raises(BrokerLimitError, match="200000-byte"):
                await link.publish(topic, bytes(200_000), qos=1, timeout=60)
            assert link.stats.disconnects <= 4
            await link.wait_connected(10)
            await link.publish(topic, b"still here", qos=1, timeout=10)
            assert (await next_msg(sub, limit=10)).payload == b"still here"
        finally:
            await link.close()
            await task
