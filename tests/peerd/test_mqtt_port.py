"""The transport port: both MQTT clients behind `BrokerLink` keep the same promises against a
real Mosquitto (subscriptions restored after a broker restart, publishes held during the outage,
limits, refusals), and choosing one is a configuration value with clear errors."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from peerd.config import load_config
from peerd.errors import ConfigError
from peerd.mqtt import (
    CLIENTS,
    Backoff,
    BrokerLink,
    BrokerQueueFull,
    BrokerRefused,
    BrokerSettings,
    BrokerSettingsError,
    open_link,
)
from tests.peerd.test_mqtt import eventually, next_msg
from tests.support.broker import Broker, write_password_file
from tests.support.hostile import HostileProxy


def link_for(broker: Broker, client: str, **kw: Any) -> BrokerLink:
    settings = BrokerSettings.from_url(broker.url, client_id=("p" + os.urandom(6).hex())[:23], **kw)
    return open_link(settings, client=client, backoff=Backoff(initial=0.02, maximum=0.2))


@pytest.mark.parametrize("client", CLIENTS)
async def test_both_clients_survive_a_broker_restart(broker: Broker, client: str) -> None:
    states: list[bool] = []
    link = link_for(broker, client)
    link._on_state = states.append  # type: ignore[attr-defined] # both keep the callback here
    task = asyncio.create_task(link.run())
    try:
        inbox = f"peerd/v1/t/in/{link.settings.client_id}"
        sub = await link.subscribe(inbox, timeout=10)
        await link.publish(inbox, b"before", qos=1)
        assert (await next_msg(sub)).payload == b"before"
        assert link.limits.max_packet_size == link.settings.max_packet_size

        broker.kill()
        await eventually(lambda: not link.connected, "the link saw the drop")
        during = asyncio.create_task(link.publish(inbox, b"during-1", qos=1))
        await eventually(lambda: link.queued == 1, "the publish waits in the outbox")
        link.publish_nowait(inbox, memoryview(b"during-0"), qos=0)
        assert link.queued == 2
        broker.start()
        async with asyncio.timeout(15):
            await during
        assert [(await next_msg(sub)).payload for _ in range(2)] == [b"during-1", b"during-0"]
        assert states[:3] == [True, False, True]
        assert link.stats.connects >= 2
        with pytest.raises(ValueError, match="packet limit"):
            link.publish_nowait(inbox, bytes(link.settings.max_packet_size))
    finally:
        await link.close()
    assert task.done()
    assert task.exception() is None


@pytest.mark.parametrize("client", CLIENTS)
async def test_both_clients_bound_the_outbox(broker: Broker, client: str) -> None:
    link = link_for(broker, client)
    link.max_queued = 2  # type: ignore[attr-defined] # both expose their outbox bound
    link.publish_nowait("peerd/v1/t/in/x", b"1")  # not running yet: queued
    link.publish_nowait("peerd/v1/t/in/x", b"2")
    with pytest.raises(BrokerQueueFull):
        link.publish_nowait("peerd/v1/t/in/x", b"3")
    await link.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_both_clients_fail_for_good_on_bad_credentials(client: str, tmp_path: Path) -> None:
    pw = tmp_path / "passwords"
    write_password_file(pw, {"alice": "right"})
    extra = f"allow_anonymous false\npassword_file {pw}\n"
    with Broker(tmp_path / "b", extra_conf=extra) as b:
        link = link_for(b, client, username="alice", password="wrong")
        task = asyncio.create_task(link.run())
        try:
            with pytest.raises(BrokerRefused) as err:
                await link.wait_connected(10)
            assert err.value.permanent
        finally:
            await link.close()
            await task


def test_the_client_is_chosen_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "peerd.toml"
    path.write_text('[broker]\nclient = "aiomqtt"\n')
    assert load_config(path).broker.client == "aiomqtt"
    path.write_text('[broker]\nclient = "paho"\n')
    with pytest.raises(ConfigError, match="client"):
        load_config(path)


def test_aiomqtt_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = BrokerSettings.from_url("mqtt://127.0.0.1:1", client_id="x")
    monkeypatch.setitem(sys.modules, "aiomqtt", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "peerd.mqtt.aiomqtt_link", raising=False)
    with pytest.raises(BrokerSettingsError, match="needs the aiomqtt package") as err:
        open_link(settings, client="aiomqtt")
    assert "peerd[aiomqtt]" in err.value.hint
    with pytest.raises(BrokerSettingsError, match="unknown MQTT client"):
        open_link(settings, client="paho")


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_successful_connect_resets_the_backoff(tmp_path: Path, client: str) -> None:
    """Even a connection that lives a moment: restarts in a row must not grow the delay."""
    chosen: list[int] = []

    class Recording(Backoff):
        def next_delay(self) -> float:
            chosen.append(self.attempt)
            return super().next_delay()

    broker = Broker(tmp_path / "b")  # not started yet: the first attempts fail
    s = BrokerSettings.from_url(broker.url, client_id=("r" + os.urandom(6).hex())[:23])
    backoff = Recording(initial=0.01, maximum=0.05)
    link = open_link(s, client=client, backoff=backoff)
    task = asyncio.create_task(link.run())
    try:
        await eventually(lambda: len(chosen) >= 4, "four failed attempts")
        broker.start()
        await link.wait_connected(10)
        before = len(chosen)
        broker.kill()
        await eventually(lambda: len(chosen) > before, "a reconnect attempt")
        assert chosen[before] == 0
    finally:
        await link.close()
        await task
        broker.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_both_clients_replace_a_connection_that_stalls(broker: Broker, client: str) -> None:
    """A connection on which nothing moves any more (a dead NAT entry, a stalled path): no FIN,
    no RST, so TCP would wait for ever. Each client notices the silence through its keepalive
    (the builtin one after 1.5 keepalives without a byte, aiomqtt/paho after an unanswered
    PINGREQ) and replaces the connection; what was subscribed works again."""
    async with HostileProxy(broker.port) as proxy:
        settings = BrokerSettings.from_url(
            proxy.url, client_id=("p" + os.urandom(6).hex())[:23], keepalive=1
        )
        link = open_link(settings, client=client, backoff=Backoff(initial=0.02, maximum=0.2))
        task = asyncio.create_task(link.run())
        try:
            inbox = f"peerd/v1/t/in/{settings.client_id}"
            sub = await link.subscribe(inbox, timeout=10)
            await link.publish(inbox, b"before", qos=1, timeout=10)
            assert (await next_msg(sub)).payload == b"before"

            assert proxy.freeze_connections() == 1
            # Nothing closes the stalled connection: only the client's keepalive can tell.
            # The deadline is a liveness bound, far above the 2-3 keepalives either needs.
            await proxy.wait_connections(2, limit=30)
            await link.publish(inbox, b"after", qos=1, timeout=10)
            assert (await next_msg(sub, limit=10)).payload == b"after"
            assert link.stats.connects >= 2
            assert proxy.stats["frozen"] == 1
        finally:
            await link.close()
    assert task.done()
    assert task.exception() is None


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    ("conf", "version", "found"),
    [
        ("", 4, None),  # no limit: every size comes back, nothing changes
        ("message_size_limit 131072\n", 4, 131072),  # above it dropped without a word
        ("max_packet_size 131072\n", 4, 65536),  # the connection closed over a larger packet
        ("message_size_limit 131072\n", 5, 131072),  # MQTT 5 that states no limit
        ("max_packet_size 131072\n", 5, None),  # stated in the CONNACK: the probe agrees
    ],
    ids=["unlimited", "311-drops", "311-disconnects", "5-drops", "5-states"],
)
async def test_both_clients_find_a_packet_limit_nobody_states(
    tmp_path: Path, client: str, conf: str, version: int, found: int | None
) -> None:
    """The probe at connect (peerd/mqtt/probe.py) lowers the limit in force to the largest
    probed payload that came back; a transfer's chunk frames of that size then fit."""
    from peerd.mqtt.probe import ProbePlan  # noqa: PLC0415

    sizes = tuple(16384 << i for i in range(6))  # 16 KiB ... 512 KiB
    with Broker(tmp_path / "b", extra_conf=conf) as broker:
        link = link_for(broker, client, mqtt_version=version)
        topic = f"peerd/v1/t/x/{link.settings.client_id}/{'0' * 32}"
        link.probe_plan = ProbePlan(topic, sizes)
        task = asyncio.create_task(link.run())
        try:
            await link.wait_connected(10)
            await eventually(lambda: link._probing is None, "the probe ran")  # type: ignore[attr-defined]
            limits = await link.settled(10)
            assert limits.version == version
            if found is None:
                assert limits.source != "probe"
                assert limits.max_payload(topic) >= sizes[-1] or limits.source == "broker"
            else:
                assert limits.source == "probe"
                assert limits.max_payload(topic) == found
                # What it found holds on: a reconnect does not probe again, nor forget it.
                await link.publish(topic, bytes(found), qos=1)
                assert link.limits.max_payload(topic) == found
        finally:
            await link.close()
            task.cancel()
