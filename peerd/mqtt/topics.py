"""peerd's topic layout and MQTT topic filter matching."""

from __future__ import annotations

import hashlib
import re

from peerd.mqtt.errors import BrokerSettingsError
from peerd.mqtt.settings import CLIENT_ID

__all__ = ["Topics", "check_filter", "statement_id", "topic_matches"]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` matches the MQTT filter (`+` one level, `#` the rest, `$` not by both)."""
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level not in ("+", t[i])):
            return False
    return len(f) == len(t)


def statement_id(statement: bytes) -> str:
    """The topic level of a revocation statement: 16 bytes of BLAKE2b-256 over it, in hex."""
    digest = hashlib.blake2b(b"peerd/v1/statement-id\0" + statement, digest_size=32).digest()
    return digest[:16].hex()


class Topics:
    """The topic layout of one network (protocol/SPEC.md section 2).

    `in/<peer-id>` inboxes, `rev/<issuer>/<statement-id>` retained revocations,
    `x/<sender>/<transfer-id>` chunk topics, all under `peerd/v1/<network>/`.
    """

    def __init__(self, network: str) -> None:
        raw = network.encode()
        if not 1 <= len(raw) <= 64 or network.startswith("$") or any(c in network for c in "/+#\0"):
            raise BrokerSettingsError(
                f"invalid network name {network!r}: 1-64 bytes, one MQTT topic level (no / + #)"
            )
        self.network = network
        self.prefix = f"peerd/v1/{network}/"
        self.revocations = f"{self.prefix}rev/#"  # the filter every node subscribes to

    def inbox(self, peer_id: str) -> str:
        _check_peer_id(peer_id)
        return f"{self.prefix}in/{peer_id}"

    def revocation(self, issuer: str, statement: bytes) -> str:
        _check_peer_id(issuer)
        return f"{self.prefix}rev/{issuer}/{statement_id(statement)}"

    def revocation_index(self, issuer: str) -> str:
        """The issuer's retained index of its statements: a topic a node can name without
        knowing the statements, so an exact subscription gets the retained copy on brokers that
        send none to wildcard subscriptions (RabbitMQ; protocol/SPEC.md 2.1)."""
        _check_peer_id(issuer)
        return f"{self.prefix}rev/{issuer}/{INDEX_LEVEL}"

    def transfer(self, sender: str, transfer_id: bytes) -> str:
        """A transfer's chunk topic. The sender's id is a level of its own so that a broker
        ACL can let only the sender publish there (`pattern write .../x/%u/+`)."""
        _check_peer_id(sender)
        if len(transfer_id) != 16:
            raise ValueError("a transfer id is 16 bytes")
        return f"{self.prefix}x/{sender}/{transfer_id.hex()}"

    def early(self, sender: str, receiver: str) -> str:
        """Where `sender` publishes the chunks it sends `receiver` before the Accept (SPEC 7.7):
        a topic of the receiver's own under the sender's chunk topics, so the shipped ACL's
        rules for chunks hold (only the sender publishes under `x/<sender>/`)."""
        _check_peer_id(sender)
        _check_peer_id(receiver)
        return f"{self.prefix}x/{sender}/{receiver}"

    def early_filter(self, receiver: str) -> str:
        """The filter a node subscribes to for early chunks from any sender."""
        _check_peer_id(receiver)
        return f"{self.prefix}x/+/{receiver}"

    def parse(self, topic: str) -> tuple[str, tuple[str, ...]] | None:
        """("in", (peer,)), ("rev", (issuer, statement id)), ("rev-index", (issuer,)) or ("x",
        (sender, transfer id hex)); None for anything else (not ours, or malformed)."""
        if not topic.startswith(self.prefix):
            return None
        parts = topic[len(self.prefix) :].split("/")
        kind, rest = parts[0], tuple(parts[1:])
        if kind == "in" and len(rest) == 1 and CLIENT_ID.match(rest[0]):
            return kind, rest
        if kind == "rev" and len(rest) == 2 and CLIENT_ID.match(rest[0]) and _HEX32.match(rest[1]):
            return kind, rest
        if kind == "rev" and len(rest) == 2 and CLIENT_ID.match(rest[0]) and rest[1] == INDEX_LEVEL:
            return "rev-index", rest[:1]
        if kind == "x" and len(rest) == 2 and CLIENT_ID.match(rest[0]) and _HEX32.match(rest[1]):
            return kind, rest
        return None


_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
INDEX_LEVEL = "index"  # never a statement id (32 hex digits)


def _check_peer_id(peer_id: str) -> None:
    if not CLIENT_ID.match(peer_id):
        raise ValueError(f"invalid peer id {peer_id!r}")


def check_filter(topic_filter: str) -> bytes:
    raw = topic_filter.encode()
    if not raw or len(raw) > 65535 or "\0" in topic_filter:
        raise ValueError(f"invalid MQTT topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or (
            "#" in level and (level != "#" or i < len(levels) - 1)
        ):
            raise ValueError(f"invalid MQTT topic filter {topic_filter!r}")
    return raw
