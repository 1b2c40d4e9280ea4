"""The shipped broker config (systemd/mosquitto-peerd.conf) confines each node, for real.

A private Mosquitto runs that file (its ACL, authentication and limits; only paths rewritten).
Nodes authenticate with their peer id as username. Mosquitto 2.0 grants every SUBSCRIBE of an
MQTT 3.1.1 client and acknowledges every PUBLISH, and applies the ACL when it delivers: so the
tests assert what arrives (and what a later subscriber finds retained), not the acknowledgements.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from peerd.mqtt import Backoff, BrokerRefused, BrokerSettings, Message, MqttLink, Subscription
from tests.support.broker import Broker, shipped_environment

NET = "peerd/v1/acltest"
NODES = ("alice", "bob", "carol")
USERS = {u: f"{u}-secret" for u in (*NODES, "mallory", "dave")}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(tmp_path_factory.mktemp("shipped"), shipped=True, users=USERS) as broker:
        yield broker


def node(broker: Broker, user: str, *, client_id: str | None = None) -> MqttLink:
    s = BrokerSettings.from_url(
        broker.url, client_id=client_id or user, username=user, password=USERS[user]
    )
    return MqttLink(s, backoff=Backoff(initial=0.05, maximum=0.2))


async def drain(sub: Subscription, expect: int = 0, quiet: float = 0.3) -> list[Message]:
    """The `expect` messages (up to 10 s each), then whatever else arrives until `quiet` s pass
    without a message. (A forbidden message slower than `quiet` would be missed, never
    invented: the negative checks can only err towards passing.)"""
    got = []
    while True:
        try:
            async with asyncio.timeout(10.0 if len(got) < expect else quiet):
                got.append(await sub.get())
        except TimeoutError:
            return got


@pytest.fixture
async def nodes(shipped: Broker) -> AsyncIterator[dict[str, MqttLink]]:
    async with AsyncExitStack() as stack:
        links = {u: await stack.enter_async_context(node(shipped, u)) for u in NODES}
        for link in links.values():
            await link.wait_connected(5)
        yield links


async def test_a_node_receives_only_its_own_inbox(nodes: dict[str, MqttLink]) -> None:
    alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
    # Alice tries everything that would show her Bob's inbox.
    snoops = [
        await alice.subscribe(f, timeout=5)
        for f in (f"{NET}/in/bob", f"{NET}/in/+", "peerd/v1/+/in/#", "#")
    ]
    mine = await alice.subscribe(f"{NET}/in/alice", timeout=5)
    bobs = await bob.subscribe(f"{NET}/in/bob", timeout=5)
    secret = os.urandom(16)
    await carol.publish(f"{NET}/in/bob", secret, qos=1)  # anyone may write to any inbox
    await bob.publish(f"{NET}/in/alice", b"hello alice", qos=1)

    assert [m.payload for m in await drain(bobs, 1)] == [secret]
    # Alice's own inbox reaches her, through her own subscription and the wildcard ones.
    assert [m.payload for m in await drain(mine, 1)] == [b"hello alice"]
    for snoop in snoops:
        assert secret not in [m.payload for m in await drain(snoop)]
    # Whatever copies the broker sent her for her overlapping subscriptions, all were hers.
    assert alice.stats.received >= 1
    assert alice.stats.received_bytes == alice.stats.received * len(b"hello alice")


async def test_only_the_issuer_writes_its_revocations_and_everyone_reads_them(
    shipped: Broker, nodes: dict[str, MqttLink]
) -> None:
    alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
    stmt = os.urandom(8).hex()
    watch = await carol.subscribe(f"{NET}/rev/#", timeout=5)
    # Alice forges a revocation of Bob's key: acknowledged, but neither delivered nor retained.
    await alice.publish(f"{NET}/rev/bob/{stmt}", b"forged by alice", qos=1, retain=True)
    # Bob revokes for real.
    await bob.publish(f"{NET}/rev/bob/{stmt}", b"signed by bob", qos=1, retain=True)
    got = await drain(watch, 1)
    assert [(m.topic, m.payload) for m in got] == [(f"{NET}/rev/bob/{stmt}", b"signed by bob")]

    # A node that connects later finds Bob's statement retained, and only that.
    async with node(shipped, "dave") as late:
        sub = await late.subscribe(f"{NET}/rev/bob/{stmt}", timeout=5)
        retained = await drain(sub, 1)
    assert [(m.payload, m.retain) for m in retained] == [(b"signed by bob", True)]

    # Nor can Alice overwrite it later, or publish outside the rev/<her id>/ space.
    await alice.publish(f"{NET}/rev/bob/{stmt}", b"", qos=1, retain=True)  # would clear it
    await alice.publish(f"{NET}/rev/alice/{stmt}", b"alice's own", qos=1, retain=True)
    got = await drain(watch, 1)
    assert [(m.topic, m.payload) for m in got] == [(f"{NET}/rev/alice/{stmt}", b"alice's own")]


async def test_only_the_sender_publishes_into_its_transfer_topic(
    nodes: dict[str, MqttLink],
) -> None:
    alice, bob = nodes["alice"], nodes["bob"]
    tid = os.urandom(16).hex()
    chunks = await bob.subscribe(f"{NET}/x/alice/{tid}", timeout=5)
    await bob.publish(f"{NET}/x/alice/{tid}", b"forged by bob", qos=1)  # not bob's to write
    await alice.publish(f"{NET}/x/alice/{tid}", b"ciphertext", qos=1)
    assert [m.payload for m in await drain(chunks, 1)] == [b"ciphertext"]

    outside = await bob.subscribe("elsewhere/#", timeout=5)
    sys_tree = await bob.subscribe("$SYS/#", timeout=5)
    await alice.publish("elsewhere/topic", b"not in the layout", qos=1)
    await alice.publish(f"{NET}/unknown/bob", b"not in the layout", qos=1)
    assert await drain(outside) == []
    assert await drain(sys_tree) == []


async def test_early_chunks_reach_their_receiver_only_from_their_sender(
    nodes: dict[str, MqttLink],
) -> None:
    """SPEC 7.7: `x/<sender>/<receiver>`, to which a receiver subscribes as `x/+/<its id>`:
    the shipped ACL lets the sender publish there, and no one else under the sender's id."""
    alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
    early = await bob.subscribe(f"{NET}/x/+/bob", timeout=5)
    await carol.publish(f"{NET}/x/alice/bob", b"forged by carol", qos=1)  # not carol's to write
    await alice.publish(f"{NET}/x/alice/bob", b"early ciphertext", qos=1)
    await carol.publish(f"{NET}/x/carol/bob", b"carol's own", qos=1)  # hers: the node decides
    got = await drain(early, 2)
    assert sorted((m.topic.rsplit("/", 2)[1], m.payload) for m in got) == [
        ("alice", b"early ciphertext"),
        ("carol", b"carol's own"),
    ]


async def test_a_client_cannot_claim_another_nodes_id(
    shipped: Broker, nodes: dict[str, MqttLink]
) -> None:
    """Mallory connects with client id "bob": the broker uses her username instead."""
    bob = nodes["bob"]
    states: list[bool] = []
    bob._on_state = states.append
    bobs = await bob.subscribe(f"{NET}/in/bob", timeout=5)
    async with node(shipped, "mallory", client_id="bob") as mallory:
        snoop = await mallory.subscribe(f"{NET}/in/bob", timeout=5)
        await nodes["carol"].publish(f"{NET}/in/bob", b"for bob only", qos=1)
        assert await drain(snoop) == []
        assert [m.payload for m in await drain(bobs, 1)] == [b"for bob only"]
    # Bob's connection was not taken over (a same-id connect would have kicked him off).
    assert states == []
    assert bob.connected
    assert bob.stats.disconnects == 0


async def test_unauthenticated_clients_are_refused(shipped: Broker) -> None:
    for kwargs in ({}, {"username": "alice", "password": "wrong"}, {"username": "eve"}):
        s = BrokerSettings.from_url(shipped.url, client_id="eve", **kwargs)  # type: ignore[arg-type]
        async with MqttLink(s) as link:
            with pytest.raises(BrokerRefused, match="not authorised"):
                await link.wait_connected(30)


def test_the_shipped_conf_sets_the_documented_limits(shipped: Broker) -> None:
    conf = Path(shipped.conf_path).read_text().splitlines()
    for line in (
        "set_tcp_nodelay true",
        "max_packet_size 1048576",
        "allow_anonymous false",
        "use_username_as_clientid true",
        "persistence true",
    ):
        assert line in conf


def test_the_shipped_broker_runs_with_the_shipped_drop_in(shipped: Broker) -> None:
    """Tests and benchmarks run Mosquitto as installed: with the environment of
    systemd/mosquitto-peerd-malloc.conf (glibc keeps the heap that chunks pass through, instead
    of trimming it after every chunk), read off the running process."""
    assert shipped.proc is not None
    raw = Path(f"/proc/{shipped.proc.pid}/environ").read_bytes()
    env = dict(item.partition(b"=")[::2] for item in raw.split(b"\0") if item)
    wanted = shipped_environment()
    assert wanted, "the drop-in sets no environment"
    for key, value in wanted.items():
        assert env.get(key.encode()) == value.encode(), key
    assert env[b"MALLOC_TRIM_THRESHOLD_"] == b"67108864"
