"""Fuzzing what reaches the daemon locally: request lines on the control socket (from any
program a permitted user runs) and the configuration file.

The control server runs for real on a Unix socket in a thread of its own; each example opens a
connection, writes fuzzed lines, then a valid request, and reads until that request is answered.
Every line the server writes must be a JSON-RPC 2.0 response; the server must answer the valid
request after whatever came before it (fewer bad lines than the garbage limit), and it must
still serve a fresh connection at the end.

Configuration: `load_config` on fuzzed TOML text and `config_from_mapping` on fuzzed tables may
only raise `ConfigError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd import locate
from peerd.config import SECTIONS, config_from_mapping, load_config
from peerd.control import MAX_GARBAGE, Connection, ControlServer, decode_line
from peerd.errors import ConfigError
from tests.fuzz.corpus import fuzz_settings, inputs

# Socket round trips on a loaded CI machine; hangs are caught by the timeout.
FUZZ = fuzz_settings(deadline=None)


class ServerThread:
    """A real ControlServer on its own event loop in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path)

        @self.server.method("v1.echo")
        async def _echo(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            return params

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def stats(self) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            return self.server.stats()

        return asyncio.run_coroutine_threadsafe(get(), self.loop).result(10)


@pytest.fixture(scope="module")
def control() -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory(prefix="pf-") as d, ServerThread(d + "/c.sock") as srv:
        yield srv


def _exchange(path: str, lines: list[bytes], final_id: str) -> list[Any]:
    """Write `lines` and a final request; read replies until the final one is answered."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    try:
        sock.connect(path)
        final = {"jsonrpc": "2.0", "id": final_id, "method": "v1.echo", "params": {"ok": 1}}
        sock.sendall(b"".join(line + b"\n" for line in lines) + json.dumps(final).encode() + b"\n")
        replies: list[Any] = []
        buf = b""
        while True:
            chunk = sock.recv(1 << 16)
            assert chunk, f"the server hung up before answering; got {replies}"
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                reply = json.loads(raw)
                replies.append(reply)
                if isinstance(reply, dict) and reply.get("id") == final_id:
                    return replies
    finally:
        sock.close()


def _is_response(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_is_response(v) for v in value)
    return (
        isinstance(value, dict)
        and value.get("jsonrpc") == "2.0"
        and "id" in value
        and (("result" in value) != ("error" in value))
    )


_counter = iter(range(1 << 62))

# Lines of JSON built from scratch, to reach the request checks past the JSON parser.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
        "id": st.integers() | st.text(max_size=8) | st.none() | st.booleans(),
        "method": st.sampled_from(["v1.echo", "v1.hello", "v1.subscribe", "v1.unsubscribe", "x"])
        | st.text(max_size=12),
        "params": _json_values,
        "extra": _json_values,
    },
)
_lines = st.one_of(
    inputs("control_line", max_random=256).map(lambda b: b.replace(b"\n", b" ")),
    _requests.map(lambda r: json.dumps(r).encode()),
    st.lists(_requests, min_size=0, max_size=3).map(lambda r: json.dumps(r).encode()),
)


@FUZZ
@given(st.lists(_lines, max_size=MAX_GARBAGE // 2))
def test_control_request_lines(control: ServerThread, lines: list[bytes]) -> None:
    final_id = f"final-{next(_counter)}"
    replies = _exchange(control.path, lines, final_id)
    assert all(_is_response(r) for r in replies), replies
    assert replies[-1] == {"jsonrpc": "2.0", "id": final_id, "result": {"ok": 1}}


def test_control_server_survives_the_fuzzing(control: ServerThread) -> None:
    replies = _exchange(control.path, [b"\xff\xfe", b"{", b"[]", b"{}"], "after")
    assert replies[-1]["result"] == {"ok": 1}
    stats = control.stats()
    assert stats["errors"].get("-32700", 0) >= 1  # parse errors were counted


@FUZZ
@given(inputs("control_line", max_random=256))
def test_decode_line_raises_only_value_error(line: bytes) -> None:
    with contextlib.suppress(ValueError):
        decode_line(line)


# -- configuration ------------------------------------------------------------------------------


@FUZZ
@given(inputs("config", max_random=512))
def test_config_file(text: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="pf-") as d:
        path = Path(d) / "peerd.toml"
        path.write_bytes(text)
        # The CLI's cheap reading of the same file (peerd.locate): never an error, and where
        # both have an answer, the same socket.
        found = locate.socket_from_config(path)
        with contextlib.suppress(ConfigError):
            config = load_config(path)
            assert found is None or found == str(config.node.socket)


_keys = {
    name: [f.name for f in cls.__dataclass_fields__.values()] for name, cls in SECTIONS.items()
}
_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["10GiB", "1.5GB", "-1", "mqtt://h:1", "mqtts://h", "peerd", "/x", ""])
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
)


@st.composite
def _tables(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from([*_keys, "nodes", "x"]), max_size=4)):
        names = _keys.get(section, ["name"])
        out[section] = draw(
            st.dictionaries(st.sampled_from([*names, "unknown"]), _values, max_size=4)
            | _values  # a section that is not a table
        )
    return out


@FUZZ
@given(_tables())
def test_config_tables(data: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        config_from_mapping(data, origin="fuzz", base=Path("/tmp"))
