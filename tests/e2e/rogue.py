"""A rogue participant for attack tests: speaks the wire protocol with whatever keys and
credentials it is given (stolen, old, forged), over the real broker, without a trust store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from peerd.keystore import Keystore
from peerd.mqtt import BrokerSettings, Message, MqttLink, Topics
from protocol.noise import KeyPair
from protocol.session import (
    HandshakeFailed,
    Output,
    SendFrame,
    SessionLimits,
    SessionManager,
    SessionUp,
)


class _Anyone:
    """The rogue's trust policy: it accepts whoever answers."""

    def authenticate(self, credentials: bytes, remote_static: bytes, now: float, **_: Any) -> Any:
        from protocol.identity import Credentials  # noqa: PLC0415

        creds = Credentials.decode(credentials)
        return type("Peer", (), {"peer_id": creds.certificate.peer_id})()

    def refuse_hello(self, peer_id: str) -> str | None:
        return None

    def invite_psk(self, invite_id: bytes, now: float) -> bytes | None:
        return None

    def closed_invite(self, invite_id: bytes) -> str | None:
        return None


class RogueNode:
    def __init__(
        self,
        *,
        peer_id: str,
        static: KeyPair,
        credentials: bytes,
        broker_url: str,
        network: str,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.topics = Topics(network)
        self.manager = SessionManager(
            peer_id=peer_id,
            network=network,
            static=static,
            credentials=credentials,
            trust=_Anyone(),
            limits=SessionLimits(handshake_timeout=0.5, handshake_attempts=2),
        )
        self.settings = BrokerSettings.from_url(
            broker_url, client_id=peer_id, username=username, password=password
        )
        self.outcomes: asyncio.Queue[Output] = asyncio.Queue()

    @classmethod
    def from_keys(
        cls,
        keys_dir: Path,
        broker_url: str,
        *,
        network: str,
        username: str | None = None,
        password: str | None = None,
    ) -> RogueNode:
        keys = Keystore.load(keys_dir, now=time.time())
        return cls(
            peer_id=keys.peer_id,
            static=keys.static,
            credentials=keys.credentials(),
            broker_url=broker_url,
            network=network,
            username=username,
            password=password,
        )

    def __enter__(self) -> RogueNode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def handshake_with(self, target: str, timeout: float = 10.0) -> str | None:
        """Try a handshake; None if a session came up, else the failure reason."""
        return asyncio.run(self._handshake(target, within=timeout))

    async def _handshake(self, target: str, *, within: float) -> str | None:
        async with MqttLink(self.settings) as link:

            def handle(outs: list[Output]) -> None:
                for out in outs:
                    if isinstance(out, SendFrame):
                        link.publish_nowait(self.topics.inbox(out.peer_id), out.frame)
                    elif isinstance(out, SessionUp | HandshakeFailed):
                        self.outcomes.put_nowait(out)

            def on_inbox(msg: Message) -> None:
                handle(self.manager.receive(msg.payload, time.time()))

            await link.subscribe(self.topics.inbox(self.peer_id), qos=0, handler=on_inbox)
            handle(self.manager.connect(target, time.time()))
            deadline = time.monotonic() + within
            while time.monotonic() < deadline:
                handle(self.manager.on_timer(time.time()))
                try:
                    out = await asyncio.wait_for(self.outcomes.get(), 0.1)
                except TimeoutError:
                    continue
                return None if isinstance(out, SessionUp) else out.reason
            return "timeout"
