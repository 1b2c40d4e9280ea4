"""A thief of a succeeded identity key against running daemons (protocol/SPEC.md 6.8).

After bob succeeds his identity key, only a thief (or a forgotten backup) still holds the old
one: the node erased it. Whatever it signs about bob - an identity revocation (final), a static
revocation with a huge serial (every future certificate) - is refused by a peer that follows
bob's chain, by the broker path and by hand, and counted; bob stays trusted and connected.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from peerd.authority import statement_to_text
from protocol.identity import issue_revocation
from tests.attacks.helpers import Api, Wire, keys, statement_topic
from tests.support.broker import Broker
from tests.support.cluster import make_nodes, pair, wait_until


@pytest.mark.slow
def test_a_thief_of_a_succeeded_identity_key_cannot_revoke_the_node(
    tmp_path: Path, broker: Broker
) -> None:
    alice, bob = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    alice.start()
    bob.start()
    api = None
    wire = None
    try:
        pair(alice, bob)
        alice.wait_connected(bob)
        stolen = keys(bob, copy_to=tmp_path / "bob-keys-backup")
        new = bob.json("succeed-identity")
        wait_until(
            lambda: alice.peers()[bob.peer_id]["fingerprint"] == new["fingerprint"],
            15,
            what="alice following bob's succession",
        )
        api = Api(alice)
        now = time.time()
        kill = stolen.revoke_identity(now, reason="stolen").encode()
        every_serial = issue_revocation(
            stolen.signing_key().encode(),
            peer_id=bob.peer_id,
            kind="static",
            serial=2**40,
            now=now,
        ).encode()
        # Retained on the broker under bob's own revocation topic, as bob's account could.
        wire = Wire(broker.url)
        for statement in (kill, every_serial):
            wire.publish(statement_topic(alice, bob.peer_id, statement), statement, retain=True)
        api.wait_rejected("revocation-superseded-signer", 2)
        # Carried by hand to alice's daemon: refused too.
        by_hand = alice.run_cli("revocation", "publish", statement_to_text(kill))
        assert by_hand.returncode != 0
        assert "succeeded" in by_hand.stderr, by_hand.stderr
        assert alice.peers()[bob.peer_id]["state"] == "trusted"
        assert api.connected(bob)
        # The owner, with the current key, still can (the rule did not take that away).
        bob.json("revoke", "--identity", "--reason", "retired", "--yes")
        wait_until(
            lambda: alice.peers()[bob.peer_id]["state"] == "revoked",
            15,
            what="alice learning bob's own revocation",
        )
    finally:
        if wire is not None:
            wire.close()
        if api is not None:
            api.close()
        alice.kill()
        bob.kill()
