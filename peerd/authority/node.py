"""Operations on a node's own identity that the daemon and the offline CLI share: its
membership request and certificate, identity succession, and retirement.

**Retiring a node** (`peerd revoke --identity`): the node signs an identity revocation and marks
its keys as retired *before* the statement leaves (`Keystore.retire`: from then on the keystore
refuses to load, so the daemon never starts again); the daemon (or, offline, an operator on
another node) then publishes it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from peerd.authority.texts import MembershipRequest, describe_membership
from peerd.errors import PeerdError
from peerd.keystore import Keystore
from protocol.identity import (
    Membership,
    Revocation,
    Succession,
    fingerprint,
    format_authority_key,
)

if TYPE_CHECKING:
    from peerd.store import Store


class MembershipError(PeerdError):
    """A membership certificate that this node cannot use."""

    hint = "ask the network authority for a certificate for this node (peerd membership request)"


class NodeExpelled(PeerdError):
    """This node's identity was revoked by the network authority: its peers refuse it, so the
    daemon stops instead of queueing what can only time out (exit code 8, no restart)."""

    hint = "ask the network authority to admit this node again, with a new identity"


# -- operations on a node's keys and store (the daemon's and the offline CLI's) ----------------


def request_for(keys_dir: str | os.PathLike[str], network: str) -> MembershipRequest:
    """This node's membership request (no passphrase needed)."""
    public = Keystore.read_public(keys_dir)
    return MembershipRequest(network, public.peer_id, public.identity_public)


def check_membership(
    keys: Keystore,
    membership: Membership,
    *,
    network: str,
    authority_key: bytes | None,
    now: float,
) -> None:
    """Refuse a certificate this node could not use: raises `MembershipError`."""
    if membership.network != network:
        raise MembershipError(
            f"this membership is for network {membership.network!r}; this node is in {network!r}"
        )
    if membership.peer_id != keys.peer_id:
        raise MembershipError(f"this membership is for another node ({membership.peer_id})")
    if membership.identity_public != keys.identity_public:
        raise MembershipError(
            "this membership is for another identity key of this node "
            f"({fingerprint(membership.identity_public)}, now {keys.fingerprint})",
            hint="ask the authority for a new one: peerd membership request",
        )
    if authority_key is not None and membership.authority_public != authority_key:
        raise MembershipError(
            "this membership is signed by another authority "
            f"({format_authority_key(membership.authority_public)}) than [network] authority_key",
        )
    membership.verify_signature()
    if now >= membership.not_after:
        raise MembershipError(f"this membership expired at {membership.not_after}")


async def install_membership(
    keys: Keystore,
    store: Store,
    membership: Membership,
    *,
    network: str,
    authority_key: bytes | None,
    now: float,
) -> dict[str, Any]:
    check_membership(keys, membership, network=network, authority_key=authority_key, now=now)
    keys.set_membership(membership.encode(), authority_key=authority_key)
    info = describe_membership(membership)
    async with store.transaction(now) as tx:
        await tx.log(
            "own-membership",
            keys.peer_id,
            {k: info[k] for k in ("network", "authority_key", "not_before", "not_after")},
        )
    return {**info, "authority_configured": authority_key is not None}


async def succeed_identity(
    keys: Keystore, store: Store, *, now: float, certificate_days: int
) -> tuple[Succession, dict[str, Any]]:
    previous = keys.fingerprint
    had_membership = keys.membership is not None and (
        keys.membership.identity_public == keys.identity_public
    )
    link = keys.succeed_identity(now, certificate_days=certificate_days)
    await store.record_own_succession(link, keys.certificate, now=now)
    return link, {
        "peer": keys.peer_id,
        "fingerprint": keys.fingerprint,
        "previous_fingerprint": previous,
        "index": link.index,
        "serial": keys.serial,
        "membership_lost": had_membership,
    }


async def retire_identity(keys: Keystore, store: Store, *, reason: str, now: float) -> Revocation:
    statement = keys.revoke_identity(now, reason=reason)
    keys.retire(statement)  # before anything leaves: this node must never run again
    await store.record_own_revocation(statement, now=now)
    return statement
