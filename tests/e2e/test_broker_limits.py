"""Transfers on brokers with small packet limits (issue 12): the chunk size follows the limit in
force (an MQTT 5 broker's CONNACK, or `[broker] max_packet_size` for a 3.1.1 broker that drops
larger messages silently), and a limit no chunk fits is a clear error at once, not a hang."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.cluster import CliError, Node, make_nodes, pair
from tests.support.files import random_file, received_files, sha256


def _configure(node: Node, **broker: str) -> None:
    conf = node.config.read_text()
    for key, value in broker.items():
        conf, n = re.subn(rf"(?m)^#? ?{key} = .*$", f'{key} = "{value}"', conf, count=1)
        assert n == 1, f"no {key} line in the config"
    node.config.write_text(conf)


@pytest.fixture
def limited(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Node, Node]]:
    broker_conf, node_conf = request.param
    with Broker(tmp_path / "broker", extra_conf=broker_conf) as broker:
        a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
        for node in (a, b):
            _configure(node, **node_conf)
            node.start()
        try:
            pair(a, b)
            yield a, b
        finally:
            a.kill()
            b.kill()


@pytest.mark.slow
@pytest.mark.parametrize(
    "limited",
    [
        ("max_packet_size 131072\n", {"mqtt_version": "auto"}),
        ("message_size_limit 131072\n", {"mqtt_version": "3.1.1", "max_packet_size": "128KiB"}),
    ],
    ids=["mqtt5-max-packet-size", "mqtt311-message-size-limit"],
    indirect=True,
)
def test_256_mib_through_a_128_kib_limit_arrives_identical(
    limited: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = limited
    assert a.status()["broker"]["max_packet_size"] == 131072
    src = random_file(tmp_path / "model.bin", 256 << 20)
    result = a.json("send", str(src), "--to", b.peer_id, "--wait", timeout=600)
    assert result["state"] == "verified"
    (got,) = received_files(b, a)
    assert sha256(got) == sha256(src)


@pytest.mark.parametrize(
    "limited", [("max_packet_size 16384\n", {"mqtt_version": "5"})], indirect=True
)
def test_a_limit_no_chunk_fits_is_a_clear_error_at_once(
    limited: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = limited
    src = random_file(tmp_path / "model.bin", 1 << 20)
    with pytest.raises(CliError) as err:
        a.cli("send", str(src), "--to", b.peer_id, "--wait", timeout=15)
    assert "packet limit of 16384 bytes" in str(err.value)
