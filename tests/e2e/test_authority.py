"""Authority mode and identity-level key management, end to end: real daemons configured with
one authority key on a private Mosquitto, driven through the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peerd.authority import AuthorityKey, MembershipRequest, membership_to_text
from peerd.keystore import Keystore
from tests.e2e.rogue import RogueNode
from tests.support.broker import Broker
from tests.support.cluster import (
    PEERD,
    ROOT,
    UNREACHABLE,
    Node,
    log_in,
    make_nodes,
    pair,
    wait_until,
)

DAY = 86400


class Authority:
    """A network authority's key directory, driven through the real `peerd authority`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.key = self.run("init", "--json")["authority_key"]

    def run(self, *args: str) -> Any:
        result = subprocess.run(
            [*PEERD, "authority", *args[:1], "--dir", str(self.dir), *args[1:]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if "--json" in args else result.stdout.strip()

    def admit(self, node: Node) -> str:
        """The member's request, signed, installed on it (through its daemon if running)."""
        request = node.cli("membership", "request").strip()
        certificate: str = self.run("issue", request)
        node.cli("membership", "install", certificate)
        return certificate


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "authority")


def _members(tmp_path: Path, broker: Broker, authority: Authority, names: list[str]) -> list[Node]:
    return make_nodes(tmp_path, broker.url, names, authority_key=authority.key)


@pytest.fixture
def trio(tmp_path: Path, broker: Broker, authority: Authority) -> Iterator[list[Node]]:
    nodes = _members(tmp_path, broker, authority, ["alice", "bob", "carol"])
    try:
        yield nodes
    finally:
        for n in nodes:
            n.kill()


def _closed(event: dict[str, Any], peer: str) -> bool:
    return event["event"] in ("session.closed", "session.down") and event["data"]["peer"] == peer


def _audit(node: Node, kind: str, peer: str) -> list[dict[str, Any]]:
    return [e for e in node.json("audit", "show") if e["kind"] == kind and e["peer_id"] == peer]


# -- membership --------------------------------------------------------------------------------


def test_members_open_sessions_and_exchange_messages_without_pairing(
    trio: list[Node], authority: Authority
) -> None:
    a, b, c = trio
    authority.admit(a)  # offline: the daemon is not running yet
    a.start()
    b.start()
    c.start()
    authority.admit(b)  # through b's daemon: new handshakes carry it at once
    authority.admit(c)
    assert b.status()["membership"]["usable"] is True
    b.cli("connect", a.peer_id)
    c.cli("connect", b.peer_id)
    a.wait_connected(b)
    b.wait_connected(a)
    c.wait_connected(b)
    for x, y in ((a, b), (b, a), (b, c), (c, b)):
        record = x.peers()[y.peer_id]
        assert (record["state"], record["source"]) == ("trusted", "authority")
        assert record["fingerprint"] == y.fingerprint
    a.cli("msg", "send", b.peer_id, "fl/round", "weights are ready")
    c.cli("msg", "send", b.peer_id, "fl/round", "mine too")
    out = b.cli("msg", "listen", "fl/round", "--count", "2", "--timeout", "30", timeout=60)
    assert sorted(out.splitlines()) == ["mine too", "weights are ready"]
    # Nobody paired: no invite was ever issued or used, no fingerprint typed.
    for node in trio:
        kinds = {e["kind"] for e in node.json("audit", "show")}
        assert not kinds & {"invite-created", "invite-used", "peer-pending"}


def test_a_node_without_membership_is_refused(trio: list[Node], authority: Authority) -> None:
    a, _, c = trio
    authority.admit(a)
    a.start()
    c.start()  # configured with the authority key, but never admitted
    c.cli("connect", a.peer_id)
    wait_until(lambda: a.status()["rejections"].get("unknown-peer"), 15, what="a refusing c")
    a.cli("connect", c.peer_id)  # and the other way round: a refuses c's credentials
    wait_until(lambda: a.status()["rejections"].get("unknown-peer", 0) >= 2, 15, what="again")
    assert not a.connected_to(c)
    assert c.peer_id not in a.peers()
    shown = c.run_cli("membership", "show")
    assert shown.returncode == 1
    assert "no membership" in shown.stdout


def test_an_expired_membership_is_refused(trio: list[Node], authority: Authority) -> None:
    a, b, _ = trio
    authority.admit(a)
    public = Keystore.read_public(b.dir / "keys")
    request = MembershipRequest(b.network, b.peer_id, public.identity_public)
    key = AuthorityKey.load(authority.dir)
    expired, _ = key.issue(request, days=1, now=time.time() - 2 * DAY)
    text = membership_to_text(expired)
    # The CLI refuses to install it (it could never work) ...
    refused = b.run_cli("membership", "install", text)
    assert refused.returncode == 5, refused.stderr
    assert "expired" in refused.stderr
    # ... so put it in place as a member whose certificate ran out would have it.
    Keystore.load(b.dir / "keys", now=time.time()).set_membership(expired.encode())
    shown = b.json("membership", "show")
    assert shown["usable"] is False
    assert shown["problems"] == ["expired"]
    a.start()
    b.start()
    b.cli("connect", a.peer_id)
    wait_until(lambda: a.status()["rejections"].get("expired"), 15, what="a refusing b")
    assert not a.connected_to(b)
    assert b.peer_id not in a.peers()
    # A fresh certificate (installed through the running daemon) lets b in at once.
    authority.admit(b)
    b.cli("connect", a.peer_id)
    a.wait_connected(b)


# -- authority revocation -------------------------------------------------------------------


def _stops_expelled(node: Node) -> None:
    """An expelled node's daemon stops by itself, says why, and exits 8 (no restart)."""
    wait_until(lambda: not node.running, 20, what=f"{node.name} stopping, expelled")
    assert node.stop() == 8
    assert "was expelled from network" in node.log()


def test_authority_revocation_closes_sessions_and_reaches_offline_nodes(
    trio: list[Node], authority: Authority, tmp_path: Path, broker: Broker
) -> None:
    a, b, c = trio
    (d,) = _members(tmp_path, broker, authority, ["dave"])
    try:
        for node in (a, b, c, d):
            authority.admit(node)
        a.start()
        b.start()
        c.start()
        d.start()
        b.cli("connect", a.peer_id)
        b.cli("connect", c.peer_id)
        c.cli("connect", a.peer_id)
        d.cli("connect", b.peer_id)
        a.wait_connected(b)
        a.wait_connected(c)
        c.wait_connected(b)
        d.wait_connected(b)
        assert d.peers()[b.peer_id]["state"] == "trusted"
        d.stop()  # offline while the authority acts; it knows b as a trusted member

        with (
            a.events("session.closed", "session.down") as at_a,
            c.events("session.closed", "session.down") as at_c,
        ):
            # The authority's machine runs a's daemon: it verifies and publishes the statement.
            out = a.cli(
                "authority", "revoke", b.peer_id, "--reason", "left the consortium",
                "--dir", str(authority.dir), "--json",
            )  # fmt: skip
            result = json.loads(out)
            closed_a = at_a.wait_for(lambda e: _closed(e, b.peer_id), 10)
            closed_c = at_c.wait_for(lambda e: _closed(e, b.peer_id), 10)
        assert result["published"] is True
        assert result["daemon"]["changed"] is True
        assert result["daemon"]["pushed"] == [c.peer_id]  # b's own sessions ended first
        (recorded,) = _audit(a, "peer-revoked", b.peer_id)
        assert recorded["detail"]["by"] == "authority"
        assert closed_a["at"] - recorded["at"] < 1.0
        assert closed_c["at"] - recorded["at"] < 1.0  # pushed in the session (or retained)
        wait_until(lambda: c.peers()[b.peer_id]["state"] == "revoked", 5, what="c revoked b")
        assert a.peers()[b.peer_id]["state"] == "revoked"
        _stops_expelled(b)

        # d was offline: the retained statement reaches it when it connects.
        d.start()
        wait_until(lambda: d.peers()[b.peer_id]["state"] == "revoked", 15, what="d learns it")
        refused_at_a = a.status()["rejections"].get("revoked", 0)
        # Whoever holds b's keys (b itself no longer runs) is refused.
        for target in (d, a):  # one rogue per attempt: each runs its own event loop
            with RogueNode.from_keys(b.dir / "keys", broker.url, network=b.network) as rogue:
                assert rogue.handshake_with(target.peer_id) is not None
        wait_until(lambda: d.status()["rejections"].get("revoked"), 15, what="d refusing b")
        wait_until(
            lambda: a.status()["rejections"].get("revoked", 0) > refused_at_a,
            15,
            what="a refusing b",
        )
        assert not d.connected_to(b)
        assert not a.connected_to(b)

        # Replayed (by hand, and by the broker at every reconnect): nothing changes.
        again = c.json("revocation", "publish", result["statement"])
        assert again["changed"] is False
        d.stop()
        d.start()
        c.stop()
        c.start()
        time.sleep(1.0)  # the retained statement is delivered right after the subscription
        for node in (a, c, d):
            assert len(_audit(node, "peer-revoked", b.peer_id)) == 1
            assert node.peers()[b.peer_id]["state"] == "revoked"
        for node in (a, c, d):
            assert node.json("audit", "verify")["ok"] is True
    finally:
        d.kill()


def test_a_foreign_or_damaged_statement_is_refused_and_changes_nothing(
    trio: list[Node], authority: Authority, tmp_path: Path
) -> None:
    a, b, _ = trio
    authority.admit(a)
    a.start()
    other = Authority(tmp_path / "other-authority")
    foreign = other.run("revoke", b.peer_id, "--network", a.network, "--no-publish")
    refused = a.run_cli("revocation", "publish", foreign)
    assert refused.returncode == 5, refused.stderr
    assert "another authority" in refused.stderr
    statement = authority.run("revoke", b.peer_id, "--network", a.network, "--no-publish")
    damaged = statement[:-3] + ("x" if statement[-3] != "x" else "y") + statement[-2:]
    refused = a.run_cli("revocation", "publish", damaged)
    assert refused.returncode != 0
    assert "checksum" in refused.stderr
    assert b.peer_id not in a.peers()
    assert not _audit(a, "peer-revoked", b.peer_id)
    # The genuine one, carried by hand to a node, is enforced there.
    assert a.json("revocation", "publish", statement)["changed"] is True
    assert a.peers()[b.peer_id]["state"] == "revoked"


def test_relayed_expulsion_under_the_shipped_acl_survives_a_broker_losing_its_database(
    tmp_path: Path, authority: Authority
) -> None:
    """The authority is no node, so the relaying node retains the statement under its own
    rev/<peer id>/ (the only place the shipped ACL lets it), and publishes it again after a
    reconnect: a broker that lost its database relearns it, and a node that connects later still
    refuses the expelled member."""
    nodes = make_nodes(
        tmp_path, UNREACHABLE, ["alice", "bob", "carol"], authority_key=authority.key
    )
    users = {n.peer_id: f"pw-{n.name}" for n in nodes}
    a, b, c = nodes
    with Broker(tmp_path / "shipped", shipped=True, users=users) as broker:
        for n in nodes:
            log_in(n, broker.url, users[n.peer_id])
            authority.admit(n)
        try:
            a.start()
            b.start()
            b.cli("connect", a.peer_id)
            a.wait_connected(b)
            out = a.cli("authority", "revoke", b.peer_id, "--dir", str(authority.dir), "--json")
            assert json.loads(out)["daemon"]["topic"].startswith(
                f"peerd/v1/{a.network}/rev/{a.peer_id}/"
            )
            _stops_expelled(b)  # b holds the statement too: only a may bring it back here
            broker.stop()
            (broker.dir / "mosquitto.db").unlink()
            broker.start()
            c.start()
            wait_until(
                lambda: c.peers().get(b.peer_id, {}).get("state") == "revoked",
                15,
                what="carol learning the expulsion from the republished statement",
            )
            # b stops again at once if started; whoever holds its keys is refused.
            with RogueNode.from_keys(
                b.dir / "keys", broker.url, network=b.network,
                username=b.peer_id, password=users[b.peer_id],
            ) as rogue:  # fmt: skip
                assert rogue.handshake_with(c.peer_id) is not None
            wait_until(lambda: c.status()["rejections"].get("revoked"), 15, what="c refusing b")
            assert not c.connected_to(b)
        finally:
            for n in nodes:
                n.kill()


# -- identity succession ---------------------------------------------------------------------


def test_identity_succession_is_followed_and_the_old_key_refused(
    tmp_path: Path, broker: Broker
) -> None:
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    try:
        a.start()
        b.start()
        pair(a, b)
        a.wait_connected(b)
        old_keys = tmp_path / "bob-keys-before"
        shutil.copytree(b.dir / "keys", old_keys)
        result = b.json("succeed-identity")
        assert result["peer"] == b.peer_id
        assert result["previous_fingerprint"] == b.fingerprint
        assert result["fingerprint"] != b.fingerprint
        assert result["daemon"] is True
        ident = b.json("id")
        assert (ident["peer_id"], ident["fingerprint"]) == (b.peer_id, result["fingerprint"])
        # Connected peers take the new key at once (a fresh handshake carries the chain).
        wait_until(
            lambda: a.peers()[b.peer_id]["fingerprint"] == result["fingerprint"],
            10,
            what="alice following bob's succession",
        )
        assert a.peers()[b.peer_id]["state"] == "trusted"
        (link,) = _audit(a, "peer-succession", b.peer_id)
        assert link["detail"]["fingerprint"] == result["fingerprint"]
        a.wait_connected(b)
        # Whoever holds bob's old identity key (and certificate) is refused from now on.
        b.stop()
        with RogueNode.from_keys(old_keys, a.broker_url, network=a.network) as rogue:
            assert rogue.handshake_with(a.peer_id) is not None
        wait_until(
            lambda: a.status()["rejections"].get("superseded-identity"),
            10,
            what="alice refusing the old identity key",
        )
        # And the real bob, restarted, is still welcome, across alice's restart too.
        a.stop()
        a.start()
        b.start()
        b.cli("connect", a.peer_id)
        a.wait_connected(b)
        assert a.peers()[b.peer_id]["fingerprint"] == result["fingerprint"]
    finally:
        a.kill()
        b.kill()


def test_succession_in_authority_mode_needs_a_new_membership(
    trio: list[Node], authority: Authority
) -> None:
    a, b, _ = trio
    authority.admit(a)
    authority.admit(b)
    a.start()
    b.start()
    b.cli("connect", a.peer_id)
    a.wait_connected(b)
    result = b.json("succeed-identity")
    request = result["membership_request"]
    assert result["membership_lost"] is True
    assert request.startswith("peerd-member-request-1-")
    # Its membership names the old key: a refuses the new handshake.
    wait_until(
        lambda: a.status()["rejections"].get("no-membership"), 15, what="a refusing b's new key"
    )
    assert a.peers()[b.peer_id]["fingerprint"] == b.fingerprint
    b.cli("membership", "install", authority.run("issue", request))
    b.cli("connect", a.peer_id)
    wait_until(
        lambda: a.peers()[b.peer_id]["fingerprint"] == result["fingerprint"],
        15,
        what="a accepting b's new key with its new membership",
    )
    a.wait_connected(b)


# -- retiring a node ---------------------------------------------------------------------------


def test_revoke_identity_makes_every_peer_refuse_the_node_for_good(
    tmp_path: Path, broker: Broker
) -> None:
    a, b, c = make_nodes(tmp_path, broker.url, ["alice", "bob", "carol"])
    try:
        a.start()
        b.start()
        c.start()
        pair(a, b)
        pair(b, c)
        a.wait_connected(b)
        c.stop()  # offline when bob retires
        stolen = tmp_path / "bob-keys-stolen"
        shutil.copytree(b.dir / "keys", stolen)
        refused = b.run_cli("revoke", "--identity", "--reason", "laptop stolen")
        assert refused.returncode == 2  # not without --yes
        assert b.running
        with a.events("session.closed", "session.down") as at_a:
            result = b.json("revoke", "--identity", "--reason", "laptop stolen", "--yes")
            closed = at_a.wait_for(lambda e: _closed(e, b.peer_id), 10)
        assert result["daemon"] is True
        assert result["published"] is True
        assert result["pushed"] == [a.peer_id]
        # bob's daemon stops by itself, cleanly, and never starts again.
        wait_until(lambda: b.proc is not None and b.proc.poll() is not None, 15, what="b exits")
        assert b.stop() == 0
        (own,) = [e for e in b.json("audit", "show") if e["kind"] == "own-revocation"]
        assert own["detail"]["kind"] == "identity"
        assert closed["at"] - own["at"] < 1.0
        run = b.run_cli("run", timeout=30)
        assert run.returncode == 7  # retired: systemd must not restart it
        assert "revoked" in run.stderr
        assert "Traceback" not in run.stderr
        wait_until(lambda: a.peers()[b.peer_id]["state"] == "revoked", 5, what="a revoked b")

        # carol was offline: she learns it from the retained statement.
        c.start()
        wait_until(lambda: c.peers()[b.peer_id]["state"] == "revoked", 15, what="c learns it")
        # The stolen keys are useless at every peer.
        for peer in (a, c):
            before = peer.status()["rejections"].get("revoked", 0)
            with RogueNode.from_keys(stolen, a.broker_url, network=a.network) as rogue:
                assert rogue.handshake_with(peer.peer_id) is not None
            wait_until(
                lambda p=peer, n=before: p.status()["rejections"].get("revoked", 0) > n,  # type: ignore[misc]
                10,
                what=f"{peer.name} refusing the stolen keys",
            )
        # Nothing un-revokes: trusting it again by fingerprint is refused.
        again = a.run_cli("trust", b.peer_id, "--fingerprint", b.fingerprint)
        assert again.returncode != 0
        assert a.peers()[b.peer_id]["state"] == "revoked"
    finally:
        for n in (a, b, c):
            n.kill()


def test_identity_commands_work_on_the_files_when_no_daemon_runs(
    trio: list[Node], authority: Authority
) -> None:
    a, b, c = trio
    authority.admit(a)
    authority.admit(b)  # offline: no daemon runs anywhere yet
    assert b.json("membership", "show")["usable"] is True
    result = b.json("succeed-identity")
    assert result["daemon"] is False
    assert result["membership_lost"] is True
    assert b.json("id")["fingerprint"] == result["fingerprint"]
    assert b.json("membership", "show")["problems"] == [
        "issued for an identity key this node has since replaced"
    ]
    b.cli("membership", "install", authority.run("issue", result["membership_request"]))
    assert b.json("membership", "show")["usable"] is True

    retired = c.json("revoke", "--identity", "--reason", "decommissioned", "--yes")
    assert retired["daemon"] is False
    assert retired["published"] is False
    run = c.run_cli("run", timeout=30)
    assert run.returncode == 7
    assert "revoked" in run.stderr
    # Carried by hand to a running node, the statement is enforced and retained there.
    a.start()
    published = a.json("revocation", "publish", retired["statement"])
    assert (published["peer"], published["kind"], published["changed"]) == (
        c.peer_id,
        "identity",
        True,
    )
    assert a.peers()[c.peer_id]["state"] == "revoked"
    assert a.json("revocation", "publish", retired["statement"])["changed"] is False
    # b, with its new key and new membership, is a member as soon as it runs.
    b.start()
    b.cli("connect", a.peer_id)
    a.wait_connected(b)
    assert a.peers()[b.peer_id]["fingerprint"] == result["fingerprint"]
