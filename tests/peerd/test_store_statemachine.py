"""A Hypothesis state machine over the trust store: handshakes, rotations, revocations, time and
restarts (the store reopened from its file). Invariants: no revoked key and no superseded key
ever authenticates, no session outlives its certificate's overlap or revocation, the view rebuilt
from the file equals the live one, and the event log always verifies."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from peerd.store import Store
from protocol.identity import (
    CLOCK_SKEW,
    KeyCertificate,
    TrustError,
    issue_revocation,
)
from protocol.noise import KeyPair
from tests.protocol.test_identity_helpers import NOW, Node

OVERLAP = 7200.0


def event(label: str) -> None:
    """Hypothesis' coverage label; a no-op when the machine is driven by hand."""
    with contextlib.suppress(InvalidArgument):
        _event(label)


PEERS = 2
MAX_VERSIONS = 6


@dataclass
class PeerModel:
    node: Node
    versions: list[tuple[KeyPair, KeyCertificate]] = field(default_factory=list)
    paired: bool = False
    identity_revoked: bool = False
    revoked_through: int = 0
    highest_seen: int = 0
    superseded_at: dict[int, float] = field(default_factory=dict)

    def credentials(self, serial: int) -> tuple[bytes, bytes]:
        static, cert = self.versions[serial - 1]
        self.node.static, self.node.cert = static, cert
        return self.node.credentials(), static.public


class TrustMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="peerd-sm-"))
        self.now = NOW
        self.me = Node()
        self.store = self.run(self._open(create=True))
        self.run(
            self.store.init_identity(
                peer_id=self.me.peer_id,
                name="me",
                identity_public=self.me.identity_public,
                certificate=self.me.cert,
                now=self.now,
            )
        )
        self.peers = []
        for _ in range(PEERS):
            node = Node(now=self.now)
            self.peers.append(PeerModel(node, [(node.static, node.cert)]))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _open(self, *, create: bool = False) -> Store:
        return await Store.open(
            self.dir / "peerd.db", network="lab", overlap=OVERLAP, create=create
        )

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------

    def _valid(self, cert: KeyCertificate) -> bool:
        return cert.not_before <= self.now + CLOCK_SKEW and self.now < cert.not_after

    def _must_refuse(self, peer: PeerModel, serial: int) -> bool:
        return (
            peer.identity_revoked or serial <= peer.revoked_through or (serial < peer.highest_seen)
        )

    # -- rules -----------------------------------------------------------------------------

    @rule(
        i=st.integers(0, PEERS - 1),
        back=st.sampled_from([0, 0, 0, 1, 2]),
        allow_unknown=st.booleans(),
    )
    def handshake(self, i: int, back: int, allow_unknown: bool) -> None:
        peer = self.peers[i]
        serial = max(1, len(peer.versions) - back)
        creds, static = peer.credentials(serial)
        cert = peer.versions[serial - 1][1]
        expected = (
            not self._must_refuse(peer, serial)
            and self._valid(cert)
            and (peer.paired or allow_unknown)
        )
        view = self.store.view()
        try:
            auth = view.authenticate(creds, static, self.now, allow_unknown=allow_unknown)
        except TrustError:
            assert not expected, f"serial {serial} of peer {i} refused unexpectedly"
            return
        assert expected, f"serial {serial} of peer {i} accepted but must not be"
        event(
            "handshake: rotation recorded"
            if serial > max(1, peer.highest_seen)
            else "handshake: accepted"
        )
        assert auth.certificate_is_new == (serial > peer.highest_seen)
        self.run(self.store.record_authenticated(auth, now=self.now))
        peer.paired = True
        if serial > peer.highest_seen:
            if peer.highest_seen:
                peer.superseded_at[peer.highest_seen] = self.now
            peer.highest_seen = serial

    @precondition(lambda self: any(len(p.versions) < MAX_VERSIONS for p in self.peers))
    @rule(i=st.integers(0, PEERS - 1))
    def rotate(self, i: int) -> None:
        peer = self.peers[i]
        if len(peer.versions) >= MAX_VERSIONS:
            return
        peer.node.serial = len(peer.versions)
        peer.node.rotate(self.now)
        peer.versions.append((peer.node.static, peer.node.cert))

    @rule(
        i=st.integers(0, PEERS - 1),
        kind=st.sampled_from(["static", "static", "static", "identity"]),
        data=st.data(),
    )
    def revoke(self, i: int, kind: str, data: st.DataObject) -> None:
        peer = self.peers[i]
        through = data.draw(st.integers(1, len(peer.versions))) if kind == "static" else 0
        statement = issue_revocation(
            peer.node.seed, peer_id=peer.node.peer_id, kind=kind, serial=through, now=self.now
        ).encode()
        changed = self.run(self.store.record_revocation(statement, now=self.now))
        if kind == "static":
            assert changed == (through > peer.revoked_through)
            peer.revoked_through = max(peer.revoked_through, through)
        else:
            assert changed == (not peer.identity_revoked)
            peer.identity_revoked = True
        # A replay is idempotent.
        assert not self.run(self.store.record_revocation(statement, now=self.now))

    @rule(seconds=st.sampled_from([60, 3600, OVERLAP, 86400, 10 * 86400]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def restart(self) -> None:
        before = _view_state(self.store)
        self.run(self.store.close())
        self.store = self.run(self._open())
        assert _view_state(self.store) == before

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def no_revoked_or_superseded_key_authenticates(self) -> None:
        view = self.store.view()
        for peer in self.peers:
            for serial in range(1, len(peer.versions) + 1):
                if not self._must_refuse(peer, serial):
                    continue
                creds, static = peer.credentials(serial)
                for allow_unknown in (False, True):
                    try:
                        view.authenticate(creds, static, self.now, allow_unknown=allow_unknown)
                    except TrustError:
                        continue
                    raise AssertionError(f"revoked or superseded serial {serial} accepted")

    @invariant()
    def sessions_end_with_their_overlap(self) -> None:
        view = self.store.view()
        for peer in self.peers:
            for serial in range(1, len(peer.versions) + 1):
                cert = peer.versions[serial - 1][1]
                try:
                    deadline = view.check_session(peer.node.peer_id, serial, self.now)
                except TrustError:
                    continue
                assert peer.paired
                assert not peer.identity_revoked
                assert serial > peer.revoked_through
                assert self.now < deadline <= cert.not_after
                if serial != peer.highest_seen:
                    event("session on a superseded certificate within its overlap")
                    assert serial < peer.highest_seen
                    assert self.now < peer.superseded_at[serial] + OVERLAP
                    assert deadline <= peer.superseded_at[serial] + OVERLAP

    @invariant()
    def current_sessions_go_on(self) -> None:
        view = self.store.view()
        for peer in self.peers:
            serial = peer.highest_seen
            if not serial or peer.identity_revoked or serial <= peer.revoked_through:
                continue
            cert = peer.versions[serial - 1][1]
            if self.now < cert.not_after:
                assert view.check_session(peer.node.peer_id, serial, self.now) == cert.not_after

    @invariant()
    def log_verifies(self) -> None:
        self.run(self.store.verify_log())


def _view_state(store: Store) -> tuple[Any, ...]:
    view = store.view()
    peers = sorted(view.peers(), key=lambda p: p.peer_id)
    return (peers, {p.peer_id: view.revoked_through(p.peer_id) for p in peers})


TrustMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTrustStore = TrustMachine.TestCase
