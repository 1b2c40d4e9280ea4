"""Transfers on brokers with small packet limits (issue 12): the chunk size follows the limit in
force (an MQTT 5 broker's CONNACK, `[broker] max_packet_size`, or the link's probe at connect
for a broker that drops larger messages silently or closes the connection over them), a limit
no chunk fits is a clear error at once, and chunks a broker drops after all (its limit lowered
since the probe) are a clear error within seconds, not a hang."""

from __future__ import annotations

import contextlib
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
    with _nodes(tmp_path, broker_conf, node_conf) as (a, b, _):
        yield a, b


@contextlib.contextmanager
def _nodes(
    tmp_path: Path, broker_conf: str, node_conf: dict[str, str]
) -> Iterator[tuple[Node, Node, Broker]]:
    with Broker(tmp_path / "broker", extra_conf=broker_conf) as broker:
        a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
        for node in (a, b):
            _configure(node, **node_conf)
            node.start()
        try:
            pair(a, b)
            yield a, b, broker
        finally:
            a.kill()
            b.kill()


def _send_identical(a: Node, b: Node, tmp_path: Path, size: int, name: str) -> None:
    src = random_file(tmp_path / name, size)
    result = a.json("send", str(src), "--to", b.peer_id, "--wait", timeout=600)
    assert result["state"] == "verified"
    got = [f for f in received_files(b, a) if f.name == name]
    assert [sha256(f) for f in got] == [sha256(src)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("limited", "source"),
    [
        (("max_packet_size 131072\n", {"mqtt_version": "auto"}), "broker"),
        (("message_size_limit 131072\n", {"mqtt_version": "3.1.1"}), "probe"),
    ],
    ids=["mqtt5-max-packet-size", "mqtt311-message-size-limit-probed"],
    indirect=["limited"],
)
def test_256_mib_through_a_128_kib_limit_arrives_identical(
    limited: tuple[Node, Node], source: str, tmp_path: Path
) -> None:
    a, b = limited
    _send_identical(a, b, tmp_path, 256 << 20, "model.bin")
    broker = a.status()["broker"]
    assert broker["limits"]["source"] == source
    assert broker["max_packet_size"] <= 131072


@pytest.mark.parametrize(
    "limited",
    [
        ("message_size_limit 131072\n", {"mqtt_version": "3.1.1", "max_packet_size": "128KiB"}),
        # A 3.1.1 client is disconnected for a packet above max_packet_size: the probe finds it.
        ("max_packet_size 131072\n", {"mqtt_version": "3.1.1"}),
        ("message_size_limit 131072\n", {"mqtt_version": "5"}),
    ],
    ids=["mqtt311-configured", "mqtt311-disconnects-probed", "mqtt5-silent-probed"],
    indirect=True,
)
def test_8_mib_through_a_limit_said_or_found(limited: tuple[Node, Node], tmp_path: Path) -> None:
    a, b = limited
    _send_identical(a, b, tmp_path, 8 << 20, "model.safetensors.bin")
    assert a.status()["broker"]["max_packet_size"] <= 131072


def test_a_broker_that_lowers_its_limit_unsaid_is_a_clear_error_then_fits(
    tmp_path: Path,
) -> None:
    """The probe at connect found no limit; the broker comes back with one it does not state
    (a lie by omission): the transfer ends with an error naming the chunk size instead of
    hanging, nothing is left half-received, and the next transfer fits the new limit."""
    with _nodes(tmp_path, "", {"mqtt_version": "3.1.1"}) as (a, b, broker):
        _send_identical(a, b, tmp_path, 1 << 20, "first.bin")
        assert a.status()["broker"]["limits"]["source"] == "configured"
        broker.extra_conf = "message_size_limit 131072\n"
        broker.restart()
        src = random_file(tmp_path / "second.bin", 8 << 20)
        with pytest.raises(CliError) as err:
            a.cli("send", str(src), "--to", b.peer_id, "--wait", timeout=120)
        assert "no chunk of 262144 bytes was acknowledged" in str(err.value)
        assert not [f for f in received_files(b, a) if f.name == "second.bin"]
        _send_identical(a, b, tmp_path, 8 << 20, "third.bin")
        assert a.status()["broker"]["limits"]["source"] == "probe"


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
