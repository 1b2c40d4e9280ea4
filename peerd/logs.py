"""Log lines an operator can parse: one line per event, stable keys, three encodings.

An event is logged with `log_event(logger, "transfer.done", peer=..., bytes=...)`: its name
(`event=`) and fields are kept on the record, so each handler writes them its way:

- **text** (logfmt): `ts=2026-12-04T18:20:57.123Z level=info logger=peerd event=transfer.done
  peer=... bytes=...`; values with spaces or quotes are JSON-quoted, so a line never breaks.
- **json**: one object per line, the same keys.
- **journald**: native journal entries sent to the journal's socket, with `MESSAGE` (the text
  line without the time, which the journal stamps), `PRIORITY`, `SYSLOG_IDENTIFIER=peerd` and
  each field as `PEERD_<KEY>` (`journalctl PEERD_EVENT=transfer.done`). Chosen by `auto` when
  systemd connected stderr to the journal (`JOURNAL_STREAM` names stderr's device and inode).

Lines logged the plain way (`log.info("...")`, other libraries) carry `msg="..."` instead of
fields. A traceback goes into one field (`exc=`), never onto lines of its own.

Secrets never reach a field as bytes: a `bytes` value is written as its length only. Which
values may be logged at all is the caller's duty; tests/e2e/test_operations.py greps every
daemon and CLI log of the end-to-end flows for each secret they used.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_SOCKET_ENV = "PEERD_JOURNAL_SOCKET"  # another journal socket (containers, tests)
MAX_FIELD = 16 * 1024  # a journal field's value, and a logged value, is cut beyond this
FORMATS = ("auto", "text", "json", "journald")

# syslog priorities (sd-journal's PRIORITY=)
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class Event:
    """The message of an event record: renders as logfmt for handlers that only read
    `getMessage()` (pytest's caplog, a plain basicConfig)."""

    __slots__ = ("fields", "name")

    def __init__(self, name: str, fields: Mapping[str, Any]) -> None:
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        return logfmt({"event": self.name, **self.fields})


def log_event(
    logger: logging.Logger,
    event: str,
    level: int = logging.INFO,
    /,
    *,
    exc_info: Any = None,
    **fields: Any,
) -> None:
    """Log the event `event` (dotted: `transfer.done`) with `fields` at `level`."""
    if logger.isEnabledFor(level):
        logger.log(level, Event(event, fields), exc_info=exc_info, stacklevel=2)


# -- values -------------------------------------------------------------------------------------


def _value(v: Any) -> Any:
    """A field's value as JSON can carry it; bytes never (only their length)."""
    if v is None or isinstance(v, bool | int | float):
        return v
    if isinstance(v, bytes | bytearray | memoryview):
        return f"<{len(v)} bytes>"
    if isinstance(v, list | tuple | set | frozenset):
        return [_value(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _value(x) for k, x in v.items()}
    text = str(v)
    return text if len(text) <= MAX_FIELD else text[:MAX_FIELD] + "..."


def _logfmt_value(v: Any) -> str:
    v = _value(v)
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        v = ",".join(str(x) for x in v)
    text = json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else str(v)
    if text and all(c.isprintable() and c not in ' ="\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in k) or "_"


def logfmt(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{_key(k)}={_logfmt_value(v)}" for k, v in fields.items())


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """level, logger, then event and its fields (or msg), then exc: what every encoding writes."""
    out: dict[str, Any] = {
        "level": record.levelname.lower(),
        "logger": record.name,
    }
    msg = record.msg
    if isinstance(msg, Event):
        out["event"] = msg.name
        for k, v in msg.fields.items():
            if v is not None:  # an absent value is left out, not written empty
                out[k if k not in out else f"field_{k}"] = v
    else:
        out["msg"] = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["exc"] = "".join(traceback.format_exception(exc)).rstrip()
    return out


def _timestamp(created: float) -> str:
    t = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """logfmt, one line per record; `stamp=False` under a journal that stamps time itself."""

    def __init__(self, *, stamp: bool = True) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        fields = record_fields(record)
        if self.stamp:
            fields = {"ts": _timestamp(record.created), **fields}
        return logfmt(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {"ts": _timestamp(record.created), **record_fields(record)}
        return json.dumps({k: _value(v) for k, v in fields.items()}, ensure_ascii=False)


# -- journald -----------------------------------------------------------------------------------


def journal_field_name(key: str) -> str:
    """A journal field name: A-Z, 0-9 and _, not starting with _ or a digit, at most 64."""
    name = "".join(c if c.isalnum() and c.isascii() else "_" for c in key.upper()).lstrip("_")
    return ("PEERD_" + name)[:64] if name else "PEERD_FIELD"


def journal_entry(fields: Mapping[str, str]) -> bytes:
    """The native journal protocol: `NAME=value\\n`, or for a value with a newline `NAME\\n`,
    its length as 64-bit little endian, the value, `\\n` (systemd.journal-fields, sd_journal)."""
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")[:MAX_FIELD]
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournaldHandler(logging.Handler):
    """Native journal entries over the journal's datagram socket. A send that fails (no
    journal, a full buffer) writes the text line to `fallback` instead: nothing is lost."""

    def __init__(
        self, path: str | None = None, *, identifier: str = "peerd", fallback: TextIO | None = None
    ) -> None:
        super().__init__()
        self.path = path or os.environ.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
        self.identifier = identifier
        self.fallback = fallback if fallback is not None else sys.stderr
        self.text = TextFormatter(stamp=False)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def entry(self, record: logging.LogRecord) -> bytes:
        fields = record_fields(record)
        text = {k: v for k, v in fields.items() if k != "exc"}
        out = {
            "MESSAGE": logfmt(text),
            "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        for k, v in fields.items():
            if k == "level":
                continue
            value = _value(v)
            if isinstance(value, list):
                value = ",".join(str(x) for x in value)
            elif isinstance(value, dict):
                value = json.dumps(value, separators=(",", ":"))
            out[journal_field_name(k)] = "" if value is None else str(value)
        return journal_entry(out)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.entry(record)
            try:
                self.sock.sendto(data, self.path)
            except OSError:
                self.fallback.write(self.text.format(record) + "\n")
                self.fallback.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the daemon
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def under_journald(stream: TextIO | None = None) -> bool:
    """systemd connected `stream` (stderr) to the journal: JOURNAL_STREAM is its dev:inode."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def choose_format(fmt: str, stream: TextIO | None = None) -> str:
    if fmt != "auto":
        return fmt
    return "journald" if under_journald(stream) else "text"


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> str:
    """Route the root logger to `stream` (stderr) in `fmt`; returns the format chosen."""
    stream = stream or sys.stderr
    chosen = choose_format(fmt, stream)
    handler: logging.Handler
    if chosen == "journald":
        handler = JournaldHandler(fallback=stream)
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(
            JsonFormatter() if chosen == "json" else TextFormatter(stamp=not under_journald(stream))
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper())
    root.setLevel(numeric)
    # aiosqlite logs every statement at DEBUG: that is its debugging, not ours.
    logging.getLogger("aiosqlite").setLevel(max(numeric, logging.INFO))
    return chosen


__all__ = [
    "FORMATS",
    "Event",
    "JournaldHandler",
    "JsonFormatter",
    "TextFormatter",
    "journal_entry",
    "journal_field_name",
    "log_event",
    "logfmt",
    "setup_logging",
    "under_journald",
]
