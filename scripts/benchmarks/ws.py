"""MQTT over WebSocket against MQTT over TCP (issue 12 item 6), link to link, both clients.

One private RabbitMQ node serves both transports (`rabbitmq_mqtt` and `rabbitmq_web_mqtt`): it
is the broker here whose WebSocket listener keeps up (Mosquitto 2.0.11's reads a WebSocket client
about 4 KiB per main-loop pass, ~40 KB/s, docs/brokers.md). A publisher link sends 256 KiB
payloads at QoS 1, 16 in flight, to a subscriber link on the same broker; the figure is MB/s from
the first publish to the last payload received. Runs are interleaved (tcp, ws, tcp, ...) so the
machine's load hits both alike: read the ws/tcp ratio, not the MB/s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

from peerd.mqtt import BrokerSettings, open_link
from scripts.benchmarks.common import median, table
from tests.support.rabbitmq import available, rabbitmq

CLIENTS = ("builtin", "aiomqtt")
CHUNK = 256 * 1024
IN_FLIGHT = 16


async def _once(url: str, client: str, count: int) -> float:
    def settings() -> BrokerSettings:
        return BrokerSettings.from_url(url, client_id="b" + os.urandom(6).hex())

    topic = f"peerd/v1/bench/in/{os.urandom(4).hex()}"
    payload = os.urandom(CHUNK)
    pub, sub_link = open_link(settings(), client=client), open_link(settings(), client=client)
    tasks = [asyncio.create_task(link.run()) for link in (pub, sub_link)]
    try:
        sub = await sub_link.subscribe(topic, qos=1, max_bytes=(count + 1) * CHUNK, timeout=30)
        await pub.wait_connected(30)
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with slots:
                await pub.publish(topic, payload, qos=1)

        async def receive() -> None:
            for _ in range(count):
                await sub.get()

        start = time.perf_counter()
        async with asyncio.timeout(300):
            await asyncio.gather(receive(), *(one() for _ in range(count)))
        return count * CHUNK / (time.perf_counter() - start) / 1e6
    finally:
        for link in (pub, sub_link):
            await link.close()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(quick: bool = False) -> bool:
    if not available():
        print("skipped: rabbitmq-server is not installed (its web_mqtt plugin serves ws://)")
        return True
    runs, count = (1, 16) if quick else (3, 128)
    import peerd.mqtt.aiomqtt_link  # noqa: F401, PLC0415 - sets its logger level: override it after

    logging.getLogger("peerd.mqtt.aiomqtt").setLevel(logging.ERROR)  # its per-publish warnings
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pbws-") as d:
        started = time.monotonic()
        with rabbitmq(Path(d), web=True) as urls:
            boot = time.monotonic() - started
            for _ in range(runs):
                for client in CLIENTS:
                    for transport in ("mqtt", "ws"):
                        rate = asyncio.run(_once(urls[transport], client, count))
                        rates.setdefault((client, transport), []).append(rate)
    load = os.getloadavg()
    rows = []
    for client in CLIENTS:
        tcp, ws = median(rates[(client, "mqtt")]), median(rates[(client, "ws")])
        rows.append([f"`{client}`", f"{tcp:.1f}", f"{ws:.1f}", f"**{ws / tcp:.2f}**"])
    print(
        f"RabbitMQ node up in {boot:.0f} s; {count} x 256 KiB at QoS 1, {IN_FLIGHT} in flight,"
        f" median of {runs} interleaved runs; load average {load[0]:.1f} {load[1]:.1f}"
        f" {load[2]:.1f}.\n"
    )
    table(["client", "tcp MB/s", "ws MB/s", "ws / tcp"], rows)
    return True
