"""The configuration file: defaults, layout under a state dir, validation naming key and problem."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd import locate
from peerd.config import (
    SECTIONS,
    Config,
    NodeConfig,
    default_config,
    format_size,
    load_config,
    parse_size,
    render_config,
)
from peerd.errors import ConfigError
from protocol.identity import format_authority_key


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peerd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_empty_file_gives_working_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    assert config.path == tmp_path / "peerd.toml"
    assert config.node.state_dir == Path("/var/lib/peerd")
    assert config.node.runtime_dir == Path("/run/peerd")
    assert config.node.socket == Path("/run/peerd/peerd.sock")
    assert config.node.inbox_dir == Path("/var/lib/peerd/inbox")
    assert config.node.store == Path("/var/lib/peerd/peerd.db")
    assert config.keys.dir == Path("/var/lib/peerd/keys")
    assert config.node.network == "peerd"
    assert config.broker.url == "mqtt://127.0.0.1:1883"
    assert (config.broker.host, config.broker.port, config.broker.tls) == ("127.0.0.1", 1883, False)
    assert config.keys.overlap_seconds == 24 * 3600
    assert config.network.authority_public is None


def test_derived_paths_follow_state_and_runtime_dirs(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[node]\nstate_dir = "state"\nruntime_dir = "/tmp/r"\n'))
    assert config.node.state_dir == tmp_path / "state"  # relative to the file's directory
    assert config.node.store == tmp_path / "state" / "peerd.db"
    assert config.keys.dir == tmp_path / "state" / "keys"
    assert config.node.socket == Path("/tmp/r/peerd.sock")


def test_every_path_is_overridable(tmp_path: Path) -> None:
    text = """
[node]
socket = "/s/x.sock"
inbox_dir = "/i"
store = "/d/t.db"
[keys]
dir = "/k"
"""
    config = load_config(_write(tmp_path, text))
    assert config.node.socket == Path("/s/x.sock")
    assert config.node.inbox_dir == Path("/i")
    assert config.node.store == Path("/d/t.db")
    assert config.keys.dir == Path("/k")


def test_state_dir_layout_puts_everything_under_it(tmp_path: Path) -> None:
    config = default_config(tmp_path / "n1", {"node": {"name": "alpha", "network": "lab"}})
    root = tmp_path / "n1"
    for path in (
        config.node.socket,
        config.node.store,
        config.keys.dir,
        config.node.inbox_dir,
        config.node.runtime_dir,
    ):
        assert root in path.parents
    assert config.node.name == "alpha"


def test_render_then_load_is_the_same_config(tmp_path: Path) -> None:
    authority = format_authority_key(bytes(range(32)))
    config = default_config(
        tmp_path / "n",
        {
            "node": {"name": 'quote " and \\ back', "network": "lab"},
            "broker": {"url": "mqtts://broker.example:8883", "username": "u"},
            "network": {"authority_key": authority},
            "receive": {"max_file_size": "3GiB"},
            "keys": {"overlap_hours": 1.5},
        },
    )
    text = render_config(config)
    assert text.count("#") > 20  # a commented file
    loaded = load_config(_write(tmp_path, text))
    assert loaded.node == config.node
    assert loaded.broker == config.broker
    assert loaded.keys == config.keys
    assert loaded.network == config.network
    assert loaded.receive == config.receive
    assert loaded.network.authority_public == bytes(range(32))
    assert loaded.broker.port == 8883


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nnmae = 'x'\n", "unknown key [node] nmae"),
        ("[nodes]\n", "unknown section [nodes]"),
        ("node = 3\n", "[node] must be a table"),
        ("[node]\nnetwork = 'Lab Net'\n", "[node] network"),
        ("[node]\nstate_dir = 5\n", "[node] state_dir: must be a path"),
        ("[node]\nname = ''\n", "[node] name"),
        ("[broker]\nurl = 'http://x'\n", "[broker] url"),
        ("[broker]\nurl = 'mqtt://user:pw@x'\n", "[broker] url"),
        ("[broker]\nurl = 'mqtt://x:99999'\n", "bad port"),
        ("[broker]\nkeepalive = 'often'\n", "[broker] keepalive: must be an integer"),
        ("[broker]\nkeepalive = true\n", "[broker] keepalive: must be an integer"),
        ("[broker]\nkeepalive = 1\n", "[broker] keepalive: must be between"),
        ("[broker]\nca_file = '/ca.pem'\n", "need an mqtts:// or wss:// url"),
        ("[broker]\nurl = 'mqtts://x'\ncert_file = '/c'\n", "go together"),
        ("[keys]\ncertificate_days = 0\n", "[keys] certificate_days"),
        ("[keys]\ncertificate_days = 5\nrotate_before_days = 5\n", "rotate_before_days"),
        ("[keys]\noverlap_hours = -1\n", "[keys] overlap_hours"),
        ("[network]\nauthority_key = 'abc'\n", "[network] authority_key"),
        ("[receive]\nmax_file_size = '10 parsecs'\n", "[receive] max_file_size"),
        ("[receive]\nmax_file_size = -1\n", "[receive] max_file_size"),
        ("[control]\ngroup = 'bad group'\n", "[control] group"),
        ("[node]\nsocket = '/" + "x" * 120 + "'\n", "more than a Unix socket allows"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value) or "not valid TOML" not in message


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "[keys]\ncertificate_day = 3\n"))
    assert "certificate_days" in info.value.hint


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert "peerd init" in info.value.hint
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(tmp_path / "bin.toml")
    with pytest.raises(ConfigError):
        load_config(tmp_path)  # a directory


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("10GiB", 10 * 1024**3),
        ("10 gib", 10 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * 1024**2),
        ("1KB", 1000),
        ("2TiB", 2 * 1024**4),
        ("123456789123456789", 123456789123456789),
    ],
)
def test_sizes(text: int | str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "GiB", "1.2.3GB", "-5", "5 GiBs", True, 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is checked through ConfigError
        parse_size(bad)  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(10 * 1024**3) == "10GiB"
    assert format_size(1000) == "1000"
    assert parse_size(format_size(3 * 1024**2)) == 3 * 1024**2


def test_config_dataclasses_are_frozen() -> None:
    config = default_config()
    with pytest.raises(AttributeError):
        config.node = config.node  # type: ignore[misc]
    assert isinstance(config, Config)


# -- peerd.locate: the CLI's cheap way to the socket -------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        '[node]\nsocket = "/srv/peerd/ctl.sock"\n',
        '[node]\nruntime_dir = "/run/peerd-test"\n',
        '[node]\nruntime_dir = "run"\n',
        '[node]\nsocket = "sock/ctl"\nruntime_dir = "/elsewhere"\n',
        '[node]\nsocket = "~/peerd.sock"\n',
        '[node]\nstate_dir = "/var/lib/x"\n[broker]\nurl = "mqtt://h:1883"\n',
    ],
)
def test_locate_finds_the_socket_load_config_names(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    assert locate.socket_from_config(path) == str(load_config(path).node.socket)


def test_locate_leaves_what_it_cannot_read_to_load_config(tmp_path: Path) -> None:
    for text, problem in [
        ("[node\nbroken", "not valid TOML"),
        ("[node]\nsockett = '/x'\n", "unknown key"),
        ("[nodes]\nsocket = '/x'\n", "unknown section"),
        ("[node]\nsocket = 3\n", "must be a path"),
    ]:
        path = _write(tmp_path, text)
        assert locate.socket_from_config(path) is None
        with pytest.raises(ConfigError, match=problem):
            load_config(path)


def test_locate_reads_what_peerd_init_writes_without_tomllib(tmp_path: Path) -> None:
    # The CLI's start-up relies on it (importing tomllib costs more than a bare interpreter's
    # start): a line `render_config` writes beyond `_plain_toml`'s subset would pass every
    # other test, only slower.
    for settings_ in (
        None,
        {"node": {"name": 'quote " and \\ back', "network": "lab"}},
        {"broker": {"urls": ["mqtt://a.example:1883", "mqtt://b.example:1883"]}},
        {"keys": {"overlap_hours": 1.5}, "metrics": {"listen": "127.0.0.1:9464"}},
    ):
        text = render_config(default_config(tmp_path / "n", settings_))
        if "\\" not in text:  # an escape in a string is tomllib's to read, rightly
            assert locate._plain_toml(text) is not None, text
        path = _write(tmp_path, text)
        assert locate.socket_from_config(path) == str(load_config(path).node.socket)


def _tables(data: dict[str, Any]) -> dict[str, Any]:
    """What `_plain_toml` keeps of a file: its tables and their keys, with string values as
    they are and any other value as None."""
    return {
        name: {k: v if isinstance(v, str) else None for k, v in table.items()}
        if isinstance(table, dict)
        else table  # a key outside a table, or an array of tables: never a plain file
        for name, table in data.items()
    }


_LINES = st.sampled_from(
    [
        "",
        "# a comment",
        "  # indented \t comment",
        "[node]",
        "[ broker ]",
        "[node.x]",
        "[[node]]",
        "[1]",
        "[]",
        'socket = "/run/x.sock"',
        "socket = '/lit/x'",
        'name = ""',
        'socket = "a\\nb"',
        "runtime_dir = 'run'  # relative",
        "a = 1",
        "a = -0",
        "b = 1_000",
        "b = 01",
        "b = 1__0",
        "c = 2.5",
        "c = 1e3",
        "c = .5",
        "d = true",
        "d = True",
        'e = ["x", 1, true,]',
        "e = [,]",
        "e = [",
        "e = []",
        'f = """',
        "g.h = 1",
        '"q" = 1',
        "k=1#x",
        'k = "x"y',
        "= 1",
        "k =",
        "k = 1 2",
        "k = 'it''s'",
        'k = "\x01"',
        "# bad \x01 control",
        "k = 1\r",
        "k = \ufeff1",
        "k = 'caf\u00e9'",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINES, max_size=8), st.sampled_from(["\n", "\r\n"]))
def test_locate_reads_a_plain_file_as_tomllib_does(lines: list[str], newline: str) -> None:
    text = newline.join(lines)
    plain = locate._plain_toml(text)
    try:
        expected = _tables(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        assert plain is None  # never an answer for a file tomllib refuses
        return
    if plain is not None:  # None: left to tomllib, always allowed
        assert _tables(plain) == expected


_PATHS = st.text(alphabet="/.~ab", max_size=12)


@settings(max_examples=500, deadline=None)
@given(_PATHS, _PATHS)
def test_locate_spells_paths_as_pathlib_does(a: str, b: str) -> None:
    clean_a, clean_b = locate._clean(a), locate._clean(b)
    assert clean_a == str(Path(a))
    assert locate._join(clean_a, clean_b) == str(Path(a) / b)
    absolute = locate._clean("/" + a)
    assert locate._parent(absolute) == str(Path("/" + a).parent)
    try:
        expected = str(Path(a).expanduser())
    except RuntimeError:
        with pytest.raises(RuntimeError):
            locate._expanduser(clean_a)
    else:
        assert locate._expanduser(clean_a) == expected


@pytest.mark.parametrize(
    ("socket", "runtime_dir"),
    [
        ("//srv//x/./ctl.sock", None),
        ("./a/../b.sock", None),
        (None, "run/./x//"),
        (None, "~/run"),
        ("~", None),
        (None, "."),
    ],
)
def test_locate_spells_the_socket_as_load_config_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, socket: str | None, runtime_dir: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    lines = ["[node]"]
    lines += [f"socket = '{socket}'"] if socket else []
    lines += [f"runtime_dir = '{runtime_dir}'"] if runtime_dir else []
    _write(tmp_path, "\n".join(lines) + "\n")
    for name in ("peerd.toml", "./peerd.toml", str(tmp_path) + "//./peerd.toml"):
        expected = str(load_config(name).node.socket)
        assert locate.socket_from_config(name) == expected
        assert locate.socket_from_config(locate.config_file_name(name)) == expected


def test_locate_knows_only_names_the_configuration_has() -> None:
    # Equal, not just included: a section added to the configuration without this table would
    # send every CLI command through the slow path (load_config), silently.
    assert set(SECTIONS) == locate.KNOWN_SECTIONS
    assert {f.name for f in dataclasses.fields(NodeConfig)} == locate.NODE_KEYS
    assert NodeConfig().runtime_dir == Path(locate.SYSTEM_RUNTIME_DIR)


def test_the_config_file_is_found_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEERD_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert locate.config_file() == Path(locate.SYSTEM_CONFIG)
    user = tmp_path / "xdg" / "peerd" / "peerd.toml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert locate.config_file() == user
    monkeypatch.setenv("PEERD_CONFIG", str(tmp_path / "env.toml"))
    assert locate.config_file() == tmp_path / "env.toml"
    assert locate.config_file(str(tmp_path / "given.toml")) == tmp_path / "given.toml"
