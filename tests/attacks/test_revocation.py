"""Stolen old keys against running daemons: rotation rollback (also after the verifier
restarted), a revoked static key (learned live, and by a node that was offline when it was
revoked, from the broker's retained copy), replayed, cleared and forged revocation state, and a
retired identity trying to come back. Every refusal is counted under its reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.mqtt import Topics
from protocol.identity import issue_revocation, new_identity_seed
from tests.attacks.conftest import start_cluster
from tests.attacks.helpers import SOON, Api, Rogue, keys, statement_topic
from tests.support.broker import Broker
from tests.support.cluster import Node, wait_until
from tests.support.hostile import TO_BROKER, TO_CLIENT, HostileProxy, Record


@pytest.fixture
def cluster(tmp_path: Path, module_broker: Broker, proxy: HostileProxy) -> Iterator[list[Node]]:
    nodes = start_cluster(tmp_path, module_broker, proxy, ["alice", "bob", "carol"])
    try:
        yield nodes
    finally:
        for n in nodes:
            n.kill()


def _stolen_handshake(thief: Rogue, target: Node, api: Api, reason: str) -> None:
    """The thief tries a handshake; the target refuses it and counts `reason`."""
    before = api.rejected(reason)
    thief.connect(target.peer_id)
    api.wait_rejected(reason, before + 1)
    assert thief.sessions_up() == []


def test_rollback_and_revoked_keys_are_refused_for_good(
    cluster: list[Node], proxy: HostileProxy, tmp_path: Path
) -> None:
    alice, bob, carol = cluster
    a, b, c = Api(alice), Api(bob), Api(carol)
    try:
        stolen = keys(bob, copy_to=tmp_path / "stolen-serial-1")
        # Rotation: the old certificate is refused from then on ("rollback"), also by a
        # verifier that restarted since (the highest serial is in its store).
        assert b.call("v1.rotate")["serial"] == 2
        wait_until(
            lambda: {p["peer"]: p["serial"] for p in a.call("v1.peers")}[bob.peer_id] == 2,
            SOON,
            what="alice sees serial 2",
        )
        alice.stop()
        alice.start()
        thief = Rogue.of(alice, alice.broker_url, stolen)
        try:
            _stolen_handshake(thief, alice, a, "rollback")

            # Revocation while carol is offline: she learns it from the broker's retained copy
            # when she comes back, and refuses the stolen key although it was the last one
            # she had seen.
            carol.stop()
            published = proxy.add_rule(TO_BROKER, "peerd/v1/+/rev/#", Record(), client=bob.peer_id)
            assert b.call("v1.revoke", reason="laptop stolen")["revoked_through"] == 2
            wait_until(lambda: published.applied, SOON, what="bob publishes his statement")
            _stolen_handshake(thief, alice, a, "revoked")
            carol.start()
            _stolen_handshake(thief, carol, c, "revoked")

            # Replayed revocation state changes nothing and is no error; forged statements
            # are refused and counted; clearing the retained copy un-revokes nothing.
            # (Bob's index, rev/<bob>/index, carries the same statement: SPEC 2.1.) Bob
            # publishes his one statement again (read-back, republish): same topic, same bytes.
            recorded = [
                r for r in proxy.recordings("peerd/v1/+/rev/#") if not r.topic.endswith("/index")
            ]
            statement = recorded[0]
            assert {(r.topic, r.payload) for r in recorded} == {
                (statement.topic, statement.payload)
            }
            log_before = a.call("v1.audit.verify")["entries"]
            refused_before = {k: v for k, v in a.rejections().items() if "revocation" in k}
            proxy.replay([statement], direction=TO_CLIENT, client=alice.peer_id)
            forged = bytearray(statement.payload)
            forged[-1] ^= 1  # the signature's last byte
            # On the genuine statement's topic it is refused before any verification: the
            # topic names the statement by its hash.
            proxy.inject(TO_CLIENT, statement.topic, bytes(forged), client=alice.peer_id)
            a.wait_rejected("revocation-topic-mismatch")
            forged_topic = statement_topic(alice, bob.peer_id, bytes(forged))
            proxy.inject(TO_CLIENT, forged_topic, bytes(forged), client=alice.peer_id)
            a.wait_rejected("revocation-bad-signature")
            other = issue_revocation(
                new_identity_seed(), peer_id=bob.peer_id, kind="identity", now=time.time()
            ).encode()
            proxy.inject(
                TO_CLIENT, statement_topic(alice, bob.peer_id, other), other, client=alice.peer_id
            )
            a.wait_rejected("revocation-unknown-signer")
            junk = b"\x98junk"
            proxy.inject(
                TO_CLIENT, statement_topic(alice, bob.peer_id, junk), junk, client=alice.peer_id
            )
            a.wait_rejected("revocation-malformed")
            # An index (on the topic alice watches for bob) that is not one is refused whole.
            proxy.inject(
                TO_CLIENT,
                Topics(alice.network).revocation_index(bob.peer_id),
                junk,
                client=alice.peer_id,
            )
            a.wait_rejected("revocation-index-malformed")
            assert a.call("v1.audit.verify")["entries"] == log_before
            refused = {k: v for k, v in a.rejections().items() if "revocation" in k}
            assert set(refused) - set(refused_before) == {
                "revocation-topic-mismatch",
                "revocation-bad-signature",
                "revocation-unknown-signer",
                "revocation-malformed",
                "revocation-index-malformed",
            }
            proxy.inject(TO_BROKER, statement.topic, b"", client=bob.peer_id, retain=True)
            a.wait_rejected("revocation-cleared")
            alice.stop()
            alice.start()
            _stolen_handshake(thief, alice, a, "revoked")
        finally:
            thief.close()
        # The real bob, on his new key, is welcome. (Not while the thief listens on bob's inbox
        # - possible here, the test broker has no ACL: it would answer alice's HELLOs to bob
        # with the revoked key, and alice aborts at the first wrong answer - SECURITY.md 4.)
        a.call("v1.connect", peer=bob.peer_id)
        wait_until(lambda: a.connected(bob), SOON, what="alice and bob on serial 3")
    finally:
        for api in (a, b, c):
            api.close()


def test_a_retired_identity_cannot_come_back(cluster: list[Node], tmp_path: Path) -> None:
    alice, _, carol = cluster
    a = Api(alice)
    try:
        stolen = keys(carol, copy_to=tmp_path / "stolen-carol")
        carol.cli("revoke", "--identity", "--yes", "--reason", "decommissioned")
        wait_until(
            lambda: {p["peer"]: p["state"] for p in a.call("v1.peers")}[carol.peer_id] == "revoked",
            SOON,
            what="alice learns carol's identity revocation",
        )
        thief = Rogue.of(alice, alice.broker_url, stolen)
        try:
            # Refused before any cryptography: the HELLO's claim alone is enough.
            _stolen_handshake(thief, alice, a, "revoked")
            result = alice.run_cli("trust", carol.peer_id, "--fingerprint", carol.fingerprint)
            assert result.returncode != 0
            assert "revoked" in result.stderr
            alice.stop()
            alice.start()
            _stolen_handshake(thief, alice, a, "revoked")
            assert {p["peer"]: p["state"] for p in a.call("v1.peers")}[carol.peer_id] == "revoked"
            assert alice.run_cli("audit", "verify").returncode == 0
        finally:
            thief.close()
    finally:
        a.close()
