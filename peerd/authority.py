"""Authority mode and identity-level key management: the network authority's key, the text
forms people copy between machines, and the daemon extension behind `peerd membership ...`,
`peerd revocation publish`, `peerd succeed-identity` and `peerd revoke --identity`.

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

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

from peerd.control import Connection, only, optional, require
from peerd.errors import PeerdError, UsageError
from peerd.keystore import (
    DEFAULT_SEAL_LIMITS,
    Keystore,
    load_key_file,
    read_key_file_public,
    write_key_file,
)
from peerd.mqtt import BrokerError, statement_id
from protocol.identity import (
    MAX_MEMBERSHIP_LIFETIME,
    AuthorityRevocation,
    InvalidText,
    MalformedObject,
    Membership,
    PeerState,
    Revocation,
    Succession,
    check_network_name,
    decode_statement,
    fingerprint,
    format_authority_key,
    is_peer_id,
    issue_authority_revocation,
    issue_membership,
    new_identity_seed,
)
from protocol.identity._codec import (
    bytes_to_text,
    decode_symbols,
    digest,
    ed25519_public,
    pack,
    text_to_bytes,
    unpack,
    want_bytes,
    want_str,
    want_version,
)
from protocol.messaging import RevocationPush

if TYPE_CHECKING:
    from peerd.daemon import Daemon
    from peerd.store import Store

log = logging.getLogger("peerd.authority")

DAY: Final = 86400
TEXT_VERSION: Final = 1
_CHECK_BYTES: Final = 4
MAX_TEXT: Final = 4096  # characters of a pasted text form; the largest (a statement) is ~1.7 k
RETIRE_DRAIN: Final = 5.0  # s to wait for the broker to acknowledge a retiring node's statement
RETIRE_STOP_AFTER: Final = 0.5  # s between answering `v1.revoke.identity` and stopping
MEMBERSHIP_WARN: Final = 7 * DAY  # a membership closer than this to its end is logged daily
REPUBLISH_POLL: Final = 2.0  # s between looks at the broker link's connect counter


class AuthorityError(PeerdError):
    """The authority key is missing, unreadable or refused the operation."""

    hint = "check the authority directory (--dir) and its passphrase (--passphrase-file)"


class MembershipError(PeerdError):
    """A membership certificate that this node cannot use."""

    hint = "ask the network authority for a certificate for this node (peerd membership request)"


# -- text forms ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TextForm:
    prefix: str
    context: bytes
    what: str
    hint: str

    def encode(self, payload: bytes) -> str:
        check = digest(self.context, payload)[:_CHECK_BYTES]
        return f"{self.prefix}{TEXT_VERSION}-{bytes_to_text(payload + check)}"

    def decode(self, text: str) -> bytes:
        if len(text) > MAX_TEXT:
            raise InvalidText(f"this is too long to be a {self.what}", hint=self.hint)
        cleaned = "".join(text.split()).lower()
        if not cleaned.startswith(self.prefix):
            raise InvalidText(f"this is not a {self.what} ({self.prefix}...)", hint=self.hint)
        version, sep, body = cleaned[len(self.prefix) :].partition("-")
        # ASCII digits only, and few (see InviteToken.from_text: found by fuzzing).
        if not sep or not (version.isascii() and version.isdigit()) or len(version) > 6:
            raise InvalidText(f"the {self.what} has no version", hint=self.hint)
        if int(version) != TEXT_VERSION:
            raise InvalidText(
                f"the {self.what} has version {version}; this peerd reads version {TEXT_VERSION}",
                hint="use a peerd of the same version on both sides",
            )
        raw = text_to_bytes(
            decode_symbols(body, what=self.what, hint=self.hint), what=self.what, hint=self.hint
        )
        if len(raw) <= _CHECK_BYTES:
            raise InvalidText(f"the {self.what} is truncated", hint=self.hint)
        payload, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
        if digest(self.context, payload)[:_CHECK_BYTES] != check:
            raise InvalidText(f"the {self.what} is damaged (checksum mismatch)", hint=self.hint)
        return payload


REQUEST_TEXT = _TextForm(
    "peerd-member-request-",
    b"peerd/v1/member-request\0",
    "membership request",
    "copy the whole line `peerd membership request` printed on the member",
)
MEMBERSHIP_TEXT = _TextForm(
    "peerd-membership-",
    b"peerd/v1/membership-text\0",
    "membership certificate",
    "copy the whole line `peerd authority issue` printed",
)
STATEMENT_TEXT = _TextForm(
    "peerd-revocation-",
    b"peerd/v1/revocation-text\0",
    "revocation statement",
    "copy the whole line `peerd authority revoke` or `peerd revoke --identity` printed",
)


@dataclass(frozen=True, slots=True)
class MembershipRequest:
    """What a member asks the authority to certify. Unsigned on purpose: a certificate for
    someone else's key is useless to whoever asked, since only the key's holder can present it;
    the authority decides *whom* to admit by comparing the fingerprint out of band."""

    network: str
    peer_id: str
    identity_public: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity_public)

    def encode(self) -> bytes:
        return pack([TEXT_VERSION, self.network, self.peer_id, self.identity_public])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = unpack(data, what="membership request", max_size=128, length=4)
        want_version(f[0], "membership request", TEXT_VERSION)
        network = want_str(f[1], "membership request network", 32)
        peer_id = want_str(f[2], "membership request peer id", 23)
        if not is_peer_id(peer_id):
            raise MalformedObject("the membership request names no valid peer id")
        try:
            check_network_name(network)
        except PeerdError as exc:
            raise MalformedObject(f"the membership request's network: {exc}") from exc
        return cls(network, peer_id, want_bytes(f[3], "membership request identity key", 32))

    def to_text(self) -> str:
        return REQUEST_TEXT.encode(self.encode())

    @classmethod
    def from_text(cls, text: str) -> Self:
        payload = REQUEST_TEXT.decode(text)
        try:
            return cls.decode(payload)
        except MalformedObject as exc:
            raise InvalidText(f"the membership request is invalid: {exc}") from exc


def membership_to_text(membership: Membership) -> str:
    return MEMBERSHIP_TEXT.encode(membership.encode())


def membership_from_text(text: str) -> Membership:
    payload = MEMBERSHIP_TEXT.decode(text)
    try:
        return Membership.decode(payload)
    except MalformedObject as exc:
        raise InvalidText(f"the membership certificate is invalid: {exc}") from exc


def statement_to_text(statement: bytes) -> str:
    return STATEMENT_TEXT.encode(statement)


def statement_from_text(text: str) -> bytes:
    """The encoded statement (either kind), checked to decode; signatures are not checked."""
    payload = STATEMENT_TEXT.decode(text)
    try:
        decode_statement(payload)
    except MalformedObject as exc:
        raise InvalidText(f"the revocation statement is invalid: {exc}") from exc
    return payload


def describe_statement(statement: Revocation | AuthorityRevocation) -> dict[str, Any]:
    if isinstance(statement, AuthorityRevocation):
        return {
            "peer": statement.peer_id,
            "kind": "authority",
            "network": statement.network,
            "authority_key": format_authority_key(statement.authority_public),
            "issued_at": statement.issued_at,
            "reason": statement.reason,
        }
    return {
        "peer": statement.peer_id,
        "kind": statement.kind,
        "serial": statement.serial,
        "issued_at": statement.issued_at,
        "reason": statement.reason,
    }


def describe_membership(membership: Membership) -> dict[str, Any]:
    return {
        "peer": membership.peer_id,
        "network": membership.network,
        "fingerprint": fingerprint(membership.identity_public),
        "authority_key": format_authority_key(membership.authority_public),
        "not_before": membership.not_before,
        "not_after": membership.not_after,
    }


# -- the authority's key directory ----------------------------------------------------------------

AUTHORITY_KEY_FILE: Final = "authority.key"
ISSUED_LOG: Final = "issued.log"
_KEY_KIND: Final = "authority"  # not "ed25519": a node's identity file is never taken for it
MAX_ISSUED_LOG: Final = 64 << 20


def default_authority_dir() -> Path:
    """$PEERD_AUTHORITY_DIR, else $XDG_DATA_HOME/peerd/authority (~/.local/share/...)."""
    explicit = os.environ.get("PEERD_AUTHORITY_DIR")
    if explicit:
        return Path(explicit).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "peerd" / "authority"


class AuthorityKey:
    """The network authority's signing key, loaded (and unsealed) from its directory.

    The directory (mode 0700) holds `authority.key` (mode 0600, the keystore's key file format,
    sealed with Argon2id when created with a passphrase) and `issued.log`, one JSON line per
    certificate or revocation issued, so the authority knows whom it admitted.
    """

    def __init__(self, directory: Path, seed: bytes) -> None:
        self.dir = directory
        self._seed = seed
        self.public = ed25519_public(seed)

    def __repr__(self) -> str:
        return f"AuthorityKey({self.key_text!r})"

    @property
    def key_text(self) -> str:
        return format_authority_key(self.public)

    @staticmethod
    def exists(directory: str | os.PathLike[str]) -> bool:
        return (Path(directory) / AUTHORITY_KEY_FILE).exists()

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        passphrase: bytes | None = None,
        seal_limits: tuple[int, int] = DEFAULT_SEAL_LIMITS,
    ) -> AuthorityKey:
        d = Path(directory).expanduser()
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise AuthorityError(f"cannot create {d}: {exc.strerror}") from exc
        _check_private_dir(d)
        if cls.exists(d):
            raise AuthorityError(
                f"an authority key already exists in {d}",
                hint="`peerd authority key` prints its public key; use another --dir for another",
            )
        seed = new_identity_seed()
        write_key_file(
            d / AUTHORITY_KEY_FILE,
            _KEY_KIND,
            ed25519_public(seed),
            seed,
            passphrase=passphrase,
            seal_limits=seal_limits,
        )
        return cls(d, seed)

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, passphrase: bytes | None = None
    ) -> AuthorityKey:
        d = Path(directory).expanduser()
        _require_key(d)
        _check_private_dir(d)
        seed, _ = load_key_file(d / AUTHORITY_KEY_FILE, _KEY_KIND, passphrase=passphrase)
        return cls(d, seed)

    @staticmethod
    def read_public(directory: str | os.PathLike[str]) -> tuple[bytes, bool]:
        """(public key, sealed?), without the passphrase."""
        d = Path(directory).expanduser()
        _require_key(d)
        return read_key_file_public(d / AUTHORITY_KEY_FILE, _KEY_KIND)

    def issue(
        self, request: MembershipRequest, *, days: float, now: float
    ) -> tuple[Membership, dict[str, Any]]:
        lifetime = int(days * DAY)
        if not 0 < lifetime <= MAX_MEMBERSHIP_LIFETIME:
            raise UsageError(
                f"a membership is valid for 1 s .. {MAX_MEMBERSHIP_LIFETIME // DAY} days"
            )
        membership = issue_membership(
            self._seed,
            network=request.network,
            peer_id=request.peer_id,
            identity_public=request.identity_public,
            now=now,
            lifetime=lifetime,
        )
        record = {
            "at": int(now),
            "action": "membership",
            **describe_membership(membership),
        }
        self._log(record)
        return membership, record

    def revoke(
        self, *, network: str, peer_id: str, reason: str, now: float
    ) -> tuple[AuthorityRevocation, dict[str, Any]]:
        if len(reason.encode("utf-8")) > 256:
            raise UsageError("a revocation reason has at most 256 bytes")
        statement = issue_authority_revocation(
            self._seed, network=network, peer_id=peer_id, now=now, reason=reason
        )
        record = {"at": int(now), "action": "revocation", **describe_statement(statement)}
        self._log(record)
        return statement, record

    def _log(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        path = self.dir / ISSUED_LOG
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise AuthorityError(f"cannot append to {path}: {exc.strerror}") from exc

    @staticmethod
    def records(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Everything this authority issued, oldest first (readable without the passphrase)."""
        path = Path(directory).expanduser() / ISSUED_LOG
        try:
            with path.open("rb") as f:
                data = f.read(MAX_ISSUED_LOG + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise AuthorityError(f"cannot read {path}: {exc.strerror}") from exc
        if len(data) > MAX_ISSUED_LOG:
            raise AuthorityError(f"{path} is larger than {MAX_ISSUED_LOG >> 20} MiB")
        out = []
        for n, line in enumerate(data.splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise AuthorityError(f"{path}, line {n}, is damaged") from exc
            if isinstance(record, dict):
                out.append(record)
        return out

    @classmethod
    def network_of(cls, directory: str | os.PathLike[str], peer_id: str) -> str | None:
        """The network of the latest membership issued to `peer_id`, if any."""
        networks = [
            r.get("network")
            for r in cls.records(directory)
            if r.get("action") == "membership" and r.get("peer") == peer_id
        ]
        return str(networks[-1]) if networks and networks[-1] else None


def _require_key(d: Path) -> None:
    if not (d / AUTHORITY_KEY_FILE).exists():
        raise AuthorityError(
            f"no authority key in {d}",
            hint="create one with `peerd authority init --dir DIR`, or point --dir at it",
        )


def _check_private_dir(d: Path) -> None:
    try:
        mode = d.stat().st_mode
    except OSError as exc:
        raise AuthorityError(f"cannot read {d}: {exc.strerror}") from exc
    if mode & 0o077:
        raise AuthorityError(
            f"the authority directory {d} is accessible to other users", hint=f"chmod 700 {d}"
        )


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


# -- the daemon extension ------------------------------------------------------------------------

EVENTS: Final = ("membership.installed", "identity.succeeded", "identity.revoked")


class Authority:
    """Plugged into the daemon: membership, relayed revocations, succession, retirement."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._relayed: set[str] | None = None  # statement ids this node relays (lazy)
        self._expelled_logged = False
        daemon._extensions.append(self)
        for name in EVENTS:
            daemon.control.add_event(name)
        self._register()

    # -- daemon hooks ------------------------------------------------------------------------

    async def run(self) -> None:
        seen_connects = 0
        next_check = 0.0
        while True:
            link = self.d.link
            if link.connected and link.stats.connects != seen_connects:
                seen_connects = link.stats.connects
                await self._republish()
            now = time.time()
            if now >= next_check:
                self._check_own_membership(now)
                next_check = now + DAY
            await asyncio.sleep(REPUBLISH_POLL)

    async def stop(self) -> None:
        return None

    def trust_changed(self) -> None:
        record = self.d.store.view().peer(self.d.peer_id)
        if record is not None and record.state is PeerState.REVOKED and not self._expelled_logged:
            self._expelled_logged = True
            log.error(
                "this node has been revoked (by the network authority or with its own key): "
                "its peers refuse it from now on"
            )

    def status(self) -> dict[str, Any]:
        keys = self.d.keys
        membership = keys.membership
        usable = membership is not None and membership.identity_public == keys.identity_public
        authority = self.d.config.network.authority_public
        own = self.d.store.view().peer(self.d.peer_id)
        return {
            "authority_key": None if authority is None else format_authority_key(authority),
            "membership": None
            if membership is None
            else {
                "network": membership.network,
                "not_after": membership.not_after,
                "usable": usable and time.time() < membership.not_after,
            },
            "revoked": own is not None and own.state is PeerState.REVOKED,
        }

    def _check_own_membership(self, now: float) -> None:
        m = self.d.keys.membership
        if m is None or self.d.config.network.authority_public is None:
            return
        if now >= m.not_after:
            log.error("this node's membership expired: members refuse new sessions with it")
        elif m.not_after - now < MEMBERSHIP_WARN:
            log.warning(
                "this node's membership expires in %.1f days: ask the authority for a new one",
                (m.not_after - now) / DAY,
            )

    # -- relaying revocations ----------------------------------------------------------------

    async def _relayed_ids(self) -> set[str]:
        if self._relayed is None:
            rows = await self.d.store.fetchall(
                "SELECT detail FROM events WHERE kind = 'revocation-relayed'"
            )
            self._relayed = {json.loads(r[0])["statement_id"] for r in rows}
        return self._relayed

    async def _republish(self) -> None:
        relayed = await self._relayed_ids()
        if not relayed:
            return
        for statement in await self.d.store.revocation_statements():
            if statement_id(statement) in relayed:
                self.d._publish_revocation(statement)

    async def publish(self, statement: bytes) -> dict[str, Any]:
        """Verify, record, push to connected peers and retain on the broker a statement that
        someone else issued (the authority's, or a node's carried here as text)."""
        now = time.time()
        parsed = decode_statement(statement)
        changed = await self.d.store.record_revocation(statement, now=now)
        sid = statement_id(statement)
        relayed = await self._relayed_ids()
        if sid not in relayed:
            async with self.d.store.transaction(now) as tx:
                await tx.log(
                    "revocation-relayed",
                    parsed.peer_id,
                    {"statement_id": sid, **describe_statement(parsed)},
                )
            relayed.add(sid)
        pushed = self._push(statement)
        self.d._publish_revocation(statement)
        if changed:
            self.d._publish_event("trust.revoked", {"via": "command", "peer": parsed.peer_id})
        return {
            **describe_statement(parsed),
            "changed": changed,
            "pushed": pushed,
            "topic": self.d.topics.revocation(self.d.peer_id, statement),
        }

    def _push(self, statement: bytes) -> list[str]:
        push = RevocationPush(statement).encode()
        return [p for p in self.d.sessions.connected_peers() if self.d._transmit(p, push)]

    # -- this node's identity ----------------------------------------------------------------

    async def install(self, text: str) -> dict[str, Any]:
        d = self.d
        result = await install_membership(
            d.keys,
            d.store,
            membership_from_text(text),
            network=d.config.node.network,
            authority_key=d.config.network.authority_public,
            now=time.time(),
        )
        # New handshakes present it at once; running sessions do not need it.
        d.sessions.set_identity(d.keys.static, d.keys.credentials())
        d._publish_event("membership.installed", result)
        return result

    async def succeed(self) -> dict[str, Any]:
        d = self.d
        now = time.time()
        link, result = await succeed_identity(
            d.keys, d.store, now=now, certificate_days=d.config.keys.certificate_days
        )
        d.sessions.set_identity(d.keys.static, d.keys.credentials())
        # A fresh handshake carries the new chain to every connected peer now.
        for peer in d.sessions.connected_peers():
            d._handle(d.sessions.connect(peer, now), now)
        if result["membership_lost"]:
            result["membership_request"] = MembershipRequest(
                d.config.node.network, d.keys.peer_id, d.keys.identity_public
            ).to_text()
        log.warning(
            "identity key succeeded (link %d): fingerprint %s", link.index, d.keys.fingerprint
        )
        d._publish_event("identity.succeeded", result)
        return result

    async def retire(self, reason: str) -> dict[str, Any]:
        d = self.d
        statement = await retire_identity(d.keys, d.store, reason=reason, now=time.time())
        encoded = statement.encode()
        pushed = self._push(encoded)
        d._publish_revocation(encoded)
        published = True
        try:
            await d.link.drain(timeout=RETIRE_DRAIN)
        except (BrokerError, TimeoutError) as exc:
            published = False
            log.error("the identity revocation may not have reached the broker: %s", exc)
        log.warning("this node's identity is revoked (%s); stopping for good", reason or "-")
        d._publish_event("identity.revoked", {"peer": d.peer_id, "reason": reason})
        asyncio.get_running_loop().call_later(RETIRE_STOP_AFTER, d.stop)
        return {
            "peer": d.peer_id,
            "statement": statement_to_text(encoded),
            "pushed": pushed,
            "published": published,
            "stopping": True,
        }

    # -- control methods ---------------------------------------------------------------------

    def _register(self) -> None:
        m = self.d.control.method

        @m("v1.membership.install")
        async def _install(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            only(params, "membership")
            return await self.install(require(params, "membership", str))

        @m("v1.revocation.publish")
        async def _publish(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            only(params, "statement")
            return await self.publish(statement_from_text(require(params, "statement", str)))

        @m("v1.identity.succeed")
        async def _succeed(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            only(params)
            return await self.succeed()

        @m("v1.revoke.identity")
        async def _retire(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            only(params, "reason", "confirm")
            if optional(params, "confirm", bool, False) is not True:
                raise UsageError(
                    "revoking the identity retires this node for good: pass confirm=true"
                )
            return await self.retire(optional(params, "reason", str, ""))


__all__ = [
    "MEMBERSHIP_TEXT",
    "REQUEST_TEXT",
    "STATEMENT_TEXT",
    "Authority",
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
