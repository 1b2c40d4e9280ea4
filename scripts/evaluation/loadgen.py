"""One process playing many peers of a daemon under test, with the protocol library.

Each peer is a real identity (`peerd.keystore.Keystore`, made by the parent), has its own MQTT
connection logged in as its peer id (so the shipped ACL applies to it as to a daemon) and its
own `protocol.session.SessionManager`, the same state machine the daemon runs. It pins the
daemon under test by fingerprint in a `TrustView`, so it authenticates the daemon as a daemon
authenticates its peers, and answers handshakes (the daemon initiates). It also answers the
plaintext exchanges of `plain.py`, so the same N connections serve the baseline.
`handshake_frame_sizes` runs one such handshake in memory for the sizes of its frames, which
the plaintext baselines (this evaluation's and `scripts/bench handshake`'s floor) send.

    python -m scripts.evaluation.loadgen CONFIG.json

CONFIG: {"url": broker URL without credentials, "network", "target": daemon peer id,
"target_fingerprint", "peers": [{"dir": keys directory, "password"}]}. It prints {"ready": N}
once every peer is connected and subscribed, then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from peerd.keystore import Keystore
from peerd.mqtt import BrokerSettings, Message, MqttLink, Topics
from protocol.identity import parse_fingerprint
from protocol.identity.trust import Authenticated, TrustView
from protocol.session import SendFrame, SessionLimits, SessionManager, SessionUp
from scripts.evaluation.plain import answer_exchange


class PinnedTrust:
    """A node that trusts exactly one peer, pinned by fingerprint (the daemon's own logic)."""

    def __init__(self, me: str, network: str, peer: str, fp: str) -> None:
        self.view = TrustView(self_peer_id=me, network=network, overlap=3600.0)
        record = self.view.plan_trust(peer, parse_fingerprint(fp), time.time())
        assert record is not None
        self.view.put_peer(record)

    def authenticate(
        self,
        credentials: bytes,
        remote_static: bytes,
        now: float,
        *,
        expected_peer: str | None = None,
        allow_unknown: bool = False,
    ) -> Authenticated:
        return self.view.authenticate(
            credentials, remote_static, now, expected_peer=expected_peer, allow_unknown=False
        )

    def refuse_hello(self, peer_id: str) -> str | None:
        return None if self.view.could_accept(peer_id) else "unknown-peer"

    def invite_psk(self, invite_id: bytes, now: float) -> bytes | None:
        return None

    def closed_invite(self, invite_id: bytes) -> str | None:
        return None


def handshake_frame_sizes(ka: Keystore, kb: Keystore, network: str) -> tuple[int, int, int, int]:
    """Sizes of HELLO, REPLY, FINISH and the responder's confirmation of a handshake from `ka`
    to `kb`, from the session layer itself (in memory): the plaintext baselines' sizes."""
    now = time.time()
    managers = {
        k.peer_id: SessionManager(
            peer_id=k.peer_id,
            network=network,
            static=k.static,
            credentials=k.credentials(),
            trust=PinnedTrust(k.peer_id, network, other.peer_id, other.fingerprint),
        )
        for k, other in ((ka, kb), (kb, ka))
    }
    sizes: list[int] = []
    queue = list(managers[ka.peer_id].connect(kb.peer_id, now))
    while queue:
        out = queue.pop(0)
        if isinstance(out, SendFrame):
            sizes.append(len(out.frame))
            queue += managers[out.peer_id].receive(out.frame, now)
        elif isinstance(out, SessionUp) and out.initiator:
            break
    if len(sizes) != 4:
        raise RuntimeError(f"a handshake took {len(sizes)} frames, not 4")
    return sizes[0], sizes[1], sizes[2], sizes[3]


class Peer:
    def __init__(self, keys: Keystore, password: str, config: dict[str, Any]) -> None:
        self.id = keys.peer_id
        self.topics = Topics(config["network"])
        self.manager = SessionManager(
            peer_id=keys.peer_id,
            network=config["network"],
            static=keys.static,
            credentials=keys.credentials(),
            trust=PinnedTrust(
                keys.peer_id, config["network"], config["target"], config["target_fingerprint"]
            ),
            limits=SessionLimits(),
        )
        settings = BrokerSettings.from_url(
            config["url"], client_id=keys.peer_id, username=keys.peer_id, password=password
        )
        self.link = MqttLink(settings)

    def on_inbox(self, msg: Message) -> None:
        if answer_exchange(self.link, self.topics, self.id, msg.payload):
            return
        self.handle(self.manager.receive(msg.payload, time.time()))

    def handle(self, outputs: list[Any]) -> None:
        for out in outputs:
            if isinstance(out, SendFrame):
                self.link.publish_nowait(self.topics.inbox(out.peer_id), out.frame)

    async def start(self) -> None:
        await self.link.__aenter__()
        await self.link.wait_connected(60)
        await self.link.subscribe(
            self.topics.inbox(self.id), qos=0, handler=self.on_inbox, timeout=30
        )


async def serve(config: dict[str, Any]) -> None:
    now = time.time()
    peers = [
        Peer(Keystore.load(Path(p["dir"]), now=now), p["password"], config) for p in config["peers"]
    ]
    # Connect in batches: a burst of hundreds of CONNECTs is not what is being measured.
    for i in range(0, len(peers), 25):
        await asyncio.gather(*(p.start() for p in peers[i : i + 25]))
    sys.stdout.write(json.dumps({"ready": len(peers)}) + "\n")
    sys.stdout.flush()
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    eof = asyncio.ensure_future(reader.read())
    while not eof.done():
        # Timers of the session layer (expiry of half-open handshakes, superseded sessions).
        now = time.time()
        for peer in peers:
            peer.handle(peer.manager.on_timer(now))
        await asyncio.wait([eof], timeout=0.2)
    for peer in peers:
        await peer.link.close()


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
