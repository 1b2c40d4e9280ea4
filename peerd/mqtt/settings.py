"""Where the broker is and how to connect to it (`BrokerSettings`), and the reconnect backoff."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from peerd.mqtt.errors import BrokerSettingsError

__all__ = [
    "CLIENT_ID",
    "DEFAULT_MAX_PACKET_SIZE",
    "SCHEMES",
    "Backoff",
    "BrokerSettings",
    "check_key_file",
    "url_uses_tls",
]

# The shipped broker config (systemd/mosquitto-peerd.conf) uses the same limit: a 256 KiB chunk
# frame plus headers fits with room to spare, and EMQX and NATS refuse 1 MiB+ packets by default.
DEFAULT_MAX_PACKET_SIZE = 1 << 20
_MQTT_MAX_REMAINING = 268_435_455
CLIENT_ID = re.compile(r"[a-z0-9]{1,23}\Z")
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
SCHEMES = tuple(_DEFAULT_PORTS)
# The path most brokers serve MQTT over WebSocket on (EMQX, Azure Event Grid, HiveMQ); Mosquitto
# takes any path, RabbitMQ's web_mqtt wants /ws: a ws:// URL without a path gets this one.
DEFAULT_WEBSOCKET_PATH = "/mqtt"


def url_uses_tls(url: str) -> bool:
    """mqtts:// and wss:// URLs use TLS (and so the CA, certificate and key files)."""
    return url.strip().lower().startswith(("mqtts://", "wss://"))


def _bad(message: str) -> BrokerSettingsError:
    return BrokerSettingsError(message)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the broker is and how to connect to it. Validated on construction."""

    host: str
    port: int
    client_id: str
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 30
    connect_timeout: float = 10.0
    clean_session: bool = True
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    # 4: MQTT 3.1.1 (the default, see docs/ARCHITECTURE.md); 5: MQTT 5 only; 0: MQTT 5 where
    # the broker speaks it, else 3.1.1 (NATS refuses 5).
    mqtt_version: int = 4
    # MQTT over WebSocket (ws://, wss://): the HTTP path of the upgrade; None for MQTT over TCP.
    websocket_path: str | None = None

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):
            raise _bad(f"invalid broker host {self.host!r}")
        if not 1 <= self.port <= 65535:
            raise _bad(f"invalid broker port {self.port}: must be 1-65535")
        if not CLIENT_ID.match(self.client_id):
            raise _bad(
                f"invalid MQTT client id {self.client_id!r}: must be 1-23 lowercase letters"
                " or digits (the node's peer id)"
            )
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise _bad(
                "a CA file, client certificate or key needs an mqtts:// or wss:// broker URL"
            )
        if self.websocket_path is not None and (
            not self.websocket_path.startswith("/")
            or any(c.isspace() or ord(c) < 32 for c in self.websocket_path)
        ):
            raise _bad(f"invalid WebSocket path {self.websocket_path!r}")
        if self.key_file and not self.cert_file:
            raise _bad("a client key needs a client certificate (cert_file)")
        for what, path in (("CA", self.ca_file), ("certificate", self.cert_file)):
            if path is not None and not path.is_file():
                raise _bad(f"the broker {what} file {path} does not exist")
        if self.key_file is not None:
            check_key_file(self.key_file)
        if self.password is not None and self.username is None:
            raise _bad("a broker password needs a username (MQTT 3.1.1)")
        for what, value in (("username", self.username), ("password", self.password)):
            if value is not None and len(value.encode()) > 65535:
                raise _bad(f"the broker {what} is longer than 65535 bytes")
        if not 1 <= self.keepalive <= 65535:
            raise _bad(f"invalid MQTT keepalive {self.keepalive}: must be 1-65535 seconds")
        if not 0 < self.connect_timeout <= 3600:
            raise _bad(f"invalid connect timeout {self.connect_timeout}")
        if not 1024 <= self.max_packet_size <= _MQTT_MAX_REMAINING:
            raise _bad(f"invalid max packet size {self.max_packet_size}")
        if self.mqtt_version not in (0, 4, 5):
            raise _bad(f"invalid MQTT version {self.mqtt_version}: 0 (either), 4 (3.1.1) or 5")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        client_id: str,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
        clean_session: bool = True,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        mqtt_version: int = 4,
    ) -> BrokerSettings:
        """Settings from `mqtt://host[:port]`, `mqtts://host[:port]`, `ws://host[:port][/path]`
        or `wss://host[:port][/path]` and options.

        Credentials may be in the URL (`mqtt://user:pass@host`, percent-encoded) or given as
        options, not both. The default ports are 1883, 8883, 80 and 443; a WebSocket URL without
        a path uses /mqtt.
        """
        try:
            parts = urlsplit(url.strip())
            scheme = parts.scheme.lower()
            host = parts.hostname
            port = parts.port
        except ValueError as exc:
            raise _bad(f"invalid broker URL {_redact(url)!r}: {exc}") from exc
        if scheme not in _DEFAULT_PORTS:
            raise _bad(
                f"unsupported broker URL {_redact(url)!r}: use mqtt://host:port,"
                " mqtts://host:port, ws://host:port/path or wss://host:port/path"
            )
        if not host:
            raise _bad(f"the broker URL {_redact(url)!r} names no host")
        websocket = scheme in ("ws", "wss")
        if parts.fragment or (not websocket and (parts.path not in ("", "/") or parts.query)):
            raise _bad(f"the broker URL {_redact(url)!r} must not have a path or query")
        path = None
        if websocket:
            query = f"?{parts.query}" if parts.query else ""
            path = (parts.path or DEFAULT_WEBSOCKET_PATH) + query
        if parts.username is not None:
            if username is not None or password is not None:
                raise _bad("broker credentials given both in the URL and as options")
            username = unquote(parts.username)
            password = unquote(parts.password) if parts.password is not None else None
        return cls(
            host=host,
            port=port if port is not None else _DEFAULT_PORTS[scheme],
            client_id=client_id,
            tls=scheme in ("mqtts", "wss"),
            ca_file=Path(ca_file) if ca_file is not None else None,
            cert_file=Path(cert_file) if cert_file is not None else None,
            key_file=Path(key_file) if key_file is not None else None,
            username=username,
            password=password,
            keepalive=keepalive,
            connect_timeout=connect_timeout,
            clean_session=clean_session,
            max_packet_size=max_packet_size,
            mqtt_version=mqtt_version,
            websocket_path=path,
        )

    @property
    def url(self) -> str:
        """The broker URL without credentials, for messages and logs."""
        host = self.host
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        if self.websocket_path is not None:
            return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}{self.websocket_path}"
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for mqtts:// (None for mqtt://); reads the CA and key files."""
        if not self.tls:
            return None
        try:
            ctx = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
            if self.cert_file is not None:
                ctx.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
        except (OSError, ssl.SSLError) as exc:
            raise _bad(f"cannot load the broker TLS files: {exc}") from exc
        return ctx


def check_key_file(path: Path) -> None:
    """The client key exists and only its owner (and group) can read it, as ssh insists for
    its keys: a key anyone on the machine can read lets anyone log in to the broker as us."""
    try:
        st = path.stat()
    except OSError as exc:
        raise _bad(
            f"the broker client key file {path} cannot be read: {exc.strerror or exc}"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise _bad(f"the broker client key file {path} is not a file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise BrokerSettingsError(
            f"the broker client key file {path} is accessible to other users (mode {mode:04o})",
            hint=f"chmod 600 {path} (or 640 with a group the daemon's user is in)",
        )
    if not os.access(path, os.R_OK):
        raise _bad(f"the broker client key file {path} is not readable by this user")


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


# --- backoff ------------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Exponential backoff with jitter for reconnects.

    Attempt n (from 0) waits `min(maximum, initial * factor**n)` scaled by a uniform draw in
    `[1 - jitter, 1]`, so 200 daemons that lost the same broker do not return in lockstep. The
    link resets the sequence at every successful connect.
    """

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, repr=False)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs factor >= 1 and 0 <= jitter <= 1")

    def ceiling(self, attempt: int) -> float:
        """The largest delay attempt `attempt` may wait."""
        return min(self.maximum, self.initial * self.factor ** min(attempt, 64))

    def next_delay(self) -> float:
        ceiling = self.ceiling(self.attempt)
        self.attempt += 1
        return ceiling * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0
