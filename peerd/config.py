"""The configuration file: one TOML file, read with tomllib, every key optional.

Each section is a dataclass; each key a field whose default works and whose metadata says how to
read it (`kind`) and what it means (`doc`, also written as a comment by `peerd init`). To add a
key, add a field with `key(...)`; to add a section, add a dataclass and a field of `Config`.
Unknown sections and keys are errors (a typo must not silently fall back to a default), and
every error names the file, the key and the problem.

Paths may be relative: they are taken relative to the directory of the configuration file.
Some defaults derive from other keys (`socket` from `runtime_dir`, `inbox_dir`, `store` and
`[keys] dir` from `state_dir`); they are filled in after the file is read.
"""

# ruff: noqa: RUF009 - `key()` returns a dataclasses.field; ruff cannot see that

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from peerd.errors import ConfigError
from peerd.locate import CONFIG_NAME, SOCKET_NAME, SYSTEM_CONFIG, SYSTEM_RUNTIME_DIR
from protocol.identity import InvalidText, check_network_name, parse_authority_key

DEFAULT_CONFIG_PATH: Final = Path(SYSTEM_CONFIG)
DEFAULT_RUNTIME_DIR: Final = Path(SYSTEM_RUNTIME_DIR)
MAX_SOCKET_PATH: Final = 107  # sun_path is 108 bytes including the terminating NUL
MAX_CONFIG_SIZE: Final = 1 << 20

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a human size: "10GiB", "512 MiB", "1.5GB", "4096"."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like '10GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a size is a number of bytes or a string like '10GiB'")
    m = _SIZE_RE.fullmatch(value)
    if m is None:
        raise ValueError(f"{value!r} is not a size (examples: 4096, '512MiB', '10GiB', '1.5GB')")
    number, unit = m.group(1), (m.group(2) or "b").lower()
    if "." in number:
        whole, frac = number.split(".")
        scale = int(10 ** len(frac))
        return (int(whole) * scale + int(frac)) * _UNITS[unit] // scale
    return int(number) * _UNITS[unit]


def format_size(n: int) -> str:
    """The shortest exact human form of a size ("10GiB"), else the number of bytes."""
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        factor = _UNITS[unit.lower()]
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


# -- declaring keys ---------------------------------------------------------------------------

Validator = Callable[[Any], Any]


def key(
    default: Any = None,
    *,
    doc: str,
    kind: str | None = None,
    check: Validator | None = None,
    derived: str | None = None,
    example: Any = None,
) -> Any:
    """A configuration key. `kind` overrides the reader chosen from the field's type ("size");
    `check` validates (raise ValueError with the problem) and may normalise the value;
    `derived` documents a default computed from other keys (the field's default is then None)."""
    return field(
        default=default,
        metadata={
            "doc": doc,
            "kind": kind,
            "check": check,
            "derived": derived,
            "example": example,
        },
    )


def _network(value: str) -> str:
    try:
        return check_network_name(value)
    except InvalidText as exc:
        raise ValueError(f"{exc} ({exc.hint})") from exc


def _broker_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts", "ws", "wss"):
        raise ValueError(f"{value!r}: the scheme must be mqtt://, mqtts://, ws:// or wss://")
    if not parts.hostname:
        raise ValueError(f"{value!r}: no host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r}: bad port") from exc
    websocket = parts.scheme in ("ws", "wss")
    if parts.fragment or (not websocket and (parts.path not in ("", "/") or parts.query)):
        raise ValueError(f"{value!r}: only mqtt[s]://host[:port] or ws[s]://host[:port]/path")
    if parts.netloc.endswith(":"):
        raise ValueError(f"{value!r}: a ':' with no port after it")
    if parts.username or parts.password:
        raise ValueError(
            f"{value!r}: put credentials in username / password_file, not the URL"
            " (`peerd init --broker-user NAME --broker-password-file FILE`)"
        )
    return value


def _broker_urls(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("name at least one broker URL")
    if len(value) > 16:
        raise ValueError(f"{len(value)} URLs: at most 16")
    if len(set(value)) != len(value):
        raise ValueError("a URL is given twice")
    return tuple(_broker_url(v) for v in value)


def _mqtt_version(value: str) -> str:
    if value not in ("3.1.1", "5", "auto"):
        raise ValueError(f"{value!r}: must be '3.1.1', '5' or 'auto'")
    return value


def _mqtt_client(value: str) -> str:
    if value not in ("builtin", "aiomqtt"):
        raise ValueError(f"{value!r}: must be 'builtin' or 'aiomqtt'")
    return value


def _authority(value: str) -> str:
    try:
        parse_authority_key(value)
    except InvalidText as exc:
        raise ValueError(f"{exc} ({exc.hint})") from exc
    return value


def _between(lo: float, hi: float) -> Validator:
    def check(value: Any) -> Any:
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, not {value}")
        return value

    return check


def _name(value: str) -> str:
    if not value or len(value) > 64 or any(ord(c) < 32 for c in value):
        raise ValueError("a node name is 1 to 64 printable characters")
    return value


def _group(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", value):
        raise ValueError(f"{value!r} is not a valid group name")
    return value


# -- the sections -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str = key(
        os.uname().nodename or "peerd", doc="a name for this node, shown to people", check=_name
    )
    network: str = key(
        "peerd",
        doc="the network this node belongs to (all its peers use the same)",
        check=_network,
    )
    state_dir: Path = key(Path("/var/lib/peerd"), doc="keys, trust store and received files")
    runtime_dir: Path = key(DEFAULT_RUNTIME_DIR, doc="the control socket lives here")
    socket: Path = key(doc="the control socket", derived="<runtime_dir>/peerd.sock")
    inbox_dir: Path = key(doc="where received files are written", derived="<state_dir>/inbox")
    store: Path = key(doc="the trust store (sqlite)", derived="<state_dir>/peerd.db")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str = key(
        "mqtt://127.0.0.1:1883",
        doc="mqtt://host:port, mqtts://host:port, or MQTT over WebSocket: ws://host:port/path,"
        " wss://host:443/mqtt (through firewalls that pass only HTTPS)",
        check=_broker_url,
    )
    urls: tuple[str, ...] | None = key(
        doc="several broker URLs (the nodes of a cluster, or bridged brokers), instead of url:"
        " on a lost connection the node moves to the next, in order",
        kind="strlist",
        check=_broker_urls,
        example=["mqtt://broker1.example:1883", "mqtt://broker2.example:1883"],
    )
    ca_file: Path | None = key(
        doc="CA certificates to verify the broker (mqtts, wss)",
        example="/etc/peerd/broker-ca.pem",
    )
    cert_file: Path | None = key(
        doc="client certificate for the broker (mqtts, wss)", example="/etc/peerd/client.pem"
    )
    key_file: Path | None = key(
        doc="private key of the client certificate (mode 0600, or 0640 with the daemon's group)",
        example="/etc/peerd/client.key",
    )
    username: str | None = key(doc="user name at the broker", example="peerd")
    password_file: Path | None = key(
        doc="file holding the broker password", example="/etc/peerd/broker-password"
    )
    keepalive: int = key(60, doc="MQTT keepalive, seconds", check=_between(5, 3600))
    republish_interval: float = key(
        300.0,
        doc="seconds between republishing this node's revocation statements (retained) and"
        " reading them back from the broker; also after every reconnect",
        check=_between(1, 86400),
    )
    max_packet_size: int = key(
        1024**2,
        doc="the largest MQTT packet this broker takes (its message_size_limit / max_payload);"
        " transfers use chunks that fit (down to 16 KiB). MQTT 5 brokers say theirs",
        kind="size",
        check=_between(16 * 1024 + 1024, 256 * 1024**2),
    )
    mqtt_version: str = key(
        "3.1.1",
        doc="3.1.1, 5, or auto (5 where the broker speaks it, else 3.1.1)",
        check=_mqtt_version,
    )
    client: str = key(
        "builtin",
        doc="the MQTT client: builtin (peerd's own, faster) or aiomqtt (needs peerd[aiomqtt])",
        check=_mqtt_client,
    )

    @property
    def protocol_level(self) -> int:
        """`mqtt_version` as BrokerSettings takes it (0: auto)."""
        return {"3.1.1": 4, "5": 5, "auto": 0}[self.mqtt_version]

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """The URLs the link may use, in order: `urls`, else `url`."""
        return self.urls or (self.url,)

    @property
    def tls(self) -> bool:
        """Some URL is mqtts:// or wss:// (so the TLS files have a use)."""
        return any(u.startswith(("mqtts://", "wss://")) for u in self.broker_urls)

    @property
    def host(self) -> str:
        """The host of the first URL."""
        return urlsplit(self.broker_urls[0]).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        """The port of the first URL."""
        default = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
        first = urlsplit(self.broker_urls[0])
        return first.port or default.get(first.scheme, 1883)


@dataclass(frozen=True, slots=True)
class ControlConfig:
    group: str | None = key(
        doc="members of this group may use the control socket (default: only root and the "
        "daemon's user)",
        check=_group,
        example="peerd",
    )


@dataclass(frozen=True, slots=True)
class KeysConfig:
    dir: Path = key(doc="private key files (mode 0600)", derived="<state_dir>/keys")
    passphrase_file: Path | None = key(
        doc="if set, private keys are sealed with the passphrase in this file (Argon2id)",
        example="/etc/peerd/passphrase",
    )
    certificate_days: int = key(
        30, doc="lifetime of each static key certificate, days", check=_between(1, 400)
    )
    rotate_before_days: int = key(
        7,
        doc="rotate the static key when its certificate has fewer days left",
        check=_between(0, 399),
    )
    overlap_hours: float = key(
        24,
        doc="sessions on a peer's superseded key may finish within this many hours",
        check=_between(0, 24 * 30),
    )

    @property
    def overlap_seconds(self) -> float:
        return self.overlap_hours * 3600.0


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    psk_file: Path | None = key(
        doc="a long-term network PSK (32 random bytes) mixed into every handshake",
        example="/etc/peerd/network.psk",
    )
    authority_key: str | None = key(
        doc="the network authority's public key: its members are trusted without pairing",
        check=_authority,
        example="peerd-authority-1-...",
    )

    @property
    def authority_public(self) -> bytes | None:
        return None if self.authority_key is None else parse_authority_key(self.authority_key)


@dataclass(frozen=True, slots=True)
class ReceiveConfig:
    max_file_size: int = key(100 * 1024**3, doc="largest file accepted from a peer", kind="size")
    free_space_margin: int = key(
        1024**3, doc="refuse a file that would leave less free space than this", kind="size"
    )
    idle_timeout: float = key(
        6 * 3600.0,
        doc="give up a transfer whose peer (its sender, or one receiver) has sent nothing for"
        " this long, seconds (frees the slot, the reserved space and the content key)",
        check=_between(1, 30 * 24 * 3600),
    )
    deltas: bool = key(
        True,
        doc="deltas (both directions): send a peer only what it lacks of files it received from"
        " this node, and reuse chunks of files received from the same sender",
    )
    direct_writes: bool = key(
        True,
        doc="write received chunks past the page cache (O_DIRECT), each held in memory until"
        " the next fdatasync; off, or where the file system refuses it: through the page cache",
    )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Resource limits of the daemon: every queue and table it keeps is bounded by one."""

    outbox_messages_per_peer: int = key(
        10_000,
        doc="messages waiting for one peer (beyond: `msg send` fails with 'outbox full')",
        check=_between(1, 10_000_000),
    )
    outbox_size: int = key(
        256 * 1024**2, doc="bytes of messages waiting for all peers together", kind="size"
    )
    inbox_size: int = key(
        256 * 1024**2,
        doc="bytes of received messages not yet read (beyond: peers wait, nothing is lost)",
        kind="size",
    )
    message_ttl_days: float = key(
        7.0, doc="default time to live of an undelivered message, days", check=_between(0.001, 365)
    )
    handshakes_per_second: float = key(
        2000.0, doc="handshakes answered per second, all peers together", check=_between(1, 1e6)
    )
    handshakes_per_second_per_peer: float = key(
        20.0, doc="handshakes answered per second claiming one peer", check=_between(0.1, 1e6)
    )
    half_open_handshakes: int = key(
        1024,
        doc="handshakes waiting for their third message (the oldest is dropped beyond)",
        check=_between(16, 1_000_000),
    )
    active_sends: int = key(64, doc="transfers being sent at once", check=_between(1, 10_000))
    active_receives: int = key(
        64,
        doc="transfers being received at once (more are refused: 'busy')",
        check=_between(1, 10_000),
    )
    held_chunks_memory: int = key(
        64 * 1024**2,
        doc="memory that received chunks held for O_DIRECT writes may take, all transfers"
        " together (up to 32 chunks each; beyond, chunks are written through the page cache)",
        kind="size",
    )


def _listen(value: str) -> str:
    """host:port (IPv6 in brackets) for the metrics endpoint."""
    parts = urlsplit(f"//{value}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r}: bad port") from exc
    if not parts.hostname or port is None or port == 0 or parts.username or parts.path:
        raise ValueError(f"{value!r}: must be host:port, e.g. '127.0.0.1:9464' or '[::1]:9464'")
    return value


def _log_format(value: str) -> str:
    if value not in ("auto", "text", "json", "journald"):
        raise ValueError(f"{value!r}: must be 'auto', 'text', 'json' or 'journald'")
    return value


def _log_level(value: str) -> str:
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{value!r}: must be 'debug', 'info', 'warning' or 'error'")
    return value


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str | None = key(
        doc="serve Prometheus metrics over HTTP at http://<listen>/metrics (off unless set)",
        check=_listen,
        example="127.0.0.1:9464",
    )
    per_peer: bool = key(
        False, doc="also export series labelled by peer id (one set per known peer)"
    )

    @property
    def host(self) -> str:
        return urlsplit(f"//{self.listen}").hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(f"//{self.listen}").port or 9464


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = key(
        "auto",
        doc="text (key=value), json (one object a line), journald (native fields), or auto"
        " (journald when systemd's journal reads stderr, else text)",
        check=_log_format,
    )
    level: str = key("info", doc="debug, info, warning or error", check=_log_level)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None = None
    node: NodeConfig = field(default_factory=NodeConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    receive: ReceiveConfig = field(default_factory=ReceiveConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: Final[dict[str, type[Any]]] = {
    f.name: f.type if isinstance(f.type, type) else globals()[f.type]
    for f in dataclasses.fields(Config)
    if f.name != "path"
}


# -- reading ----------------------------------------------------------------------------------


def _field_types(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _read_value(where: str, kind: str, value: Any, base: Path) -> Any:
    if kind == "size":
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a path (a non-empty string)")
        if "\0" in value:
            raise ConfigError(f"{where}: a path cannot contain NUL")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of strings")
        return tuple(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer")
        return value
    if kind == "float":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{where}: must be a number")
        return float(value)
    raise AssertionError(f"unknown config kind {kind}")


def _kind_of(f: dataclasses.Field[Any], hint: Any) -> str:
    if f.metadata.get("kind"):
        return str(f.metadata["kind"])
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {Path: "path", str: "str", bool: "bool", int: "int", float: "float"}[base]


def _read_section(
    cls: type[Any], name: str, table: Mapping[str, Any], origin: str, base: Path
) -> Any:
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for k, raw in table.items():
        f = fields.get(k)
        if f is None:
            close = difflib.get_close_matches(k, list(fields), n=1)
            raise ConfigError(
                f"{origin}: unknown key [{name}] {k}",
                hint=f"did you mean {close[0]!r}?" if close else "see `peerd init` for the keys",
            )
        where = f"{origin}: [{name}] {k}"
        value = _read_value(where, _kind_of(f, hints[k]), raw, base)
        check = f.metadata.get("check")
        if check is not None:
            try:
                value = check(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        values[k] = value
    return cls(**values)


def _derive(config: Config) -> Config:
    node, keys = config.node, config.keys
    node = dataclasses.replace(
        node,
        socket=node.socket or node.runtime_dir / SOCKET_NAME,
        inbox_dir=node.inbox_dir or node.state_dir / "inbox",
        store=node.store or node.state_dir / "peerd.db",
    )
    keys = dataclasses.replace(keys, dir=keys.dir or node.state_dir / "keys")
    return dataclasses.replace(config, node=node, keys=keys)


def _validate(config: Config, origin: str) -> None:
    sock = os.fsencode(config.node.socket)
    if len(sock) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{origin}: [node] socket: the path {config.node.socket} is {len(sock)} bytes, more "
            f"than a Unix socket allows ({MAX_SOCKET_PATH})",
            hint="choose a shorter runtime_dir or socket path",
        )
    keys = config.keys
    if keys.rotate_before_days >= keys.certificate_days:
        raise ConfigError(
            f"{origin}: [keys] rotate_before_days ({keys.rotate_before_days}) must be less than "
            f"certificate_days ({keys.certificate_days})"
        )
    broker = config.broker
    if (broker.cert_file is None) != (broker.key_file is None):
        raise ConfigError(f"{origin}: [broker] cert_file and key_file go together")
    if not broker.tls and (broker.ca_file or broker.cert_file):
        raise ConfigError(
            f"{origin}: [broker] ca_file / cert_file need an mqtts:// or wss:// url",
            hint="use mqtts://host:8883 or wss://host:443/mqtt for TLS",
        )


def config_from_mapping(data: Mapping[str, Any], *, origin: str, base: Path) -> Config:
    """A validated `Config` from parsed TOML; `origin` names the source in error messages."""
    sections: dict[str, Any] = {}
    for name, table in data.items():
        cls = SECTIONS.get(name)
        if cls is None:
            close = difflib.get_close_matches(name, list(SECTIONS), n=1)
            raise ConfigError(
                f"{origin}: unknown section [{name}]",
                hint=f"did you mean [{close[0]}]?" if close else f"sections: {', '.join(SECTIONS)}",
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: [{name}] must be a table")
        sections[name] = _read_section(cls, name, table, origin, base)
    broker = data.get("broker")
    if isinstance(broker, dict) and "url" in broker and "urls" in broker:
        raise ConfigError(
            f"{origin}: [broker] has both url and urls", hint="keep one: urls = [...] for several"
        )
    config = _derive(Config(**sections))
    _validate(config, origin)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the configuration file at `path`."""
    p = Path(path).expanduser().absolute()
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration file at {p}",
            hint="run `peerd init` first, or pass --config / set PEERD_CONFIG",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_SIZE} bytes; not a peerd configuration")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    config = config_from_mapping(data, origin=str(p), base=p.parent)
    return dataclasses.replace(config, path=p)


def default_config(
    state_dir: str | os.PathLike[str] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """The configuration `peerd init` writes: system paths, or everything under `state_dir`.

    `settings` sets keys by section (e.g. {"node": {"name": "a"}}), validated like the file;
    None values are left at their defaults.
    """
    data: dict[str, dict[str, Any]] = {}
    for section, table in (settings or {}).items():
        data[section] = {k: v for k, v in table.items() if v is not None}
    if state_dir is not None:
        root = Path(state_dir).expanduser().absolute()
        data.setdefault("node", {}).update(state_dir=str(root), runtime_dir=str(root / "run"))
    return config_from_mapping(data, origin="peerd init", base=Path.cwd())


# -- writing (peerd init) ---------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # JSON's escapes (\", \\, \n, \uXXXX) are all valid in a TOML basic string.
    return json.dumps(str(value), ensure_ascii=False)


def render_config(config: Config) -> str:
    """The configuration as a commented TOML file, every key shown; optional ones commented."""
    lines = [
        "# peerd configuration. Every key is optional; the values shown commented out are the",
        "# defaults. Relative paths are relative to this file's directory.",
        "",
    ]
    for name in SECTIONS:
        section = getattr(config, name)
        fields = dataclasses.fields(section)
        lines.append(f"[{name}]")
        for f in fields:
            value = getattr(section, f.name)
            lines.append(f"# {f.metadata['doc']}")
            kind = f.metadata.get("kind")
            if value is None:
                lines.append(f"# {f.name} = {_toml(f.metadata['example'] or '')}")
            elif name == "broker" and f.name == "url" and section.urls:
                lines.append(f"# {f.name} = {_toml(value)}")  # urls is in force
            elif f.metadata["derived"] and f.name != "socket":
                # Left to follow state_dir; the client reads `socket`, so that one is explicit.
                lines.append(f"# {f.name} = {_toml(value)}")
            elif kind == "size":
                lines.append(f"{f.name} = {_toml(format_size(value))}")
            else:
                lines.append(f"{f.name} = {_toml(value)}")
        lines.append("")
    return "\n".join(lines)


__all__ = [
    "CONFIG_NAME",
    "DEFAULT_CONFIG_PATH",
    "SOCKET_NAME",
    "BrokerConfig",
    "Config",
    "ControlConfig",
    "KeysConfig",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "NetworkConfig",
    "NodeConfig",
    "ReceiveConfig",
    "config_from_mapping",
    "default_config",
    "format_size",
    "load_config",
    "parse_size",
    "render_config",
]
