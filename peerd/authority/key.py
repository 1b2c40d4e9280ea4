"""The network authority's key directory: `peerd authority init|key|issue|revoke|list`.

The **authority** is an Ed25519 key in a directory of its own (`peerd authority init`), kept
offline; it needs no daemon and no node. It signs membership certificates (section 6.4 of the
spec) for the members of one network, and authority revocations that expel a member. Every
member configures its public key (`[network] authority_key`) and then trusts every valid member
without pairing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

from peerd.authority.texts import MembershipRequest, describe_membership, describe_statement
from peerd.errors import PeerdError, UsageError
from peerd.keystore import (
    DEFAULT_SEAL_LIMITS,
    load_key_file,
    read_key_file_public,
    write_key_file,
)
from protocol.identity import (
    MAX_MEMBERSHIP_LIFETIME,
    AuthorityRevocation,
    Membership,
    format_authority_key,
    issue_authority_revocation,
    issue_membership,
    new_identity_seed,
)
from protocol.identity._codec import ed25519_public

DAY: Final = 86400


class AuthorityError(PeerdError):
    """The authority key is missing, unreadable or refused the operation."""

    hint = "check the authority directory (--dir) and its passphrase (--passphrase-file)"


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
