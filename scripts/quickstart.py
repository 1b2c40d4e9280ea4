"""Quickstart demo (interim): two nodes' session managers complete a peerd handshake through
a private Mosquitto and exchange an encrypted message; every step is printed. The daemon-based
demo (three nodes, a model file) replaces this as the daemon lands."""

from __future__ import annotations

import asyncio
import sys
import time

import aiomqtt

from protocol.errors import RemoteProtocolError
from protocol.noise import KeyPair
from protocol.session import Message, SendFrame, SessionManager, SessionUp
from tests.support.broker import Broker


class _Trust:
    def __init__(self, keys: dict[str, bytes], trusted: set[str]) -> None:
        self.keys, self.trusted = keys, trusted

    def authenticate(
        self, credentials, remote_static, now, *, expected_peer=None, allow_unknown=False
    ):  # type: ignore[no-untyped-def]
        peer = credentials.decode()
        if self.keys.get(peer) != remote_static or peer not in self.trusted:
            raise RemoteProtocolError("unknown peer", reason="unknown-peer")
        return type("Auth", (), {"peer_id": peer})()

    def refuse_hello(self, peer_id: str) -> str | None:
        return None if peer_id in self.trusted else "unknown-peer"

    def invite_psk(self, invite_id: bytes, now: float) -> None:
        return None


async def main() -> int:
    keys = {name: KeyPair.generate() for name in ("alice", "bob")}
    pub = {n: k.public for n, k in keys.items()}
    nodes = {
        n: SessionManager(
            peer_id=n,
            network="quickstart",
            static=keys[n],
            credentials=n.encode(),
            trust=_Trust(pub, {"alice", "bob"} - {n}),
        )
        for n in keys
    }
    with Broker() as broker:
        print(f"private Mosquitto on {broker.url}")
        done = asyncio.Event()
        async with (
            aiomqtt.Client("127.0.0.1", broker.port, identifier="alice") as a,
            aiomqtt.Client("127.0.0.1", broker.port, identifier="bob") as b,
        ):
            clients = {"alice": a, "bob": b}
            for n, c in clients.items():
                await c.subscribe(f"peerd/v1/quickstart/in/{n}")

            async def pump(name: str) -> None:
                async for msg in clients[name].messages:
                    payload = msg.payload
                    assert isinstance(payload, bytes)
                    for out in nodes[name].receive(payload, time.monotonic()):
                        await handle(name, out)

            async def handle(name: str, out: object) -> None:
                if isinstance(out, SendFrame):
                    print(
                        f"  {name} -> {out.peer_id}: "
                        f"frame type {out.frame[1]}, {len(out.frame)} bytes"
                    )
                    await clients[name].publish(f"peerd/v1/quickstart/in/{out.peer_id}", out.frame)
                elif isinstance(out, SessionUp):
                    ms = (out.completed_at - out.started_at) * 1e3
                    print(f"  {name}: session with {out.peer_id} up ({ms:.2f} ms since HELLO)")
                    if name == "alice":
                        for o in nodes["alice"].send("bob", b"hello, encrypted", time.monotonic()):
                            await handle("alice", o)
                elif isinstance(out, Message):
                    print(f"  {name} received {out.payload!r} from {out.peer_id}")
                    done.set()

            tasks = [asyncio.create_task(pump(n)) for n in clients]
            print("alice connects to bob (Noise_XX_25519_ChaChaPoly_BLAKE2b):")
            for out in nodes["alice"].connect("bob", time.monotonic()):
                await handle("alice", out)
            await asyncio.wait_for(done.wait(), 10)
            for t in tasks:
                t.cancel()
    print("quickstart: OK")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
