"""Authority mode and identity-level key management.

- `peerd.authority.texts`: the text forms people copy between machines;
- `peerd.authority.key`: the network authority's key directory (offline, no daemon);
- `peerd.authority.node`: a node's own membership, succession and retirement, shared by the
  daemon and the offline CLI;
- `peerd.authority.extension`: the daemon extension behind `peerd membership install`,
  `peerd revocation publish`, `peerd succeed-identity` and `peerd revoke --identity`.

This package's names are the offline ones: importing it loads no control socket or MQTT code
(`peerd authority ...` runs without a daemon). The daemon imports the extension itself.

The **authority** is an Ed25519 key in a directory of its own (`peerd authority init`), kept
offline; it needs no daemon and no node. It signs membership certificates (section 6.4 of the
spec) for the members of one network, and authority revocations that expel a member. Every
member configures its public key (`[network] authority_key`) and then trusts every valid member
without pairing.

Text forms (one line each, checksummed like invite tokens, so a damaged paste is reported
rather than misread): `peerd-member-request-1-...` (what a member asks the authority to sign:
network, peer id, current identity key), `peerd-membership-1-...` (the signed certificate) and
`peerd-revocation-1-...` (any revocation statement, so one can be carried to a node that
publishes it). Each is `prefix version "-" base32(payload || check)` with `check` the first 4
bytes of BLAKE2b-256(context || payload), base32 and parsing as in spec 6.5.

**Publishing an authority revocation.** The broker ACL lets a node retain statements only under
`rev/<its own peer id>/` (spec 2.3), and the authority is not a node: so a member's daemon
relays it (`v1.revocation.publish`). The daemon first verifies the statement against its own
trust store (it refuses what it would not enforce itself), records it, pushes it to its
connected peers and retains it under its own id. Relayed statements are noted in the trust
event log (`revocation-relayed`) and published again after every reconnect, as an issuer does
with its own.

**Retiring a node** (`peerd revoke --identity`): the node signs an identity revocation, marks
its keys as retired *before* the statement leaves (`Keystore.retire`: from then on the keystore
refuses to load, so the daemon never starts again), pushes it to its peers, retains it on the
broker, waits for the broker's acknowledgement, and stops.
"""

from __future__ import annotations

from peerd.authority.key import AuthorityError, AuthorityKey, default_authority_dir
from peerd.authority.node import (
    MembershipError,
    check_membership,
    install_membership,
    request_for,
    retire_identity,
    succeed_identity,
)
from peerd.authority.texts import (
    MEMBERSHIP_TEXT,
    REQUEST_TEXT,
    STATEMENT_TEXT,
    MembershipRequest,
    describe_membership,
    describe_statement,
    membership_from_text,
    membership_to_text,
    statement_from_text,
    statement_to_text,
)

__all__ = [
    "MEMBERSHIP_TEXT",
    "REQUEST_TEXT",
    "STATEMENT_TEXT",
    "AuthorityError",
    "AuthorityKey",
    "MembershipError",
    "MembershipRequest",
    "check_membership",
    "default_authority_dir",
    "describe_membership",
    "describe_statement",
    "install_membership",
    "membership_from_text",
    "membership_to_text",
    "request_for",
    "retire_identity",
    "statement_from_text",
    "statement_to_text",
    "succeed_identity",
]
