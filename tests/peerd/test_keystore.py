"""Private key files: modes, sealing, rotation and pruning, identity succession, crash recovery."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgpack
import nacl.pwhash
import pytest

from peerd.keystore import (
    IdentityExists,
    Keystore,
    KeystoreError,
    NoIdentity,
    WrongPassphrase,
    read_passphrase,
)
from protocol.identity import (
    Credentials,
    TrustView,
    fingerprint,
    issue_membership,
    new_identity_seed,
    peer_id_for,
    verify_chain,
)
from protocol.identity._codec import ed25519_public

NOW = 1_750_000_000.0
DAY = 86400
FAST = (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)


def _create(path: Path, passphrase: bytes | None = None) -> Keystore:
    return Keystore.create(
        path, now=NOW, certificate_days=30, passphrase=passphrase, seal_limits=FAST
    )


def test_create_and_load(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    assert ks.peer_id == peer_id_for(ks.identity_public)
    assert ks.fingerprint == fingerprint(ks.identity_public)
    assert ks.serial == 1
    assert ks.certificate.static_public == ks.static.public
    assert ks.certificate.not_after == int(NOW) + 30 * DAY
    loaded = Keystore.load(tmp_path / "keys", now=NOW)
    assert loaded.peer_id == ks.peer_id
    assert loaded.static == ks.static
    assert loaded.certificate == ks.certificate
    assert loaded.credentials() == ks.credentials()
    # The credentials authenticate over a handshake with that static key.
    view = TrustView(self_peer_id=None, network="n", overlap=0)
    auth = view.authenticate(ks.credentials(), ks.static.public, NOW, allow_unknown=True)
    assert auth.peer_id == ks.peer_id


def test_file_modes(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    assert stat.S_IMODE(os.stat(ks.dir).st_mode) == 0o700
    for name in ("identity.key", "static-1.key"):
        assert stat.S_IMODE(os.stat(ks.dir / name).st_mode) == 0o600
    assert not list(ks.dir.glob(".*.tmp"))


def test_keys_are_fresh_each_time(tmp_path: Path) -> None:
    a, b = _create(tmp_path / "a"), _create(tmp_path / "b")
    assert a.identity_public != b.identity_public
    assert a.static.public != b.static.public


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    before = (ks.dir / "identity.key").read_bytes()
    with pytest.raises(IdentityExists):
        _create(tmp_path / "keys")
    assert (ks.dir / "identity.key").read_bytes() == before


def test_no_identity(tmp_path: Path) -> None:
    with pytest.raises(NoIdentity):
        Keystore.load(tmp_path, now=NOW)
    with pytest.raises(NoIdentity):
        Keystore.read_public(tmp_path)


def test_unprotected_files_are_refused(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    os.chmod(ks.dir / "identity.key", 0o644)
    with pytest.raises(KeystoreError, match="accessible to other users") as info:
        Keystore.load(ks.dir, now=NOW)
    assert "chmod 600" in info.value.hint
    os.chmod(ks.dir / "identity.key", 0o600)
    os.chmod(ks.dir, 0o755)
    with pytest.raises(KeystoreError, match="accessible to other users"):
        Keystore.load(ks.dir, now=NOW)


def test_sealed_keys(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys", passphrase=b"correct horse")
    for name in ("identity.key", "static-1.key"):
        raw = (ks.dir / name).read_bytes()
        fields = msgpack.unpackb(raw)
        assert fields[3] is not None  # seal parameters present
    # The private keys are not in the files in the clear.
    assert ks._identity_seed not in (ks.dir / "identity.key").read_bytes()
    assert ks.static.private not in (ks.dir / "static-1.key").read_bytes()
    with pytest.raises(WrongPassphrase):
        Keystore.load(ks.dir, now=NOW)
    with pytest.raises(WrongPassphrase):
        Keystore.load(ks.dir, now=NOW, passphrase=b"wrong horse")
    loaded = Keystore.load(ks.dir, now=NOW, passphrase=b"correct horse")
    assert loaded.static == ks.static
    assert loaded.sealed
    # peerd id works without the passphrase
    public = Keystore.read_public(ks.dir)
    assert (public.peer_id, public.sealed) == (ks.peer_id, True)


def test_rotation_under_a_seal_reuses_the_salt(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys", passphrase=b"pw")
    ks.rotate(NOW + 1, certificate_days=30)
    salts = {
        bytes(msgpack.unpackb((ks.dir / n).read_bytes())[3][0])
        for n in ("identity.key", "static-1.key", "static-2.key")
    }
    assert len(salts) == 1  # one Argon2id run unlocks the whole keystore
    assert Keystore.load(ks.dir, now=NOW, passphrase=b"pw").serial == 2


def test_tampered_key_file_is_refused(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    fields = msgpack.unpackb((ks.dir / "static-1.key").read_bytes())
    fields[2] = bytes(32)  # claim another public key
    (ks.dir / "static-1.key").write_bytes(msgpack.packb(fields))
    with pytest.raises(KeystoreError, match="do not match"):
        Keystore.load(ks.dir, now=NOW)
    (ks.dir / "static-1.key").write_bytes(b"garbage")
    with pytest.raises(KeystoreError, match="not a peerd"):
        Keystore.load(ks.dir, now=NOW)


def test_unreasonable_seal_parameters_are_refused(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys", passphrase=b"pw")
    fields = msgpack.unpackb((ks.dir / "identity.key").read_bytes())
    fields[3][2] = 1 << 40  # a terabyte of memory
    (ks.dir / "identity.key").write_bytes(msgpack.packb(fields))
    with pytest.raises(KeystoreError, match="unreasonable"):
        Keystore.load(ks.dir, now=NOW, passphrase=b"pw")


def test_rotate_and_prune(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    first = ks.static
    assert not ks.needs_rotation(NOW, rotate_before_days=7)
    assert ks.needs_rotation(NOW + 23 * DAY, rotate_before_days=7)
    cert = ks.rotate(NOW + 23 * DAY, certificate_days=30)
    assert cert.serial == 2
    assert ks.certificate == cert
    assert ks.static_for(1) == first  # kept for the overlap
    assert ks.prune(NOW + 23 * DAY + 10, overlap=3600) == []
    assert ks.prune(NOW + 23 * DAY + 3600, overlap=3600) == [1]
    assert ks.static_for(1) is None
    assert not (ks.dir / "static-1.key").exists()
    loaded = Keystore.load(ks.dir, now=NOW)
    assert [c.serial for c in loaded.certificates()] == [2]


def test_interrupted_rotation_is_discarded(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    ks.rotate(NOW + 1, certificate_days=30)
    (ks.dir / "cert-2").unlink()  # the crash came between the key file and the certificate
    loaded = Keystore.load(ks.dir, now=NOW)
    assert loaded.serial == 1
    assert not (ks.dir / "static-2.key").exists()


def test_succession(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    first = ks.identity_public
    peer_id = ks.peer_id
    link = ks.succeed_identity(NOW + 5, certificate_days=30)
    assert ks.peer_id == peer_id  # the peer id never changes
    assert link.old_identity == first
    assert ks.identity_public == link.new_identity != first
    assert ks.certificate.identity_public == ks.identity_public
    assert ks.serial == 2
    loaded = Keystore.load(ks.dir, now=NOW)
    assert loaded.identity_public == ks.identity_public
    assert loaded.peer_id == peer_id
    assert verify_chain(peer_id, loaded.successions, first)[-1] == ks.identity_public
    creds = Credentials.decode(loaded.credentials())
    assert creds.verify(NOW + 5)[-1] == ks.identity_public
    assert not (ks.dir / "identity-next.key").exists()


def test_succession_interrupted_before_the_record_keeps_the_old_identity(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    # A crash right after identity-next.key was written: no succession record yet.
    other = _create(tmp_path / "other")
    (ks.dir / "identity-next.key").write_bytes((other.dir / "identity.key").read_bytes())
    os.chmod(ks.dir / "identity-next.key", 0o600)
    loaded = Keystore.load(ks.dir, now=NOW)
    assert loaded.identity_public == ks.identity_public
    assert loaded.successions == ()
    assert not (ks.dir / "identity-next.key").exists()


def test_succession_interrupted_after_the_record_is_completed(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    old_identity_file = (ks.dir / "identity.key").read_bytes()
    link = ks.succeed_identity(NOW, certificate_days=30)
    # A crash after the succession record, before the new certificate and the final rename:
    new_identity_file = (ks.dir / "identity.key").read_bytes()
    (ks.dir / "identity-next.key").write_bytes(new_identity_file)
    os.chmod(ks.dir / "identity-next.key", 0o600)
    (ks.dir / "identity.key").write_bytes(old_identity_file)
    (ks.dir / "cert-2").unlink()
    (ks.dir / "static-2.key").unlink()
    loaded = Keystore.load(ks.dir, now=NOW + 1, certificate_days=30)
    assert loaded.identity_public == link.new_identity
    assert loaded.certificate.identity_public == link.new_identity  # re-issued
    assert loaded.serial == 2
    assert not (ks.dir / "identity-next.key").exists()
    assert Keystore.load(ks.dir, now=NOW).identity_public == link.new_identity


def test_revocation_statements(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    with pytest.raises(KeystoreError, match="would revoke the current key"):
        ks.revoke_static(NOW, through=1)
    ks.rotate(NOW, certificate_days=30)
    statement = ks.revoke_static(NOW, through=1, reason="laptop stolen")
    statement.verify_signature()
    assert (statement.kind, statement.serial, statement.peer_id) == ("static", 1, ks.peer_id)
    # A revoked key gets no overlap: it is erased at once.
    assert ks.static_for(1) is None
    assert not (ks.dir / "static-1.key").exists()
    assert [c.serial for c in Keystore.load(ks.dir, now=NOW).certificates()] == [2]
    whole = ks.revoke_identity(NOW)
    whole.verify_signature()
    assert whole.kind == "identity"


def test_membership(tmp_path: Path) -> None:
    ks = _create(tmp_path / "keys")
    authority = new_identity_seed()
    m = issue_membership(
        authority,
        network="lab",
        peer_id=ks.peer_id,
        identity_public=ks.identity_public,
        now=NOW,
        lifetime=DAY,
    )
    ks.set_membership(m.encode(), authority_key=ed25519_public(authority))
    assert Credentials.decode(ks.credentials()).membership == m
    assert Keystore.load(ks.dir, now=NOW).membership == m
    with pytest.raises(KeystoreError, match="another authority"):
        ks.set_membership(m.encode(), authority_key=bytes(32))
    other = issue_membership(
        authority,
        network="lab",
        peer_id=peer_id_for(bytes(32)),
        identity_public=bytes(32),
        now=NOW,
        lifetime=DAY,
    )
    with pytest.raises(KeystoreError, match="another node"):
        ks.set_membership(other.encode())
    # After a succession the old membership no longer matches and is not presented.
    ks.succeed_identity(NOW, certificate_days=30)
    assert Credentials.decode(ks.credentials()).membership is None


def test_read_passphrase(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"secret\n")
    os.chmod(f, 0o600)
    assert read_passphrase(f) == b"secret"
    os.chmod(f, 0o644)
    with pytest.raises(KeystoreError, match="every user"):
        read_passphrase(f)
    f.write_bytes(b"\n")
    os.chmod(f, 0o600)
    with pytest.raises(KeystoreError, match="empty"):
        read_passphrase(f)
    with pytest.raises(KeystoreError):
        read_passphrase(tmp_path / "absent")


def test_erased_private_keys_are_in_no_file_of_the_keys_directory(tmp_path: Path) -> None:
    """The keystore's erasures (prune after the overlap, revoke_static, an identity succession)
    leave no file holding the old private key - temporary files included (SECURITY.md 3.8)."""
    ks = _create(tmp_path / "keys")
    old_identity = ks.signing_key().encode()
    first = ks.static.private
    ks.rotate(NOW + 10)
    second = ks.static.private
    ks.rotate(NOW + 20)
    assert ks.prune(NOW + 20 + 3600, overlap=3600) == [1, 2]
    ks.rotate(NOW + 5000)
    third_serial = ks.serial
    third = ks.static.private
    ks.rotate(NOW + 5010)
    ks.revoke_static(NOW + 5020, through=third_serial)
    ks.succeed_identity(NOW + 5030, certificate_days=30)
    assert ks.signing_key().encode() != old_identity
    erased = {"identity": old_identity, "static-1": first, "static-2": second, "static-3": third}
    for name, secret in erased.items():
        holders = [p.name for p in tmp_path.rglob("*") if p.is_file() and secret in p.read_bytes()]
        assert holders == [], name
    # The keys kept are still there (the search would find them): the test can see a key.
    current = ks.static.private
    assert any(current in p.read_bytes() for p in (tmp_path / "keys").iterdir())
