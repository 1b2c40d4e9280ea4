"""Where the broker is and how to connect to it (`BrokerSettings`), and the reconnect backoff."""

from __future__ import annotations

import contextlib
import ipaddress
import random
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from peerd.mqtt.errors import BrokerSettingsError

__all__ = ["CLIENT_ID", "DEFAULT_MAX_PACKET_SIZE", "Backoff", "BrokerSettings"]

# The shipped broker config (systemd/mosquitto-peerd.conf) uses the same limit: a 256 KiB chunk
# frame plus headers fits with room to spare, and EMQX and NATS refuse 1 MiB+ packets by default.
DEFAULT_MAX_PACKET_SIZE = 1 << 20
_MQTT_MAX_REMAINING = 268_435_455
CLIENT_ID = re.compile(r"[a-z0-9]{1,23}\Z")
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


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
            raise _bad("a CA file, client certificate or key needs an mqtts:// broker URL")
        if self.key_file and not self.cert_file:
            raise _bad("a client key needs a client certificate (cert_file)")
        for what, path in (("CA", self.ca_file), ("certificate", self.cert_file)):
            if path is not None and not path.is_file():
                raise _bad(f"the broker {what} file {path} does not exist")
        if self.key_file is not None and not self.key_file.is_file():
            raise _bad(f"the broker client key file {self.key_file} does not exist")
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
        """Settings from `mqtt://host[:port]` or `mqtts://host[:port]` and options.

        Credentials may be in the URL (`mqtt://user:pass@host`, percent-encoded) or given as
        options, not both. The default ports are 1883 and 8883.
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
                f"unsupported broker URL {_redact(url)!r}: use mqtt://host:port or"
                " mqtts://host:port"
            )
        if not host:
            raise _bad(f"the broker URL {_redact(url)!r} names no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise _bad(f"the broker URL {_redact(url)!r} must not have a path or query")
        if parts.username is not None:
            if username is not None or password is not None:
                raise _bad("broker credentials given both in the URL and as options")
            username = unquote(parts.username)
            password = unquote(parts.password) if parts.password is not None else None
        return cls(
            host=host,
            port=port if port is not None else _DEFAULT_PORTS[scheme],
            client_id=client_id,
            tls=scheme == "mqtts",
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
        )

    @property
    def url(self) -> str:
        """The broker URL without credentials, for messages and logs."""
        host = self.host
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
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
