"""Several broker URLs: the rotation itself (`BrokerSet`), both MQTT clients moving to the next
broker when theirs dies, the `[broker] urls` configuration key and its errors."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from peerd.config import BrokerConfig, default_config, load_config, render_config
from peerd.errors import ConfigError
from peerd.mqtt import CLIENTS, Backoff, BrokerSettings, BrokerSettingsError, open_link
from peerd.mqtt.urls import BrokerSet
from tests.peerd.test_mqtt import eventually, next_msg
from tests.support.broker import Broker, free_port


def _set(*urls: str, cid: str = "node1") -> BrokerSet:
    return BrokerSet([BrokerSettings.from_url(u, client_id=cid) for u in urls])


def test_rotation_moves_round_the_list_and_keeps_why_each_was_left() -> None:
    brokers = _set("mqtt://a:1883", "mqtt://b:1883", "mqtt://c:1883")
    assert brokers.current.host == "a"
    assert brokers.leave("a refused", now=10.0).host == "b"
    assert brokers.leave("b timed out", now=11.0).host == "c"
    assert not brokers.all_failing()
    assert brokers.leave("c reset", now=12.0).host == "a"
    assert brokers.all_failing()
    brokers.connected()  # a accepted us this time
    assert not brokers.all_failing()
    view = {v["url"]: v for v in brokers.view()}
    assert view["mqtt://a:1883"]["current"]
    assert view["mqtt://a:1883"]["last_error"] is None
    assert view["mqtt://b:1883"]["last_error"] == "b timed out"
    assert view["mqtt://b:1883"]["left_at"] == 11.0
    assert not view["mqtt://c:1883"]["current"]


def test_one_url_stays_and_still_says_why() -> None:
    brokers = _set("mqtt://a:1883")
    assert brokers.leave("down", now=1.0).host == "a"
    assert brokers.view()[0]["last_error"] == "down"
    assert brokers.all_failing()


def test_a_set_refuses_nothing_twice_and_mixed_identities() -> None:
    with pytest.raises(BrokerSettingsError, match="no broker URL"):
        BrokerSet([])
    with pytest.raises(BrokerSettingsError, match="given twice"):
        _set("mqtt://a:1883", "mqtt://a")
    with pytest.raises(BrokerSettingsError, match="same client id"):
        BrokerSet(
            [
                BrokerSettings.from_url("mqtt://a", client_id="x"),
                BrokerSettings.from_url("mqtt://b", client_id="y"),
            ]
        )


@pytest.mark.parametrize("client", CLIENTS)
async def test_both_clients_move_to_the_next_broker(tmp_path: Path, client: str) -> None:
    """An unreachable first URL is passed over; when the broker in use dies the link moves on,
    restores its subscription there and sends what waited; status says why each was left."""
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens
    with Broker(tmp_path / "b1") as b1, Broker(tmp_path / "b2") as b2:
        cid = ("u" + os.urandom(6).hex())[:23]
        brokers = _set(dead, b1.url, b2.url, cid=cid)
        link = open_link(brokers, client=client, backoff=Backoff(initial=0.02, maximum=0.2))
        task = asyncio.create_task(link.run())
        try:
            inbox = f"peerd/v1/t/in/{cid}"
            sub = await link.subscribe(inbox, timeout=15)
            await link.wait_connected(timeout=15)
            assert link.settings.url == b1.url
            await link.publish(inbox, b"on b1", qos=1, timeout=10)
            assert (await next_msg(sub)).payload == b"on b1"

            b1.kill()
            await eventually(lambda: link.settings.url == b2.url and link.connected, "on b2")
            await link.publish(inbox, b"on b2", qos=1, timeout=10)
            assert (await next_msg(sub)).payload == b"on b2"  # the subscription came along
            view = {v["url"]: v for v in link.brokers.view()}
            assert view[b2.url]["current"]
            assert view[b2.url]["last_error"] is None
            assert view[b1.url]["last_error"]  # why it was left
            assert "127.0.0.1" in (view[dead]["last_error"] or "")
        finally:
            await link.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_every_url_unreachable_keeps_retrying_and_says_so() -> None:
    urls = [f"mqtt://127.0.0.1:{free_port()}" for _ in range(2)]
    link = open_link(_set(*urls), backoff=Backoff(initial=0.01, maximum=0.05))
    task = asyncio.create_task(link.run())
    try:
        await eventually(lambda: link.stats.connect_failures >= 6, "several rounds of attempts")
        assert not task.done()  # still trying
        assert link.brokers.all_failing()
        assert all("cannot connect" in (v["last_error"] or "") for v in link.brokers.view())
    finally:
        await link.close()
        await asyncio.gather(task, return_exceptions=True)


def test_config_urls_key_old_url_key_and_init(tmp_path: Path) -> None:
    conf = tmp_path / "peerd.toml"
    conf.write_text('[broker]\nurls = ["mqtt://n1:1883", "mqtts://n2:8883"]\n')
    broker = load_config(conf).broker
    assert broker.broker_urls == ("mqtt://n1:1883", "mqtts://n2:8883")
    assert broker.tls
    conf.write_text('[broker]\nurl = "mqtt://old:1883"\n')
    assert load_config(conf).broker.broker_urls == ("mqtt://old:1883",)
    assert BrokerConfig().broker_urls == ("mqtt://127.0.0.1:1883",)

    # What `peerd init --broker A --broker B` writes reads back the same.
    config = default_config(tmp_path / "s", {"broker": {"urls": ["mqtt://a:1", "mqtt://b:2"]}})
    conf.write_text(render_config(config))
    assert load_config(conf).broker.broker_urls == ("mqtt://a:1", "mqtt://b:2")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('urls = ["mqtt://a:1883", "ftp://b"]', "ftp://b.: the scheme must be"),
        ('urls = ["mqtt://a:1883", "mqtt://a:1883"]', "given twice"),
        ("urls = []", "at least one broker URL"),
        ('urls = "mqtt://a"', "must be a list of strings"),
        ('url = "mqtt://a"\nurls = ["mqtt://b"]', "both url and urls"),
    ],
)
def test_bad_urls_are_one_line_errors(tmp_path: Path, text: str, error: str) -> None:
    conf = tmp_path / "peerd.toml"
    conf.write_text(f"[broker]\n{text}\n")
    with pytest.raises(ConfigError, match=error) as caught:
        load_config(conf)
    assert "\n" not in str(caught.value)
