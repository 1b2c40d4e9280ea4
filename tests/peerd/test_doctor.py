"""The checks of `peerd doctor` that need no broker (peerd/doctor.py); the broker and the CLI
are tested end to end in tests/e2e/test_doctor.py."""

from __future__ import annotations

from pathlib import Path

from peerd.config import default_config, load_config
from peerd.doctor import FAIL, OK, SKIP, check_clock, check_config, check_systemd

# What `systemctl show peerd.service` says of the shipped unit (systemd/peerd.service).
SHIPPED = {
    "LoadState": "loaded",
    "ActiveState": "active",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "ReadWritePaths": "",
    "StateDirectory": "peerd",
    "RuntimeDirectory": "peerd",
}


def test_the_shipped_sandbox_allows_the_default_paths() -> None:
    assert check_systemd(default_config(), SHIPPED).status == OK


def test_an_inbox_outside_the_sandbox_fails_and_names_the_drop_in(tmp_path: Path) -> None:
    path = tmp_path / "peerd.toml"
    path.write_text('[node]\ninbox_dir = "/srv/models"\n')
    finding = check_systemd(load_config(path), SHIPPED)
    assert finding.status == FAIL
    assert "[node] inbox_dir /srv/models (ProtectSystem=strict)" in finding.detail
    assert "ReadWritePaths=" in finding.fix
    allowed = check_systemd(load_config(path), {**SHIPPED, "ReadWritePaths": "-/srv/models"})
    assert allowed.status == OK
    path.write_text('[node]\ninbox_dir = "/home/me/models"\n')
    home = check_systemd(load_config(path), {**SHIPPED, "ReadWritePaths": "/home/me"})
    assert home.status == FAIL
    assert "ProtectHome" in home.detail


def test_no_unit_is_skipped_not_failed() -> None:
    assert check_systemd(default_config(), None).status == SKIP


def test_a_clock_behind_the_store_fails() -> None:
    assert check_clock(1000.0, 1000.0 + 3600).status == FAIL
    assert check_clock(1000.0, 990.0).status != FAIL


def test_a_secret_readable_by_everyone_fails(tmp_path: Path) -> None:
    secret = tmp_path / "broker-password"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    path = tmp_path / "peerd.toml"
    path.write_text(f'[broker]\nusername = "u"\npassword_file = "{secret}"\n')
    findings, config = check_config(path)
    assert config is not None
    (bad,) = [f for f in findings if f.status == FAIL]
    assert bad.fix.startswith(f"chmod o-rwx {secret}")
    secret.chmod(0o640)
    findings, _ = check_config(path)
    assert all(f.status == OK for f in findings)
    path.write_text("[broker]\nurl = 'ftp://x'\n")
    findings, config = check_config(path)
    assert config is None
    assert findings[0].status == FAIL
