"""The node's private keys on disk: identity (Ed25519), Noise static keys (X25519), certificates.

Layout of the keys directory (mode 0700; private key files mode 0600):

    identity.key          the current identity key
    identity-next.key     only during an identity succession (see `succeed_identity`)
    static-<serial>.key   the static key of certificate <serial>: the current one, and the
                          previous ones until their overlap window has passed
    cert-<serial>         the key certificate <serial> (public)
    succession-<index>    the node's identity succession chain (public)
    membership            the authority's membership certificate, if any (public)
    revoked               this node's identity revocation statement, once it is retired: its
                          presence makes `load` refuse (the node never runs again)

A key file is a msgpack array `[1, kind, public key, seal, secret]`. Without a passphrase
`seal` is nil and `secret` the raw 32-byte private key. With one, `seal` is
`[salt, opslimit, memlimit, nonce]` and `secret` the private key in a secretbox
(XSalsa20-Poly1305) under a key derived with Argon2id (libsodium's crypto_pwhash). The public key
is in the clear so that `peerd id` needs no passphrase; after unsealing it is checked against the
private key, so a tampered file is refused. All keys come from the OS CSPRNG (libsodium).

Every file is written whole (temporary file, fsync, rename, fsync of the directory), and each
multi-file change is ordered so that a crash at any point leaves either the old or the new state,
which `load` completes or discards.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils

from peerd.errors import PeerdError
from protocol.identity import (
    REVOKE_IDENTITY,
    REVOKE_STATIC,
    Credentials,
    KeyCertificate,
    Membership,
    Revocation,
    Succession,
    TrustError,
    fingerprint,
    issue_certificate,
    issue_revocation,
    issue_succession,
    new_identity_seed,
    peer_id_for,
    verify_chain,
)
from protocol.identity._codec import ed25519_public
from protocol.noise import KeyPair

DAY: Final = 86400
KEY_FILE_VERSION: Final = 1
MAX_KEY_FILE: Final = 4096
ARGON = nacl.pwhash.argon2id
# Sealing cost: libsodium's "moderate" (about 0.4 s and 256 MiB here); a stolen state directory
# then costs an attacker that much per passphrase guess.
DEFAULT_SEAL_LIMITS: Final = (ARGON.OPSLIMIT_MODERATE, ARGON.MEMLIMIT_MODERATE)
# A key file may ask for at most this much work: a planted file must not exhaust the machine.
_MAX_LIMITS: Final = (ARGON.OPSLIMIT_SENSITIVE, ARGON.MEMLIMIT_SENSITIVE)

_IDENTITY = "identity.key"
_IDENTITY_NEXT = "identity-next.key"
_MEMBERSHIP = "membership"
_REVOKED = "revoked"
_STATIC_RE = re.compile(r"static-(\d{1,19})\.key")
_CERT_RE = re.compile(r"cert-(\d{1,19})")
_SUCCESSION_RE = re.compile(r"succession-(\d{1,3})")


class KeystoreError(PeerdError):
    """The key files are missing, unreadable, unprotected, damaged or locked."""

    hint = "check the keys directory ([keys] dir) and the passphrase"


class IdentityExists(KeystoreError):
    hint = "this node already has an identity; use another --state-dir for another node"


class NoIdentity(KeystoreError):
    hint = "create one with `peerd init`"


class WrongPassphrase(KeystoreError):
    hint = "check [keys] passphrase_file"


class IdentityRevoked(KeystoreError):
    hint = "this node was retired for good; make a new node (peerd init --state-dir DIR)"


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """What `peerd id` shows; readable without the passphrase."""

    peer_id: str
    identity_public: bytes
    fingerprint: str
    certificate: KeyCertificate | None
    successions: tuple[Succession, ...]
    sealed: bool


def read_passphrase(path: str | os.PathLike[str]) -> bytes:
    """The passphrase in `path` (one trailing newline removed); refuses world-readable files."""
    p = Path(path)
    try:
        st = p.stat()
        if st.st_mode & 0o007:
            raise KeystoreError(
                f"the passphrase file {p} is accessible to every user",
                hint=f"chmod o-rwx {p}",
            )
        data = p.read_bytes()
    except OSError as exc:
        raise KeystoreError(f"cannot read the passphrase file {p}: {exc.strerror}") from exc
    if data.endswith(b"\n"):
        data = data[:-1]
    if data.endswith(b"\r"):
        data = data[:-1]
    if not data:
        raise KeystoreError(f"the passphrase file {p} is empty")
    return data


# -- files ------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `path` whole or not at all: temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_small(path: Path, *, private: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise KeystoreError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeystoreError(f"{path} is not a regular file")
        if private and st.st_mode & 0o077:
            raise KeystoreError(
                f"the private key file {path} is accessible to other users",
                hint=f"chmod 600 {path}",
            )
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeystoreError(f"{path} is too large to be a peerd key file")
    return data


# -- key files --------------------------------------------------------------------------------


class _Sealer:
    """Derives the sealing key once per salt: all files of one keystore share a salt, so a
    keystore is unlocked with one Argon2id run."""

    def __init__(self, passphrase: bytes | None, limits: tuple[int, int]) -> None:
        self.passphrase = passphrase
        self.limits = limits
        self._salt = nacl.utils.random(ARGON.SALTBYTES)
        self._keys: dict[tuple[bytes, int, int], bytes] = {}

    def key(self, salt: bytes, ops: int, mem: int) -> bytes:
        assert self.passphrase is not None
        cache = (salt, ops, mem)
        if cache not in self._keys:
            self._keys[cache] = ARGON.kdf(
                nacl.secret.SecretBox.KEY_SIZE, self.passphrase, salt, opslimit=ops, memlimit=mem
            )
        return self._keys[cache]

    def seal(self, kind: str, public: bytes, secret: bytes) -> bytes:
        if self.passphrase is None:
            return msgpack.packb([KEY_FILE_VERSION, kind, public, None, secret])  # type: ignore[no-any-return]
        ops, mem = self.limits
        box = nacl.secret.SecretBox(self.key(self._salt, ops, mem))
        nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE)
        sealed = box.encrypt(secret, nonce).ciphertext
        return msgpack.packb(  # type: ignore[no-any-return]
            [KEY_FILE_VERSION, kind, public, [self._salt, ops, mem, nonce], sealed]
        )

    def adopt_salt(self, salt: bytes, ops: int, mem: int) -> None:
        """Seal new files like the existing ones, so the next load derives one key."""
        self._salt, self.limits = salt, (ops, mem)


def _parse_key_file(path: Path, data: bytes, kind: str) -> tuple[bytes, list[Any] | None, bytes]:
    try:
        f = msgpack.unpackb(data, raw=False)
    except ValueError as exc:
        raise KeystoreError(f"{path} is not a peerd key file") from exc
    if (
        not isinstance(f, list)
        or len(f) != 5
        or f[0] != KEY_FILE_VERSION
        or f[1] != kind
        or type(f[2]) is not bytes
        or len(f[2]) != 32
        or type(f[4]) is not bytes
    ):
        raise KeystoreError(f"{path} is not a peerd {kind} key file (or of another version)")
    seal = f[3]
    if seal is not None and not (
        isinstance(seal, list)
        and len(seal) == 4
        and type(seal[0]) is bytes
        and len(seal[0]) == ARGON.SALTBYTES
        and type(seal[1]) is int
        and type(seal[2]) is int
        and type(seal[3]) is bytes
        and len(seal[3]) == nacl.secret.SecretBox.NONCE_SIZE
    ):
        raise KeystoreError(f"{path}: damaged seal parameters")
    return f[2], seal, f[4]


def _public_of(kind: str, secret: bytes) -> bytes:
    if kind == "x25519":
        return KeyPair.from_private(secret).public
    return ed25519_public(secret)


def _load_key(path: Path, kind: str, sealer: _Sealer) -> tuple[bytes, bytes]:
    public, seal, blob = _parse_key_file(path, _read_small(path, private=True), kind)
    if seal is None:
        secret = blob
    else:
        salt, ops, mem, nonce = seal
        if not (ARGON.OPSLIMIT_MIN <= ops <= _MAX_LIMITS[0]) or not (
            ARGON.MEMLIMIT_MIN <= mem <= _MAX_LIMITS[1]
        ):
            raise KeystoreError(f"{path}: unreasonable sealing parameters")
        if sealer.passphrase is None:
            raise WrongPassphrase(
                f"{path} is sealed with a passphrase and none was given",
                hint="set [keys] passphrase_file",
            )
        try:
            secret = nacl.secret.SecretBox(sealer.key(salt, ops, mem)).decrypt(blob, nonce)
        except nacl.exceptions.CryptoError as exc:
            raise WrongPassphrase(
                f"cannot unseal {path}: wrong passphrase or damaged file"
            ) from exc
        sealer.adopt_salt(salt, ops, mem)
    if len(secret) != 32 or _public_of(kind, secret) != public:
        raise KeystoreError(f"{path}: the private and public keys do not match (damaged file)")
    return secret, public


def _read_public_key(path: Path, kind: str) -> tuple[bytes, bool]:
    public, seal, _ = _parse_key_file(path, _read_small(path, private=True), kind)
    return public, seal is not None


def _serials(directory: Path, pattern: re.Pattern[str]) -> list[int]:
    out = []
    for name in os.listdir(directory):
        m = pattern.fullmatch(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def _read_chain(directory: Path) -> tuple[Succession, ...]:
    indexes = _serials(directory, _SUCCESSION_RE)
    if indexes != list(range(1, len(indexes) + 1)):
        raise KeystoreError(f"{directory}: the identity succession files are not contiguous")
    try:
        return tuple(
            Succession.decode(_read_small(directory / f"succession-{i}", private=False))
            for i in indexes
        )
    except TrustError as exc:
        raise KeystoreError(f"{directory}: a succession file is damaged: {exc}") from exc


def _read_cert(directory: Path, serial: int) -> KeyCertificate:
    try:
        return KeyCertificate.decode(_read_small(directory / f"cert-{serial}", private=False))
    except TrustError as exc:
        raise KeystoreError(f"{directory}/cert-{serial} is damaged: {exc}") from exc


def write_key_file(
    path: Path,
    kind: str,
    public: bytes,
    secret: bytes,
    *,
    passphrase: bytes | None = None,
    seal_limits: tuple[int, int] = DEFAULT_SEAL_LIMITS,
) -> None:
    """One private key file in the keystore's format (sealed if `passphrase`), mode 0600.
    For keys that are not a node's, such as the network authority's."""
    try:
        write_file_atomic(path, _Sealer(passphrase, seal_limits).seal(kind, public, secret))
    except OSError as exc:
        raise KeystoreError(f"cannot write {path}: {exc.strerror}") from exc


def load_key_file(path: Path, kind: str, *, passphrase: bytes | None = None) -> tuple[bytes, bytes]:
    """(private, public) of a key file written by `write_key_file`, unsealed and checked."""
    try:
        return _load_key(path, kind, _Sealer(passphrase, DEFAULT_SEAL_LIMITS))
    except OSError as exc:
        raise KeystoreError(f"cannot read {path}: {exc.strerror}") from exc


def read_key_file_public(path: Path, kind: str) -> tuple[bytes, bool]:
    """(public key, sealed?) of a key file, without unsealing it."""
    return _read_public_key(path, kind)


def read_membership(directory: str | os.PathLike[str]) -> Membership | None:
    """The membership certificate kept in a keys directory, without unsealing anything."""
    path = Path(directory) / _MEMBERSHIP
    if not path.exists():
        return None
    try:
        return Membership.decode(_read_small(path, private=False))
    except TrustError as exc:
        raise KeystoreError(f"{path} is damaged: {exc}") from exc


def read_retirement(directory: str | os.PathLike[str]) -> bytes | None:
    """The identity revocation statement of a retired node (None: not retired)."""
    path = Path(directory) / _REVOKED
    if not path.exists():
        return None
    return _read_small(path, private=False)


# -- the keystore -----------------------------------------------------------------------------


class Keystore:
    """The node's keys, loaded and unsealed. Not thread-safe; one process owns a keys dir."""

    def __init__(
        self,
        directory: Path,
        *,
        sealer: _Sealer,
        identity_seed: bytes,
        successions: tuple[Succession, ...],
        statics: dict[int, tuple[KeyPair, KeyCertificate]],
        membership: Membership | None,
    ) -> None:
        self.dir = directory
        self._sealer = sealer
        self._identity_seed = identity_seed
        self.identity_public = ed25519_public(identity_seed)
        self.successions = successions
        first = successions[0].old_identity if successions else self.identity_public
        self.first_identity = first
        self.peer_id = peer_id_for(first)
        self._statics = statics
        self.membership = membership

    def __repr__(self) -> str:
        return f"Keystore(peer_id={self.peer_id!r}, serial={self.certificate.serial})"

    # -- properties --

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity_public)

    @property
    def serial(self) -> int:
        return max(self._statics)

    @property
    def certificate(self) -> KeyCertificate:
        return self._statics[self.serial][1]

    @property
    def static(self) -> KeyPair:
        """The current Noise static key pair."""
        return self._statics[self.serial][0]

    def signing_key(self) -> nacl.signing.SigningKey:
        """The identity key, for signing what this node vouches for (transfer manifests)."""
        return nacl.signing.SigningKey(self._identity_seed)

    @property
    def sealed(self) -> bool:
        return self._sealer.passphrase is not None

    def static_for(self, serial: int) -> KeyPair | None:
        """The static key of certificate `serial`, while it is kept (current or in overlap)."""
        entry = self._statics.get(serial)
        return None if entry is None else entry[0]

    def certificates(self) -> list[KeyCertificate]:
        return [self._statics[s][1] for s in sorted(self._statics)]

    def credentials(self) -> bytes:
        """The encoded `Credentials` this node presents in its handshakes."""
        membership = self.membership
        if membership is not None and membership.identity_public != self.identity_public:
            membership = None  # issued for a key we have since succeeded: useless
        return Credentials(self.successions, self.certificate, membership).encode()

    # -- creating and loading --

    @staticmethod
    def exists(directory: str | os.PathLike[str]) -> bool:
        d = Path(directory)
        return (d / _IDENTITY).exists() or (d / _IDENTITY_NEXT).exists()

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        now: float,
        certificate_days: int,
        passphrase: bytes | None = None,
        seal_limits: tuple[int, int] = DEFAULT_SEAL_LIMITS,
    ) -> Keystore:
        """A new identity key, static key and first certificate. Refuses to overwrite."""
        d = Path(directory)
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if cls.exists(d):
                raise IdentityExists(f"an identity already exists in {d}")
            sealer = _Sealer(passphrase, seal_limits)
            seed = new_identity_seed()
            static = KeyPair.generate()
            public = ed25519_public(seed)
            cert = issue_certificate(
                seed,
                peer_id=peer_id_for(public),
                static_public=static.public,
                serial=1,
                now=now,
                lifetime=certificate_days * DAY,
            )
            write_file_atomic(
                d / "static-1.key", sealer.seal("x25519", static.public, static.private)
            )
            write_file_atomic(d / "cert-1", cert.encode(), mode=0o644)
            # The identity file goes last: its presence means "this node is initialised".
            write_file_atomic(d / _IDENTITY, sealer.seal("ed25519", public, seed))
        except OSError as exc:
            raise KeystoreError(f"cannot write keys in {d}: {exc.strerror}") from exc
        return cls(
            d,
            sealer=sealer,
            identity_seed=seed,
            successions=(),
            statics={1: (static, cert)},
            membership=None,
        )

    @staticmethod
    def read_public(directory: str | os.PathLike[str]) -> PublicIdentity:
        """The node's public identity, without unsealing anything."""
        d = Path(directory)
        if not (d / _IDENTITY).exists():
            raise NoIdentity(f"no identity in {d}")
        public, sealed = _read_public_key(d / _IDENTITY, "ed25519")
        chain = _read_chain(d)
        certs = _serials(d, _CERT_RE)
        cert = _read_cert(d, certs[-1]) if certs else None
        if chain and chain[-1].new_identity != public:
            # An interrupted succession: the next load completes it; show the chain's end.
            public = chain[-1].new_identity
        first = chain[0].old_identity if chain else public
        return PublicIdentity(peer_id_for(first), public, fingerprint(public), cert, chain, sealed)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        now: float,
        passphrase: bytes | None = None,
        certificate_days: int = 30,
    ) -> Keystore:
        """Load and unseal the keys; complete or discard a change a crash interrupted.

        `now` and `certificate_days` are used only to re-issue the certificate when a crash
        interrupted an identity succession after its record was written.
        """
        d = Path(directory)
        if not (d / _IDENTITY).exists():
            raise NoIdentity(f"no identity in {d}")
        try:
            mode = d.stat().st_mode
            if mode & 0o077:
                raise KeystoreError(
                    f"the keys directory {d} is accessible to other users",
                    hint=f"chmod 700 {d}",
                )
            return cls._load(d, now, passphrase, certificate_days)
        except OSError as exc:
            raise KeystoreError(f"cannot read keys in {d}: {exc.strerror}") from exc

    @classmethod
    def _load(
        cls, d: Path, now: float, passphrase: bytes | None, certificate_days: int
    ) -> Keystore:
        if (d / _REVOKED).exists():
            raise IdentityRevoked(f"the identity in {d} is revoked: this node cannot run again")
        sealer = _Sealer(passphrase, DEFAULT_SEAL_LIMITS)
        seed, _ = _load_key(d / _IDENTITY, "ed25519", sealer)
        chain = _read_chain(d)
        first = chain[0].old_identity if chain else ed25519_public(seed)
        try:
            keys = verify_chain(peer_id_for(first), chain, first)
        except TrustError as exc:
            raise KeystoreError(f"{d}: the identity succession chain is invalid: {exc}") from exc
        next_path = d / _IDENTITY_NEXT
        if next_path.exists():
            next_seed, next_public = _load_key(next_path, "ed25519", sealer)
            if keys[-1] == next_public:
                seed = next_seed  # the succession record is written: finish below
            else:
                next_path.unlink()  # interrupted before the record: the old identity stays
                _fsync_dir(d)
        if ed25519_public(seed) != keys[-1]:
            raise KeystoreError(f"{d}: the identity key is not the end of the succession chain")
        statics: dict[int, tuple[KeyPair, KeyCertificate]] = {}
        cert_serials = set(_serials(d, _CERT_RE))
        for serial in _serials(d, _STATIC_RE):
            if serial not in cert_serials:
                (d / f"static-{serial}.key").unlink()  # a rotation interrupted before its cert
                continue
            private, _ = _load_key(d / f"static-{serial}.key", "x25519", sealer)
            statics[serial] = (KeyPair.from_private(private), _read_cert(d, serial))
        for serial in cert_serials - set(statics):
            (d / f"cert-{serial}").unlink()  # its key was pruned; the certificate is useless
        if not statics:
            raise KeystoreError(f"{d}: no static key with a certificate")
        membership = None
        if (d / _MEMBERSHIP).exists():
            try:
                membership = Membership.decode(_read_small(d / _MEMBERSHIP, private=False))
            except TrustError as exc:
                raise KeystoreError(f"{d}/membership is damaged: {exc}") from exc
        store = cls(
            d,
            sealer=sealer,
            identity_seed=seed,
            successions=chain,
            statics=statics,
            membership=membership,
        )
        for serial, (pair, cert) in statics.items():
            if cert.static_public != pair.public or cert.peer_id != store.peer_id:
                raise KeystoreError(f"{d}: certificate {serial} does not match its key")
        if store.certificate.identity_public != store.identity_public:
            store._issue(now, certificate_days)  # the succession's new certificate was lost
        if next_path.exists():
            os.replace(next_path, d / _IDENTITY)
            _fsync_dir(d)
        return store

    # -- changes --

    def _issue(self, now: float, certificate_days: int) -> KeyCertificate:
        serial = self.serial + 1
        static = KeyPair.generate()
        cert = issue_certificate(
            self._identity_seed,
            peer_id=self.peer_id,
            static_public=static.public,
            serial=serial,
            now=now,
            lifetime=certificate_days * DAY,
        )
        try:
            write_file_atomic(
                self.dir / f"static-{serial}.key",
                self._sealer.seal("x25519", static.public, static.private),
            )
            write_file_atomic(self.dir / f"cert-{serial}", cert.encode(), mode=0o644)
        except OSError as exc:
            raise KeystoreError(f"cannot write keys in {self.dir}: {exc.strerror}") from exc
        self._statics[serial] = (static, cert)
        return cert

    def rotate(self, now: float, *, certificate_days: int = 30) -> KeyCertificate:
        """A new static key and certificate with the next serial; the old key stays for the
        overlap window (`prune` removes it)."""
        return self._issue(now, certificate_days)

    def needs_rotation(self, now: float, *, rotate_before_days: float) -> bool:
        return self.certificate.not_after - now <= rotate_before_days * DAY

    def prune(self, now: float, *, overlap: float) -> list[int]:
        """Erase static keys superseded more than `overlap` seconds ago; their serials."""
        removed = []
        serials = sorted(self._statics)
        for older, newer in itertools.pairwise(serials):
            superseded_at = self._statics[newer][1].not_before
            if now >= superseded_at + overlap:
                for name in (f"static-{older}.key", f"cert-{older}"):
                    with contextlib.suppress(FileNotFoundError):
                        (self.dir / name).unlink()
                del self._statics[older]
                removed.append(older)
        if removed:
            _fsync_dir(self.dir)
        return removed

    def succeed_identity(self, now: float, *, certificate_days: int) -> Succession:
        """Hand the peer id over to a new identity key (and a new static key and certificate).

        Order, for crash safety: the new key as identity-next.key; the succession record (from
        here on, load completes the change); the new certificate; identity-next.key replaces
        identity.key, erasing the old identity key.
        """
        new_seed = new_identity_seed()
        link = issue_succession(
            self._identity_seed,
            new_seed,
            peer_id=self.peer_id,
            index=len(self.successions) + 1,
            now=now,
        )
        new_public = ed25519_public(new_seed)
        try:
            write_file_atomic(
                self.dir / _IDENTITY_NEXT, self._sealer.seal("ed25519", new_public, new_seed)
            )
            write_file_atomic(self.dir / f"succession-{link.index}", link.encode(), mode=0o644)
            self._identity_seed, self.identity_public = new_seed, new_public
            self.successions = (*self.successions, link)
            self._issue(now, certificate_days)
            os.replace(self.dir / _IDENTITY_NEXT, self.dir / _IDENTITY)
            _fsync_dir(self.dir)
        except OSError as exc:
            raise KeystoreError(f"cannot write keys in {self.dir}: {exc.strerror}") from exc
        return link

    def revoke_static(self, now: float, *, through: int, reason: str = "") -> Revocation:
        """A statement revoking every certificate of this node up to serial `through`; the
        private keys it revokes are erased at once (no overlap for a revoked key).

        Rotate first: revoking the current serial would leave the node without a usable key.
        """
        if through >= self.serial:
            raise KeystoreError(
                f"revoking certificate {through} would revoke the current key ({self.serial})",
                hint="rotate first (`peerd rotate`), then revoke the old serials",
            )
        statement = issue_revocation(
            self._identity_seed,
            peer_id=self.peer_id,
            kind=REVOKE_STATIC,
            serial=through,
            now=now,
            reason=reason,
        )
        revoked = [serial for serial in self._statics if serial <= through]
        for serial in revoked:
            for name in (f"static-{serial}.key", f"cert-{serial}"):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / name).unlink()
            del self._statics[serial]
        if revoked:
            _fsync_dir(self.dir)
        return statement

    def revoke_identity(self, now: float, *, reason: str = "") -> Revocation:
        """A statement revoking this node's peer id for good."""
        return issue_revocation(
            self._identity_seed, peer_id=self.peer_id, kind=REVOKE_IDENTITY, now=now, reason=reason
        )

    def retire(self, statement: Revocation) -> None:
        """Mark this node as retired by its identity revocation `statement`: from now on
        `load` refuses these keys. Written before the statement leaves the node, so a node whose
        revocation may be out is never started again by accident."""
        if statement.kind != REVOKE_IDENTITY or statement.peer_id != self.peer_id:
            raise KeystoreError("not an identity revocation of this node")
        try:
            write_file_atomic(self.dir / _REVOKED, statement.encode(), mode=0o644)
        except OSError as exc:
            raise KeystoreError(f"cannot write {self.dir / _REVOKED}: {exc.strerror}") from exc

    def set_membership(self, data: bytes, *, authority_key: bytes | None = None) -> Membership:
        """Keep the authority's membership certificate for this node (checked first)."""
        membership = Membership.decode(data)
        if membership.peer_id != self.peer_id or membership.identity_public != self.identity_public:
            raise KeystoreError("this membership certificate is for another node or key")
        if authority_key is not None and membership.authority_public != authority_key:
            raise KeystoreError("this membership certificate is from another authority")
        membership.verify_signature()
        try:
            write_file_atomic(self.dir / _MEMBERSHIP, membership.encode(), mode=0o644)
        except OSError as exc:
            raise KeystoreError(f"cannot write {self.dir / _MEMBERSHIP}: {exc.strerror}") from exc
        self.membership = membership
        return membership


__all__ = [
    "DEFAULT_SEAL_LIMITS",
    "IdentityExists",
    "IdentityRevoked",
    "Keystore",
    "KeystoreError",
    "NoIdentity",
    "PublicIdentity",
    "WrongPassphrase",
    "load_key_file",
    "read_key_file_public",
    "read_membership",
    "read_passphrase",
    "read_retirement",
    "write_file_atomic",
    "write_key_file",
]
