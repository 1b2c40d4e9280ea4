"""The log encodings (peerd/logs.py): logfmt and JSON one line per record, and native journal
entries sent to a real Unix datagram socket, decoded here by the journal protocol's rules."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.logs import (
    JournaldHandler,
    JsonFormatter,
    TextFormatter,
    journal_field_name,
    log_event,
    setup_logging,
    under_journald,
)


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def _text_logger(formatter: logging.Formatter, name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    return _logger(handler, name), out


def test_text_is_one_logfmt_line_per_event_with_stable_keys() -> None:
    log, out = _text_logger(TextFormatter(), "test.logs.text")
    log_event(log, "transfer.done", peer="abc", bytes=1234, name='a "model"\nfile', gone=None)
    log.warning("plain %s", "text")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = lines[0]
    assert first.startswith("ts=")
    assert " level=info logger=test.logs.text event=transfer.done peer=abc bytes=1234 " in first
    assert 'name="a \\"model\\"\\nfile"' in first  # quoted: the line never breaks
    assert "gone" not in first  # absent values are left out
    assert lines[1].endswith('level=warning logger=test.logs.text msg="plain text"')


def test_a_traceback_stays_on_its_line_and_bytes_show_only_their_length() -> None:
    log, out = _text_logger(TextFormatter(stamp=False), "test.logs.exc")
    try:
        raise ValueError("boom")
    except ValueError:
        log_event(log, "daemon.task_failed", logging.ERROR, key=b"\x01" * 32, exc_info=True)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("level=error logger=test.logs.exc event=daemon.task_failed")
    assert 'key="<32 bytes>"' in line
    assert 'error="ValueError: boom"' in line
    assert "Traceback" in line
    assert "0101" not in line


def test_json_is_one_object_per_line() -> None:
    log, out = _text_logger(JsonFormatter(), "test.logs.json")
    log_event(log, "session.up", peer="p1", protocol="Noise_XX", count=3, peers=["a", "b"])
    log.info("not an event")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "session.up"
    assert first["peer"] == "p1"
    assert first["count"] == 3
    assert first["peers"] == ["a", "b"]
    assert first["level"] == "info"
    assert first["ts"].endswith("Z")
    assert second["msg"] == "not an event"
    assert "event" not in second


def _decode_journal(data: bytes) -> dict[str, str]:
    """The native journal protocol, as systemd-journald reads it."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def test_journald_entries_carry_priority_identifier_and_each_field(
    journal: tuple[socket.socket, str],
) -> None:
    sock, path = journal
    handler = JournaldHandler(path)
    log = _logger(handler, "test.logs.journal")
    try:
        log_event(log, "broker.lost", logging.WARNING, url="mqtt://b:1883", error="refused")
        try:
            raise RuntimeError("deep\nproblem")
        except RuntimeError:
            log.exception("plain failure")
    finally:
        handler.close()
    first = _decode_journal(sock.recv(65536))
    assert first["PRIORITY"] == "4"
    assert first["SYSLOG_IDENTIFIER"] == "peerd"
    assert first["PEERD_EVENT"] == "broker.lost"
    assert first["PEERD_URL"] == "mqtt://b:1883"
    assert first["PEERD_ERROR"] == "refused"
    assert first["PEERD_LOGGER"] == "test.logs.journal"
    assert first["MESSAGE"] == (
        "level=warning logger=test.logs.journal event=broker.lost url=mqtt://b:1883 error=refused"
    )
    assert first["CODE_FUNC"] == "test_journald_entries_carry_priority_identifier_and_each_field"
    second = _decode_journal(sock.recv(65536))
    assert second["PRIORITY"] == "3"
    assert "\n" not in second["MESSAGE"]
    assert "RuntimeError: deep" in second["PEERD_EXC"]  # multi-line: the binary form
    assert "Traceback" in second["PEERD_EXC"]


def test_journald_falls_back_to_the_stream_without_a_journal(tmp_path: Path) -> None:
    out = io.StringIO()
    handler = JournaldHandler(str(tmp_path / "no-journal.sock"), fallback=out)
    log = _logger(handler, "test.logs.fallback")
    try:
        log_event(log, "daemon.start", version="1")
    finally:
        handler.close()
    assert out.getvalue() == "level=info logger=test.logs.fallback event=daemon.start version=1\n"


def test_journal_field_names_are_what_journald_accepts() -> None:
    assert journal_field_name("bytes") == "PEERD_BYTES"
    assert journal_field_name("restart-needed") == "PEERD_RESTART_NEEDED"
    assert journal_field_name("_x") == "PEERD_X"
    assert len(journal_field_name("k" * 100)) == 64


def test_auto_picks_journald_only_when_stderr_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: tuple[socket.socket, str]
) -> None:
    sock, path = journal
    with (tmp_path / "stderr").open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not under_journald(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journald(stream)
        monkeypatch.setenv("PEERD_JOURNAL_SOCKET", path)
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        try:
            assert setup_logging("info", "auto", stream) == "journald"
            log_event(logging.getLogger("peerd.test"), "config.loaded", path="/etc/peerd.toml")
            entry = _decode_journal(sock.recv(65536))
            assert entry["PEERD_EVENT"] == "config.loaded"
            assert setup_logging("info", "text", stream) == "text"
        finally:
            for h in root.handlers:
                h.close()
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
