"""A small world of session managers for protocol tests: nodes, a trust policy over a shared
directory of public keys, and a network that routes frames between inboxes (losslessly, or
through a fault function)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.errors import RemoteProtocolError
from protocol.noise import KeyPair
from protocol.session import (
    Output,
    SendFrame,
    SessionLimits,
    SessionManager,
)


@dataclass(frozen=True)
class Peer:
    peer_id: str


@dataclass
class Directory:
    """Who holds which static key, and whom each node trusts."""

    keys: dict[str, bytes] = field(default_factory=dict)
    trusts: dict[str, set[str]] = field(default_factory=dict)
    invites: dict[str, dict[bytes, bytes]] = field(default_factory=dict)


class DirectoryTrust:
    """The test's trust policy: credentials are the peer id; the Noise static key proves it."""

    def __init__(self, owner: str, directory: Directory) -> None:
        self.owner = owner
        self.directory = directory

    def authenticate(
        self,
        credentials: bytes,
        remote_static: bytes,
        now: float,
        *,
        expected_peer: str | None = None,
        allow_unknown: bool = False,
    ) -> Peer:
        peer_id = credentials.decode()
        if self.directory.keys.get(peer_id) != remote_static:
            raise RemoteProtocolError("credentials do not match the static key", reason="forged")
        if not allow_unknown and peer_id not in self.directory.trusts.get(self.owner, set()):
            raise RemoteProtocolError(f"{peer_id} is not trusted", reason="unknown-peer")
        if expected_peer is not None and peer_id != expected_peer:
            raise RemoteProtocolError("not the peer meant", reason="wrong-peer")
        return Peer(peer_id)

    def refuse_hello(self, peer_id: str) -> str | None:
        return None if peer_id in self.directory.trusts.get(self.owner, set()) else "unknown-peer"

    def invite_psk(self, invite_id: bytes, now: float) -> bytes | None:
        return self.directory.invites.get(self.owner, {}).get(invite_id)

    def closed_invite(self, invite_id: bytes) -> str | None:
        return None


def make_node(
    name: str,
    directory: Directory,
    *,
    network: str = "testnet",
    network_psk: bytes | None = None,
    limits: SessionLimits | None = None,
    credentials: bytes | None = None,
    static: KeyPair | None = None,
) -> SessionManager:
    static = static or KeyPair.generate()
    directory.keys.setdefault(name, static.public)
    return SessionManager(
        peer_id=name,
        network=network,
        static=static,
        credentials=credentials if credentials is not None else name.encode(),
        trust=DirectoryTrust(name, directory),
        network_psk=network_psk,
        limits=limits,
    )


Fault = Callable[[str, bytes], list[bytes]]


class Network:
    """Routes SendFrame outputs to the managers' `receive`, collecting every other output."""

    def __init__(self, *nodes: SessionManager, fault: Fault | None = None) -> None:
        self.nodes = {n.peer_id: n for n in nodes}
        self.events: dict[str, list[Output]] = {n.peer_id: [] for n in nodes}
        self.wire: list[tuple[str, bytes]] = []  # (destination, frame) of everything sent
        self.fault = fault
        self.now = 1000.0

    def deliver(self, origin: str, outputs: list[Output]) -> None:
        queue = [(origin, o) for o in outputs]
        while queue:
            src, out = queue.pop(0)
            if not isinstance(out, SendFrame):
                self.events[src].append(out)
                continue
            self.wire.append((out.peer_id, out.frame))
            target = self.nodes.get(out.peer_id)
            if target is None:
                continue
            frames = self.fault(out.peer_id, out.frame) if self.fault else [out.frame]
            for frame in frames:
                queue.extend((target.peer_id, o) for o in target.receive(frame, self.now))

    def of(self, name: str, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events[name] if isinstance(e, kind)]

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for node in self.nodes.values():
            self.deliver(node.peer_id, node.on_timer(self.now))


def trusted_pair(
    directory: Directory | None = None, **kwargs: object
) -> tuple[SessionManager, SessionManager, Network]:
    directory = directory or Directory()
    a = make_node("alice", directory, **kwargs)  # type: ignore[arg-type]
    b = make_node("bob", directory, **kwargs)  # type: ignore[arg-type]
    directory.trusts["alice"] = {"bob"}
    directory.trusts["bob"] = {"alice"}
    return a, b, Network(a, b)
