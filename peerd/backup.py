"""Backups of a node: its identity (the keys directory) and its trust store, in one file sealed
with a passphrase, and the restore of such a file.

What a backup holds is what cannot be made again: the private keys (as the keystore wrote them,
so a passphrase-sealed keystore stays sealed with its own passphrase) and the trust store (peers,
certificates, revocations, the audit log, queued messages, transfer state). Received files (the
inbox) and the configuration are not in it: they are large or written by the administrator.

File format (all integers big-endian):

    magic   b"peerd-backup\\n"                      13 bytes
    hlen    length of the header                   2 bytes
    header  msgpack [format, "argon2id", opslimit, memlimit, salt,
                     "xchacha20poly1305-ietf", nonce]
    body    XChaCha20-Poly1305 of the msgpack payload, with magic + hlen + header as the
            associated data (so no header field can be changed without the tag failing)

The key is Argon2id(passphrase, salt) via libsodium's crypto_pwhash, at libsodium's "moderate"
cost by default (as the keystore seals keys): a stolen backup costs an attacker that much per
guess. A file asking for more than the "sensitive" cost is refused before any work, so a planted
file cannot exhaust the machine.

The store is copied with sqlite's online backup API from a read transaction, so a backup of a
running daemon's store is one consistent state. The keys directory is read before and after that
copy and the backup retried if a rotation changed it meanwhile.

A restore never runs beside a live daemon: it refuses while the control socket answers, and it
holds the lock the daemon takes on start (`<socket>.lock`) for its whole duration. It validates
everything before touching the node (opens a scratch copy of the store, which migrates it and
checks its audit chain, and checks that store and keys are the same node), then moves the current
keys and store aside (`*.before-restore-<time>`), never deleting them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
import sqlite3
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import nacl.utils

from peerd import __version__
from peerd.config import Config
from peerd.errors import PeerdError
from peerd.keystore import MAX_KEY_FILE, Keystore, write_file_atomic
from peerd.store import Store, StoreError

MAGIC: Final = b"peerd-backup\n"
FORMAT: Final = 1
KDF: Final = "argon2id"
AEAD: Final = "xchacha20poly1305-ietf"
ARGON = nacl.pwhash.argon2id
DEFAULT_LIMITS: Final = (ARGON.OPSLIMIT_MODERATE, ARGON.MEMLIMIT_MODERATE)
_MIN_LIMITS: Final = (ARGON.OPSLIMIT_MIN, ARGON.MEMLIMIT_MIN)
_MAX_LIMITS: Final = (ARGON.OPSLIMIT_SENSITIVE, ARGON.MEMLIMIT_SENSITIVE)
# A store is kilobytes to a few megabytes (outbox and history are bounded); this bounds the
# memory a restore may spend on a file before the tag is checked.
MAX_BACKUP: Final = 1 << 30
MAX_KEY_FILES: Final = 256
_MAX_HEADER: Final = 1024
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}(\.key)?")
_SNAPSHOT_TRIES: Final = 5
_LIVE_PROBE_TIMEOUT: Final = 2.0


class BackupError(PeerdError):
    """A backup could not be made, read or restored."""

    hint = "see the message; nothing of the node was changed"


class WrongBackupPassphrase(BackupError):
    hint = "check the passphrase; a damaged or altered file fails the same way"


class DaemonRunning(BackupError):
    hint = "stop the daemon first (`systemctl stop peerd`), then restore"


class NodeExists(BackupError):
    hint = "--force moves the current keys and store aside (kept, never deleted) and restores"


@dataclass(frozen=True, slots=True)
class KeyFile:
    name: str
    mode: int
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Backup:
    """The contents of a backup file, decrypted."""

    peer_id: str
    network: str
    created_at: float
    peerd_version: str
    schema_version: int
    keys: tuple[KeyFile, ...]
    store: bytes = field(repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "network": self.network,
            "created_at": self.created_at,
            "peerd_version": self.peerd_version,
            "schema_version": self.schema_version,
            "key_files": len(self.keys),
            "store_bytes": len(self.store),
        }


@dataclass(frozen=True, slots=True)
class Restored:
    backup: Backup
    moved_aside: tuple[Path, ...]


# -- making a backup --------------------------------------------------------------------------


def snapshot(config: Config, *, now: float | None = None) -> Backup:
    """A consistent copy of the node's keys and trust store (works beside a running daemon)."""
    keys_dir, store = config.keys.dir, config.node.store
    if not (keys_dir / "identity.key").exists():
        raise BackupError(f"no identity in {keys_dir}", hint="is this the right --config?")
    if not store.exists():
        raise BackupError(f"no trust store at {store}", hint="is this the right --config?")
    for _ in range(_SNAPSHOT_TRIES):
        before = _read_keys(keys_dir)
        data = _copy_store(store)
        if _read_keys(keys_dir) == before:
            break
    else:
        raise BackupError(
            f"the keys in {keys_dir} kept changing during the backup",
            hint="try again; a key rotation may have been running",
        )
    peer_id, schema = _store_identity(data, store)
    public = Keystore.read_public(keys_dir)
    if public.peer_id != peer_id:
        raise BackupError(
            f"the keys in {keys_dir} (node {public.peer_id}) and the store {store} (node "
            f"{peer_id}) are of different nodes",
            hint="check [keys] dir and [node] store in the configuration",
        )
    return Backup(
        peer_id=peer_id,
        network=config.node.network,
        created_at=time.time() if now is None else now,
        peerd_version=__version__,
        schema_version=schema,
        keys=before,
        store=data,
    )


def seal(backup: Backup, passphrase: bytes, *, limits: tuple[int, int] = DEFAULT_LIMITS) -> bytes:
    """The backup as the bytes of a backup file."""
    if not passphrase:
        raise BackupError("the backup passphrase is empty")
    ops, mem = limits
    salt = nacl.utils.random(ARGON.SALTBYTES)
    nonce = nacl.utils.random(nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)
    header: bytes = msgpack.packb([FORMAT, KDF, ops, mem, salt, AEAD, nonce], use_bin_type=True)
    ad = MAGIC + struct.pack(">H", len(header)) + header
    payload: bytes = msgpack.packb(
        {
            "peer_id": backup.peer_id,
            "network": backup.network,
            "created_at": backup.created_at,
            "peerd_version": backup.peerd_version,
            "schema_version": backup.schema_version,
            "keys": [[k.name, k.mode, k.data] for k in backup.keys],
            "store": backup.store,
        },
        use_bin_type=True,
    )
    key = ARGON.kdf(
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES,
        passphrase,
        salt,
        opslimit=ops,
        memlimit=mem,
    )
    body = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(payload, ad, nonce, key)
    return ad + body


def write_backup(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write a backup file (mode 0600) whole; never replaces an existing file."""
    p = Path(path).expanduser().absolute()
    if p.exists() or p.is_symlink():
        raise BackupError(f"{p} exists", hint="choose a new file name; a backup never overwrites")
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_file_atomic(tmp, data, mode=0o600)
        # link() refuses an existing name: a file that appeared meanwhile is not replaced.
        os.link(tmp, p)
    except FileExistsError:
        raise BackupError(f"{p} exists", hint="choose a new file name") from None
    except OSError as exc:
        raise BackupError(f"cannot write {p}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return p


# -- reading a backup -------------------------------------------------------------------------


def read_backup_file(path: str | os.PathLike[str]) -> bytes:
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            data = f.read(MAX_BACKUP + 1)
    except OSError as exc:
        raise BackupError(f"cannot read {p}: {exc.strerror}") from exc
    if len(data) > MAX_BACKUP:
        raise BackupError(f"{p} is larger than any peerd backup ({MAX_BACKUP} bytes)")
    return data


def unseal(data: bytes, passphrase: bytes) -> Backup:
    """Decrypt and check a backup file's bytes. Refuses anything malformed before any
    expensive work, and anything altered (or a wrong passphrase) at the tag."""
    if not data.startswith(MAGIC):
        raise BackupError("not a peerd backup file")
    offset = len(MAGIC) + 2
    if len(data) < offset:
        raise BackupError("the backup file is truncated")
    (hlen,) = struct.unpack(">H", data[len(MAGIC) : offset])
    if hlen > _MAX_HEADER or len(data) < offset + hlen:
        raise BackupError("the backup file's header is damaged")
    ad, body = data[: offset + hlen], data[offset + hlen :]
    try:
        header = msgpack.unpackb(data[offset : offset + hlen], raw=False)
        fmt, kdf, ops, mem, salt, aead, nonce = header
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BackupError("the backup file's header is damaged") from exc
    if fmt != FORMAT:
        raise BackupError(
            f"backup format {fmt!r} is not known to this peerd (it reads {FORMAT})",
            hint="restore with the peerd version that made it, or a newer one",
        )
    if (kdf, aead) != (KDF, AEAD):
        raise BackupError(f"the backup uses {kdf}/{aead}, not {KDF}/{AEAD}")
    if not (
        isinstance(ops, int)
        and isinstance(mem, int)
        and _MIN_LIMITS[0] <= ops <= _MAX_LIMITS[0]
        and _MIN_LIMITS[1] <= mem <= _MAX_LIMITS[1]
    ):
        raise BackupError("the backup asks for an Argon2id cost outside libsodium's range")
    if not (
        isinstance(salt, bytes)
        and len(salt) == ARGON.SALTBYTES
        and isinstance(nonce, bytes)
        and len(nonce) == nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
    ):
        raise BackupError("the backup file's header is damaged")
    if len(body) < nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES:
        raise BackupError("the backup file is truncated")
    key = ARGON.kdf(
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES,
        passphrase,
        salt,
        opslimit=ops,
        memlimit=mem,
    )
    try:
        payload = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(body, ad, nonce, key)
    except nacl.exceptions.CryptoError:
        raise WrongBackupPassphrase(
            "the backup cannot be opened: wrong passphrase, or the file was damaged or altered"
        ) from None
    return _parse_payload(payload)


def _parse_payload(payload: bytes) -> Backup:
    # Authenticated, so written by someone with the passphrase; still checked like input.
    try:
        d = msgpack.unpackb(payload, raw=False)
        keys = tuple(KeyFile(str(n), int(m), bytes(b)) for n, m, b in d["keys"])
        backup = Backup(
            peer_id=str(d["peer_id"]),
            network=str(d["network"]),
            created_at=float(d["created_at"]),
            peerd_version=str(d["peerd_version"]),
            schema_version=int(d["schema_version"]),
            keys=keys,
            store=bytes(d["store"]),
        )
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise BackupError("the backup's contents are malformed") from exc
    names = [k.name for k in backup.keys]
    if len(names) > MAX_KEY_FILES or len(set(names)) != len(names):
        raise BackupError("the backup's key list is malformed")
    for k in backup.keys:
        if not _KEY_NAME.fullmatch(k.name) or len(k.data) > MAX_KEY_FILE:
            raise BackupError(f"the backup holds an unexpected key file {k.name!r}")
    if "identity.key" not in names:
        raise BackupError("the backup holds no identity key")
    return backup


# -- restoring --------------------------------------------------------------------------------


def restore(config: Config, backup: Backup, *, force: bool = False) -> Restored:
    """Put `backup` in place of the node named by `config` (its keys dir and store).

    Refuses while a daemon runs, when the backup is of another network, and (without `force`)
    when the node already has keys or a store. Everything is checked before anything moves.
    Runs its own event loop (for the store check): call it outside one, as the CLI does."""
    keys_dir, store = config.keys.dir, config.node.store
    if backup.network != config.node.network:
        raise BackupError(
            f"the backup is of a node in network {backup.network!r}; this configuration is "
            f"for {config.node.network!r}",
            hint="restore with a configuration for that network ([node] network)",
        )
    with _daemon_excluded(config.node.socket):
        existing = [p for p in (keys_dir, store) if p.exists()]
        if existing and not force:
            who = ""
            with contextlib.suppress(PeerdError):
                current = Keystore.read_public(keys_dir).peer_id
                who = " (the same node)" if current == backup.peer_id else f" (node {current})"
            raise NodeExists(f"this node already has {' and '.join(str(p) for p in existing)}{who}")
        owner = _owner(store.parent)
        store.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staged_keys = Path(tempfile.mkdtemp(prefix=".keys.restore-", dir=keys_dir.parent))
        staged_store = store.with_name(f".{store.name}.restore-{secrets.token_hex(4)}")
        moved: list[Path] = []
        try:
            for k in backup.keys:
                # Private keys private whatever the file says (the keystore refuses others).
                mode = 0o600 if k.name.endswith(".key") else k.mode & 0o644
                write_file_atomic(staged_keys / k.name, k.data, mode=mode)
            write_file_atomic(staged_store, backup.store, mode=0o600)
            asyncio.run(_check_restorable(config, backup, staged_keys, staged_store))
            if owner is not None:
                _chown(owner, staged_keys, staged_store)
            moved = _move_aside(keys_dir, store)
            staged_keys.rename(keys_dir)
            staged_store.rename(store)
            _fsync_dir(keys_dir.parent)
            _fsync_dir(store.parent)
        finally:
            shutil.rmtree(staged_keys, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                staged_store.unlink()
    return Restored(backup, tuple(moved))


async def _check_restorable(
    config: Config, backup: Backup, keys_dir: Path, store_file: Path
) -> None:
    """Open a scratch copy of the store as the daemon will (migrations, integrity, the audit
    chain) and check that keys and store are the backup's node."""
    public = Keystore.read_public(keys_dir)
    if public.peer_id != backup.peer_id:
        raise BackupError("the backup's keys are not of the node its store belongs to")
    scratch = Path(tempfile.mkdtemp(prefix=".restore-check-", dir=store_file.parent))
    try:
        copy = scratch / "peerd.db"
        shutil.copyfile(store_file, copy)
        try:
            db = await Store.open(
                copy,
                network=config.node.network,
                overlap=config.keys.overlap_seconds,
                authority_key=config.network.authority_public,
            )
        except StoreError as exc:
            raise BackupError(f"the backup's trust store cannot be opened: {exc}") from exc
        try:
            own = db.identity
            if own is None or own.peer_id != backup.peer_id:
                raise BackupError("the backup's store holds no identity of its node")
            try:
                await db.verify_log()
            except StoreError as exc:
                raise BackupError(f"the backup's audit log does not verify: {exc}") from exc
        finally:
            await db.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _daemon_excluded(sock_path: Path) -> Iterator[None]:
    """Refuse if a daemon answers on the control socket; hold the daemon's start lock so that
    none starts until the restore is done."""
    if _answers(sock_path):
        raise DaemonRunning(f"a peerd daemon is running (its control socket {sock_path} answers)")
    lock_path = Path(f"{sock_path}.lock")
    if not lock_path.parent.is_dir():
        # No runtime directory: no daemon runs (it cannot start without one), and none can
        # take the lock either until the directory exists.
        yield
        return
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BackupError(f"cannot open {lock_path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise DaemonRunning(f"a peerd daemon holds {lock_path}") from exc
        yield
    finally:
        os.close(fd)


def _answers(sock_path: Path) -> bool:
    if not sock_path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(_LIVE_PROBE_TIMEOUT)
        try:
            s.connect(str(sock_path))
        except OSError:
            return False  # a stale socket file from a daemon that is gone
    return True


def _move_aside(keys_dir: Path, store: Path) -> list[Path]:
    suffix = time.strftime(".before-restore-%Y%m%dT%H%M%SZ", time.gmtime())
    moved: list[Path] = []
    if keys_dir.exists():
        target = keys_dir.with_name(keys_dir.name + suffix)
        keys_dir.rename(target)
        moved.append(target)
    if store.exists():
        target = store.with_name(store.name + suffix)
        store.rename(target)
        moved.append(target)
    # sqlite's journal files follow their database (same name + "-wal"/"-shm"), so an
    # unfinished log stays readable with the store moved aside.
    for extra in ("-wal", "-shm"):
        journal = store.with_name(store.name + extra)
        if journal.exists():
            journal.rename(store.with_name(store.name + suffix + extra))
    return moved


def _owner(directory: Path) -> tuple[int, int] | None:
    """Whom restored files must belong to: the owner of the state directory, when root
    restores for the daemon's user (files of root's would be unreadable to the daemon)."""
    if os.geteuid() != 0:
        return None
    try:
        st = directory.stat()
    except FileNotFoundError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def _chown(owner: tuple[int, int], keys_dir: Path, store: Path) -> None:
    uid, gid = owner
    for path in (keys_dir, *keys_dir.iterdir(), store):
        os.chown(path, uid, gid, follow_symlinks=False)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading the node's files -----------------------------------------------------------------


def _read_keys(directory: Path) -> tuple[KeyFile, ...]:
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise BackupError(f"cannot read {directory}: {exc.strerror}") from exc
    files: list[KeyFile] = []
    for name in names:
        if name.startswith("."):
            continue  # a keystore write in progress (its temporary file)
        if not _KEY_NAME.fullmatch(name):
            raise BackupError(f"unexpected file {name!r} in the keys directory {directory}")
        try:
            fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # removed meanwhile (a pruned key): the second read sees the change
        except OSError as exc:
            raise BackupError(f"cannot read {directory / name}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BackupError(f"{directory / name} is not a regular file")
            data = os.read(fd, MAX_KEY_FILE + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_KEY_FILE:
            raise BackupError(f"{directory / name} is too large to be a peerd key file")
        files.append(KeyFile(name, stat.S_IMODE(st.st_mode), data))
    if len(files) > MAX_KEY_FILES:
        raise BackupError(f"{directory} holds more files than a peerd keystore")
    return tuple(files)


def _copy_store(path: Path) -> bytes:
    """The store's bytes as of one read transaction (sqlite's online backup)."""
    try:
        # mode=rw: never create a missing file; the copy reads only.
        src = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5.0)
        try:
            dst = sqlite3.connect(":memory:")
            try:
                src.backup(dst)
                problems = [r[0] for r in dst.execute("PRAGMA integrity_check")]
                if problems != ["ok"]:
                    raise BackupError(
                        f"the store {path} is damaged: {'; '.join(problems[:3])}",
                        hint="back up an earlier copy; peerd does not back up a damaged store",
                    )
                data: bytes = dst.serialize()
                return data
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the store {path}: {exc}") from exc


def _store_identity(data: bytes, path: Path) -> tuple[str, int]:
    db = sqlite3.connect(":memory:")
    try:
        # Bytes 18 and 19 of the header say "WAL" (2) in a copy of a WAL store, which an
        # in-memory database cannot open; 1 (rollback journal) reads the same pages.
        db.deserialize(data[:18] + b"\x01\x01" + data[20:])
        row = db.execute("SELECT peer_id FROM identity WHERE id = 1").fetchone()
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"{path} is not a peerd trust store: {exc}") from exc
    finally:
        db.close()
    if row is None or version is None:
        raise BackupError(f"the store {path} holds no identity", hint="run `peerd init` first")
    return str(row[0]), int(version[0])


# -- the whole operations, for the CLI and for AI code ----------------------------------------


def backup_to(
    config: Config,
    path: str | os.PathLike[str],
    passphrase: bytes,
    *,
    limits: tuple[int, int] = DEFAULT_LIMITS,
) -> tuple[Path, Backup]:
    """Snapshot the node and write it to `path` sealed with `passphrase`."""
    backup = snapshot(config)
    return write_backup(path, seal(backup, passphrase, limits=limits)), backup


def restore_from(
    config: Config, path: str | os.PathLike[str], passphrase: bytes, *, force: bool = False
) -> Restored:
    """Read, open and restore the backup file at `path`."""
    if _answers(config.node.socket):  # said before the passphrase's Argon2id run, not after
        raise DaemonRunning(
            f"a peerd daemon is running (its control socket {config.node.socket} answers)"
        )
    backup = unseal(read_backup_file(path), passphrase)
    return restore(config, backup, force=force)


__all__ = [
    "DEFAULT_LIMITS",
    "Backup",
    "BackupError",
    "DaemonRunning",
    "KeyFile",
    "NodeExists",
    "Restored",
    "WrongBackupPassphrase",
    "backup_to",
    "read_backup_file",
    "restore",
    "restore_from",
    "seal",
    "snapshot",
    "unseal",
    "write_backup",
]
