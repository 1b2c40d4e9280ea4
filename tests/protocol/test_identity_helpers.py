"""Test support for the identity tests (no tests here): a simulated node with its keys."""

from __future__ import annotations

from protocol.identity import (
    Credentials,
    KeyCertificate,
    Membership,
    Succession,
    issue_certificate,
    issue_membership,
    issue_succession,
    new_identity_seed,
    peer_id_for,
)
from protocol.identity._codec import ed25519_public
from protocol.noise import KeyPair

DAY = 86400
NOW = 1_750_000_000.0  # a fixed "now" (June 2025): tests never read the clock


class Node:
    """A node's keys, as a keystore would hold them, kept in memory."""

    def __init__(self, seed: bytes | None = None, *, now: float = NOW) -> None:
        self.seed = seed if seed is not None else new_identity_seed()
        self.first_identity = ed25519_public(self.seed)
        self.peer_id = peer_id_for(self.first_identity)
        self.successions: tuple[Succession, ...] = ()
        self.serial = 0
        self.membership: Membership | None = None
        self.static = KeyPair.generate()
        self.cert: KeyCertificate = self.rotate(now)

    @property
    def identity_public(self) -> bytes:
        return ed25519_public(self.seed)

    def rotate(self, now: float = NOW, *, lifetime: int = 30 * DAY) -> KeyCertificate:
        self.serial += 1
        self.static = KeyPair.generate()
        self.cert = issue_certificate(
            self.seed,
            peer_id=self.peer_id,
            static_public=self.static.public,
            serial=self.serial,
            now=now,
            lifetime=lifetime,
        )
        return self.cert

    def succeed(self, now: float = NOW) -> Succession:
        new_seed = new_identity_seed()
        link = issue_succession(
            self.seed, new_seed, peer_id=self.peer_id, index=len(self.successions) + 1, now=now
        )
        self.successions = (*self.successions, link)
        self.seed = new_seed
        self.rotate(now)
        return link

    def join_authority(
        self, authority_seed: bytes, network: str, now: float = NOW, lifetime: int = 365 * DAY
    ) -> Membership:
        self.membership = issue_membership(
            authority_seed,
            network=network,
            peer_id=self.peer_id,
            identity_public=self.identity_public,
            now=now,
            lifetime=lifetime,
        )
        return self.membership

    def credentials(self, *, with_membership: bool = True) -> bytes:
        membership = self.membership if with_membership else None
        return Credentials(self.successions, self.cert, membership).encode()
