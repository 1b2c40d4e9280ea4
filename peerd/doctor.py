"""`peerd doctor`: what is wrong with this node, each finding with what to do about it.

Each check returns `Finding`s: ok, warn (works, but deserves a look) or fail (something will
not work until fixed). The node is healthy when nothing fails. Checks:

- config: the file loads; it is not writable by others; the secret files it names (broker
  password, key passphrase, network PSK, client key) exist and are not readable by others;
- keys: the identity is there, the key files are 0600 in a 0700 directory, the certificate's
  validity;
- store: a peerd store of a schema this version knows, not readable by others;
- broker: for each broker URL, a connection made with the daemon's own MQTT client code (the
  transport port, `peerd.mqtt.link_for_config`): reachable, TLS, login, the MQTT version and
  the limits in force. While the daemon is connected to that broker its own connection is
  reported instead: the shipped broker replaces the client id by the username, so a second
  login as this node would throw the daemon off;
- clock: synchronised (timedatectl) and not behind what the store recorded last;
- disk: the inbox is writable and has room beyond `[receive] free_space_margin`;
- systemd: when the peerd unit is loaded, that its sandbox lets the daemon write every
  directory the configuration names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from peerd.config import Config, load_config
from peerd.errors import PeerdError
from peerd.keystore import Keystore
from peerd.mqtt import (
    BrokerError,
    BrokerRefused,
    BrokerTlsError,
    BrokerUnreachable,
    link_for_config,
)
from peerd.store.schema import APPLICATION_ID, MIGRATIONS

OK: Final = "ok"
WARN: Final = "warn"
FAIL: Final = "fail"
SKIP: Final = "skip"
CLOCK_SKEW: Final = 300.0  # seconds the protocol tolerates between two nodes' clocks


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def healthy(findings: list[Finding]) -> bool:
    return not any(f.status == FAIL for f in findings)


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- config -------------------------------------------------------------------------------------


def check_config(path: Path) -> tuple[list[Finding], Config | None]:
    try:
        config = load_config(path)
    except PeerdError as exc:
        return [
            Finding("config", FAIL, exc.one_line(), "fix the file (`peerd init` writes one)")
        ], None
    found = [Finding("config", OK, f"{path} loads")]
    mode = _mode(path)
    if mode is not None and mode & 0o022:
        found.append(
            Finding(
                "config", FAIL, f"{path} is writable by others ({mode:o})", f"chmod go-w {path}"
            )
        )
    secrets = {
        "[broker] password_file": config.broker.password_file,
        "[broker] key_file": config.broker.key_file,
        "[keys] passphrase_file": config.keys.passphrase_file,
        "[network] psk_file": config.network.psk_file,
    }
    for what, secret in secrets.items():
        if secret is None:
            continue
        mode = _mode(secret)
        if mode is None:
            found.append(
                Finding(
                    "config", FAIL, f"{what}: {secret} does not exist", f"create it or unset {what}"
                )
            )
        elif mode & 0o007:
            found.append(
                Finding(
                    "config",
                    FAIL,
                    f"{what}: {secret} is readable by every user ({mode:o})",
                    f"chmod o-rwx {secret} (0640, group peerd, is enough for the daemon)",
                )
            )
        elif not os.access(secret, os.R_OK):
            found.append(
                Finding(
                    "config",
                    WARN,
                    f"{what}: {secret} is not readable by this user",
                    "run doctor as root or as the daemon's user to check it",
                )
            )
    return found, config


# -- keys and store -----------------------------------------------------------------------------


def check_keys(config: Config, now: float) -> tuple[list[Finding], str | None]:
    keys = config.keys.dir
    found = []
    dir_mode = _mode(keys)
    try:
        # The private keys (*.key); certificates and the membership are public.
        loose = [p for p in sorted(keys.glob("*.key")) if (_mode(p) or 0) & 0o077]
    except PermissionError:
        loose = []
    if dir_mode is not None and dir_mode & 0o077:
        found.append(
            Finding("keys", FAIL, f"{keys} is open to others ({dir_mode:o})", f"chmod 700 {keys}")
        )
    if loose:
        names = " ".join(str(p) for p in loose)
        found.append(
            Finding("keys", FAIL, f"{len(loose)} key file(s) open to others", f"chmod 600 {names}")
        )
    try:
        public = Keystore.read_public(keys)
    except PermissionError:
        return [
            Finding(
                "keys",
                SKIP,
                f"{keys} is not readable by this user",
                "run doctor as root or as the daemon's user",
            )
        ], None
    except PeerdError as exc:
        # A key open to others is refused by the keystore too: its fix comes first.
        return found or [Finding("keys", FAIL, exc.one_line(), "run `peerd init`")], None
    cert = public.certificate
    if cert is None:
        found.append(
            Finding("keys", FAIL, "no static key certificate", "start the daemon: it issues one")
        )
    elif now >= cert.not_after:
        found.append(
            Finding(
                "keys",
                WARN,
                f"certificate serial {cert.serial} expired {_ago(now - cert.not_after)}",
                "start the daemon (it rotates at start) or run `peerd rotate`",
            )
        )
    if not found:
        until = time.strftime("%Y-%m-%d", time.gmtime(cert.not_after)) if cert else "-"
        found.append(
            Finding("keys", OK, f"peer id {public.peer_id}, certificate valid until {until}")
        )
    return found, public.peer_id


def _ago(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days ago" if seconds >= 86400 else f"{seconds / 3600:.1f} h ago"


def check_store(config: Config) -> tuple[list[Finding], float | None]:
    """The store's findings and the time of its newest event (for the clock check)."""
    path = config.node.store
    if not path.exists():
        return [Finding("store", FAIL, f"no trust store at {path}", "run `peerd init`")], None
    found = []
    for p in (path, path.with_name(path.name + "-wal")):
        mode = _mode(p)
        if mode is not None and mode & 0o007:
            found.append(
                Finding("store", FAIL, f"{p} is readable by others ({mode:o})", f"chmod o-rwx {p}")
            )
    newest = None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            app = db.execute("PRAGMA application_id").fetchone()[0]
            version = 0
            if app == APPLICATION_ID:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else 0
                newest = db.execute("SELECT max(at) FROM events").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as exc:
        if "unable to open" in str(exc) and not os.access(path, os.R_OK):
            return [
                *found,
                Finding(
                    "store",
                    SKIP,
                    f"{path} is not readable by this user",
                    "run doctor as root or as the daemon's user",
                ),
            ], None
        return [
            *found,
            Finding("store", FAIL, f"{path}: {exc}", "restore it from a backup (`peerd restore`)"),
        ], None
    if app != APPLICATION_ID:
        found.append(Finding("store", FAIL, f"{path} is not a peerd store", "check [node] store"))
    elif version > len(MIGRATIONS):
        found.append(
            Finding(
                "store",
                FAIL,
                f"schema {version} is newer than this peerd ({len(MIGRATIONS)})",
                "upgrade peerd (the store was written by a newer release)",
            )
        )
    elif not found:
        found.append(Finding("store", OK, f"{path}, schema {version}"))
    return found, newest


# -- broker -------------------------------------------------------------------------------------


def broker_urls(config: Config) -> list[str]:
    """Every broker URL the configuration names (one `url`, or a list where it has one)."""
    return list(config.broker.broker_urls)


def _version(level: int) -> str:
    return {4: "MQTT 3.1.1", 5: "MQTT 5"}.get(level, f"MQTT level {level}")


def _limits_text(limits: Mapping[str, Any]) -> str:
    parts = [f"packets <= {_size(int(limits['max_packet_size']))}"]
    if limits.get("receive_maximum", 65535) < 65535:
        parts.append(f"{limits['receive_maximum']} in flight")
    if limits.get("maximum_qos", 1) < 1:
        parts.append("QoS 0 only")
    if not limits.get("retain_available", True):
        parts.append("NO retained messages (offline peers miss revocations)")
    return ", ".join(parts)


def _broker_fix(exc: PeerdError) -> str:
    cause = exc.__cause__ if isinstance(exc.__cause__, PeerdError) else exc
    if isinstance(cause, BrokerRefused) and cause.code in (4, 5, 0x86, 0x87):
        return "check [broker] username and the password file (`peerd broker-login`)"
    if isinstance(cause, BrokerTlsError):
        return "check the broker's certificate and [broker] ca_file"
    if isinstance(cause, BrokerUnreachable) or "not connected" in str(exc):
        return "start the broker, or check the URL's host and port and any firewall"
    return exc.hint or "see the message"


async def check_broker(
    config: Config, url: str, client_id: str, within: float, daemon: Mapping[str, Any] | None
) -> Finding:
    name = f"broker {url}"
    seen = (daemon or {}).get("broker") or {}
    if seen.get("url") == url and seen.get("connected"):
        limits = seen.get("limits") or {"max_packet_size": seen.get("max_packet_size", 0)}
        level = limits.get("version")
        what = f"{_version(level)}, " if level else ""
        tls = "TLS, " if dataclasses.replace(config.broker, url=url, urls=None).tls else ""
        return Finding(
            name, OK, f"the daemon is connected: {tls}logged in, {what}{_limits_text(limits)}"
        )
    broker = dataclasses.replace(config.broker, url=url, urls=None)  # this URL alone
    quiet = logging.getLogger("peerd.mqtt")
    before = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the link logs its retries; the finding says it all
    try:
        link = link_for_config(broker, client_id=client_id)
        runner = asyncio.create_task(link.run(), name=f"doctor {url}")
        try:
            await link.wait_connected(within)
            limits = dataclasses.asdict(link.limits)
        except BrokerError as exc:
            cause = link.last_error or exc
            return Finding(name, FAIL, str(cause), _broker_fix(cause))
        finally:
            await link.close()
            await asyncio.gather(runner, return_exceptions=True)
    except PeerdError as exc:
        return Finding(name, FAIL, str(exc), _broker_fix(exc))
    finally:
        quiet.setLevel(before)
    login = f"logged in as {config.broker.username}" if config.broker.username else "no login"
    tls = "TLS verified, " if broker.tls else "no TLS, "
    finding = Finding(
        name, OK, f"reachable, {tls}{login}, {_version(limits['version'])}, {_limits_text(limits)}"
    )
    if not broker.tls and broker.host not in ("127.0.0.1", "localhost", "::1"):
        return dataclasses.replace(
            finding, status=WARN, fix="use mqtts:// (or wss://) to a remote broker"
        )
    if not limits.get("retain_available", True):
        return dataclasses.replace(
            finding, status=WARN, fix="enable retained messages on the broker"
        )
    return finding


# -- clock, disk, systemd -----------------------------------------------------------------------


def check_clock(now: float, newest_event: float | None) -> Finding:
    if newest_event is not None and newest_event > now + CLOCK_SKEW:
        return Finding(
            "clock",
            FAIL,
            f"the store recorded an event {newest_event - now:.0f} s in the future: the clock "
            "went back",
            "set the clock (timedatectl set-ntp true)",
        )
    tool = shutil.which("timedatectl")
    if tool is None:
        return Finding(
            "clock", SKIP, "no timedatectl: cannot tell whether the clock is synchronised"
        )
    try:
        out = subprocess.run(  # noqa: S603 - a fixed command, found on PATH
            [tool, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return Finding("clock", SKIP, "timedatectl did not answer")
    value = out.stdout.strip()
    if out.returncode != 0 or value not in ("yes", "no"):
        return Finding("clock", SKIP, "timedatectl cannot tell (no systemd here?)")
    if value == "no":
        return Finding(
            "clock",
            WARN,
            "not synchronised: certificates, invites and revocations carry times (5 min skew "
            "allowed)",
            "timedatectl set-ntp true",
        )
    return Finding("clock", OK, "synchronised (NTP)")


def check_disk(config: Config) -> Finding:
    inbox = config.node.inbox_dir
    probe = inbox
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not inbox.exists():
        return Finding(
            "disk",
            FAIL,
            f"the inbox {inbox} does not exist",
            f"mkdir -p {inbox} (owned by the daemon's user)",
        )
    free = shutil.disk_usage(probe).free
    margin = config.receive.free_space_margin
    room = free - margin
    detail = f"{_size(free)} free in {inbox}; files up to {_size(max(room, 0))} fit"
    if not os.access(inbox, os.W_OK):
        return Finding(
            "disk",
            WARN,
            f"{detail}; not writable by this user",
            "fine if the daemon runs as another user; else fix the owner",
        )
    if room <= 0:
        return Finding(
            "disk",
            FAIL,
            f"{detail}: below [receive] free_space_margin {_size(margin)}",
            "free space, or move [node] inbox_dir to a larger disk",
        )
    if room < config.receive.max_file_size:
        return Finding(
            "disk",
            WARN,
            f"{detail} (less than [receive] max_file_size {_size(config.receive.max_file_size)})",
            "free space, or lower [receive] max_file_size to what fits",
        )
    return Finding("disk", OK, detail)


SYSTEMD_PROPERTIES: Final = (
    "LoadState",
    "ActiveState",
    "ProtectSystem",
    "ProtectHome",
    "ReadWritePaths",
    "StateDirectory",
    "RuntimeDirectory",
    "User",
)


def systemd_properties(unit: str = "peerd.service") -> dict[str, str] | None:
    """The unit's properties, or None when there is no systemd or the unit is not loaded."""
    tool = shutil.which("systemctl")
    if tool is None:
        return None
    try:
        out = subprocess.run(  # noqa: S603 - a fixed command, found on PATH
            [tool, "show", unit, *(f"--property={p}" for p in SYSTEMD_PROPERTIES)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return props if out.returncode == 0 and props.get("LoadState") == "loaded" else None


def check_systemd(config: Config, props: Mapping[str, str] | None) -> Finding:
    """Whether the unit's sandbox lets the daemon write each directory the config names."""
    if props is None:
        return Finding("systemd", SKIP, "no peerd.service loaded here")
    writable = [Path(p.lstrip("-")) for p in props.get("ReadWritePaths", "").split()]
    writable += [Path("/var/lib") / d for d in props.get("StateDirectory", "").split()]
    writable += [Path("/run") / d for d in props.get("RuntimeDirectory", "").split()]
    strict = props.get("ProtectSystem") == "strict"
    home = props.get("ProtectHome") in ("yes", "read-only", "tmpfs")
    needs = {
        "[node] state_dir": config.node.state_dir,
        "[node] inbox_dir": config.node.inbox_dir,
        "[node] runtime_dir": config.node.runtime_dir,
        "[node] store": config.node.store.parent,
        "[keys] dir": config.keys.dir,
    }
    blocked = []
    for what, path in needs.items():
        inside = any(path == w or w in path.parents for w in writable)
        if home and any(path.is_relative_to(h) for h in ("/home", "/root", "/run/user")):
            blocked.append(f"{what} {path} (ProtectHome)")
        elif strict and not inside:
            blocked.append(f"{what} {path} (ProtectSystem=strict)")
    state = props.get("ActiveState", "?")
    if blocked:
        return Finding(
            "systemd",
            FAIL,
            f"peerd.service ({state}) cannot write " + "; ".join(blocked),
            "keep them under /var/lib/peerd and /run/peerd, or add ReadWritePaths= in a drop-in "
            "(systemctl edit peerd)",
        )
    return Finding("systemd", OK, f"peerd.service ({state}): its sandbox allows every path")


async def diagnose(
    config_path: Path, *, daemon: Mapping[str, Any] | None, within: float
) -> list[Finding]:
    """Every check, in order; later ones are skipped when the configuration does not load."""
    found, config = check_config(config_path)
    if config is None:
        return found
    now = time.time()
    keys, peer_id = check_keys(config, now)
    store, newest = check_store(config)
    found += keys + store
    for url in broker_urls(config):
        found.append(await check_broker(config, url, peer_id or "peerd-doctor", within, daemon))
    found.append(check_clock(now, newest))
    found.append(check_disk(config))
    found.append(check_systemd(config, systemd_properties()))
    return found


__all__ = [
    "FAIL",
    "OK",
    "SKIP",
    "WARN",
    "Finding",
    "broker_urls",
    "check_broker",
    "check_clock",
    "check_config",
    "check_disk",
    "check_keys",
    "check_store",
    "check_systemd",
    "diagnose",
    "healthy",
    "systemd_properties",
]
