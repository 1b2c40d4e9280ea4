"""Fixtures for attacks on running daemons: a private Mosquitto per module, the hostile proxy in
front of it, and real daemons behind the proxy, paired through the real CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attacks.helpers import Api, behind
from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes, pair
from tests.support.hostile import HostileProxy


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(tmp_path_factory.mktemp("broker")) as broker:
        yield broker


@pytest.fixture(scope="module")
def proxy(module_broker: Broker) -> Iterator[HostileProxy]:
    with HostileProxy(module_broker.port, seed=6) as p:
        yield p


@pytest.fixture(autouse=True)
def _clean_proxy_rules(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "proxy" in request.fixturenames:
        p: HostileProxy = request.getfixturevalue("proxy")
        p.clear_rules()
        assert not p.errors, p.errors
        p.recorded.clear()


def start_cluster(
    root: Path, broker: Broker, proxy: HostileProxy, names: list[str], *, pairs: str = "all"
) -> list[Node]:
    """Daemons behind the proxy; `pairs`: "all" pairs every two, "first" pairs the first with
    each other one, "none" pairs nobody."""
    nodes = make_nodes(root, broker.url, names)
    behind(proxy.url, broker.url, *nodes)
    try:
        for n in nodes:
            n.start()
        if pairs != "none":
            for i, a in enumerate(nodes):
                for b in nodes[i + 1 :]:
                    if pairs == "all" or i == 0:
                        pair(a, b)
    except BaseException:
        for n in nodes:
            n.kill()
        raise
    return nodes


@pytest.fixture(scope="module")
def trio(
    tmp_path_factory: pytest.TempPathFactory, module_broker: Broker, proxy: HostileProxy
) -> Iterator[tuple[Node, Node, Node]]:
    """alice, bob and carol, each paired with the others, all behind the proxy."""
    nodes = start_cluster(
        tmp_path_factory.mktemp("trio"), module_broker, proxy, ["alice", "bob", "carol"]
    )
    try:
        alice, bob, carol = nodes
        yield alice, bob, carol
    finally:
        for n in nodes:
            n.kill()


@pytest.fixture(scope="module")
def apis(trio: tuple[Node, Node, Node]) -> Iterator[dict[str, Api]]:
    out = {n.name: Api(n) for n in trio}
    try:
        yield out
    finally:
        for api in out.values():
            api.close()
