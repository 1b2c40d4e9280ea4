"""What an operator sees of real daemons (issue 16 items 2 and 3): the Prometheus endpoint
scraped during a real transfer, `peerd metrics`, and the logs of the whole end-to-end flow
searched for every secret it used."""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peerd.keystore import Keystore
from protocol.identity import InviteToken
from tests.support.broker import Broker, free_port
from tests.support.cluster import UNREACHABLE, Node, make_nodes, pair, wait_until
from tests.support.files import random_file, received_files, sha256

CHUNK = 256 * 1024


def _enable_metrics(node: Node, *, per_peer: bool = False) -> str:
    address = f"127.0.0.1:{free_port()}"
    conf = node.config.read_text().replace("[metrics]\n", f'[metrics]\nlisten = "{address}"\n', 1)
    if per_peer:
        conf = conf.replace("per_peer = false", "per_peer = true", 1)
    node.config.write_text(conf)
    return f"http://{address}/metrics"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return _samples(response.read().decode())


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


COUNTERS = (
    "peerd_transfer_bytes_sent_total",
    "peerd_transfer_bytes_received_total",
    "peerd_transfer_chunks_sent_total",
    "peerd_transfer_chunks_received_total",
    "peerd_broker_published_bytes_total",
    "peerd_broker_received_bytes_total",
)


@pytest.fixture
def watched(tmp_path: Path, broker: Broker) -> Iterator[tuple[Node, Node, str, str]]:
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    url_a = _enable_metrics(a, per_peer=True)
    url_b = _enable_metrics(b)
    a.start()
    b.start()
    try:
        pair(a, b)
        yield a, b, url_a, url_b
    finally:
        a.kill()
        b.kill()


def test_metrics_move_by_the_file_size_during_a_real_transfer(
    watched: tuple[Node, Node, str, str], tmp_path: Path
) -> None:
    a, b, url_a, url_b = watched
    size = 24 * CHUNK + 17
    src = random_file(tmp_path / "model.bin", size, seed=7)
    before_a, before_b = _scrape(url_a), _scrape(url_b)

    # Scrape both endpoints over and over while the transfer runs: every scrape parses, and no
    # counter ever goes backwards.
    scrapes: list[tuple[str, dict]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def scraper() -> None:
        try:
            while not stop.is_set():
                scrapes.append(("a", _scrape(url_a)))
                scrapes.append(("b", _scrape(url_b)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        result = a.json("send", str(src), "--to", b.peer_id, "--wait")
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert result["state"] == "verified"
    (got,) = received_files(b, a)
    assert sha256(got) == sha256(src)
    after_a = _scrape(url_a)
    after_b = wait_until(
        lambda: (
            s
            if _value(
                s := _scrape(url_b),
                "peerd_transfers_finished_total",
                direction="receive",
                state="verified",
            )
            == 1
            else None
        ),
        10,
        what="bob's receive counted",
    )

    chunks = -(-size // CHUNK)
    sent = _value(after_a, "peerd_transfer_bytes_sent_total") - _value(
        before_a, "peerd_transfer_bytes_sent_total"
    )
    resent = _value(after_a, "peerd_transfer_bytes_resent_total") - _value(
        before_a, "peerd_transfer_bytes_resent_total"
    )
    assert sent - resent == size
    received = _value(after_b, "peerd_transfer_bytes_received_total") - _value(
        before_b, "peerd_transfer_bytes_received_total"
    )
    assert received == size
    assert (
        _value(after_b, "peerd_transfer_chunks_received_total")
        - _value(before_b, "peerd_transfer_chunks_received_total")
        == chunks
    )
    # Every chunk crossed the broker: the link's byte counters moved by at least the file.
    for samples, before, name in (
        (after_a, before_a, "peerd_broker_published_bytes_total"),
        (after_b, before_b, "peerd_broker_received_bytes_total"),
    ):
        assert _value(samples, name) - _value(before, name) >= size
    assert _value(after_a, "peerd_transfers_started_total", direction="send") == 1
    assert (
        _value(after_a, "peerd_transfers_finished_total", direction="send", state="verified") == 1
    )
    assert _value(after_b, "peerd_transfers_started_total", direction="receive") == 1
    for samples in (after_a, after_b):
        assert _value(samples, "peerd_sessions_up") == 1
        assert _value(samples, "peerd_broker_connected") == 1
        assert _value(samples, "peerd_handshakes_completed_total", kind="new") >= 1
        assert _value(samples, "peerd_key_age_seconds") >= 0
        assert _value(samples, "peerd_transfers_active", direction="send") == 0
        assert _value(samples, "peerd_event_queue_depth", lane="bulk") >= 0
    assert _value(after_b, "peerd_peers", state="trusted") == 1

    # Counters never went backwards between scrapes.
    assert len(scrapes) >= 2
    last: dict[str, dict] = {"a": before_a, "b": before_b}
    for who, samples in scrapes:
        for name in COUNTERS:
            assert _value(samples, name) >= _value(last[who], name), (who, name)
        last[who] = samples

    # Peer ids as labels only where the operator asked (alice: per_peer = true).
    assert _value(after_a, "peerd_peer_session_up", peer=b.peer_id, state="trusted") == 1
    text_b = urllib.request.urlopen(url_b, timeout=10).read().decode()
    assert a.peer_id not in text_b
    assert not [k for k in after_b if any(label == "peer" for label, _ in k[1])]

    # `peerd metrics` prints the same exposition through the control socket.
    printed = _samples(b.cli("metrics"))
    for name in ("peerd_transfer_bytes_received_total", "peerd_transfer_chunks_received_total"):
        assert _value(printed, name) == _value(after_b, name)
    assert _value(printed, "peerd_metrics_scrapes_total") > _value(
        after_b, "peerd_metrics_scrapes_total"
    )

    # The shipped Grafana dashboard asks only for series that exist.
    dashboard = (Path(__file__).parents[2] / "docs" / "grafana-dashboard.json").read_text()
    text_a = urllib.request.urlopen(url_a, timeout=10).read().decode()
    names = set(re.findall(r"^# HELP (\S+)", text_a, re.MULTILINE)) | {n for n, _ in after_a}
    wanted = set(re.findall(r"peerd_[a-z_]+", dashboard))
    assert wanted
    assert wanted <= names, wanted - names

    # Only /metrics is served.
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url_b.replace("/metrics", "/"), timeout=10)
    assert missing.value.code == 404


def test_metrics_are_off_unless_configured_and_a_taken_address_is_a_clear_error(
    tmp_path: Path, broker: Broker
) -> None:
    (a,) = make_nodes(tmp_path, broker.url, ["alice"])
    a.start()
    try:
        assert "peerd_node_info" in a.cli("metrics")  # the control method works without HTTP
        assert a.status()["broker"]["connected"]
    finally:
        a.stop()
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = a.config.read_text()
        a.config.write_text(
            conf.replace("[metrics]\n", f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        )
        run = subprocess.run(
            [*a_cmd(a), "run"],
            capture_output=True,
            text=True,
            timeout=60,
            env=a.env(),
            check=False,
        )
    assert run.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr


def a_cmd(node: Node) -> list[str]:
    from tests.support.cluster import PEERD  # noqa: PLC0415

    return [*PEERD, "--config", str(node.config)]


# -- secrets never in a log line ---------------------------------------------------------------


def _forms(secret: bytes) -> set[str]:
    """The ways a secret could be printed: hex (both cases) and base64 (standard, URL-safe,
    with and without padding)."""
    b64 = base64.b64encode(secret).decode()
    url = base64.urlsafe_b64encode(secret).decode()
    return {secret.hex(), secret.hex().upper(), b64, b64.rstrip("="), url, url.rstrip("=")}


@pytest.mark.slow
def test_no_secret_in_any_daemon_or_cli_log(tmp_path: Path) -> None:
    """The end-to-end flows, with every secret they involve: broker passwords given at `init`
    and by `broker-login`, a network PSK, an invite token (and its PSK), a transfer, messages, a
    backup passphrase; alice logs JSON, bob logfmt, both at debug level. No form of any secret
    appears in any daemon log line or in what any CLI command wrote to stderr (or to stdout,
    but for `peerd invite`'s token, which is its output)."""
    outputs: list[str] = []

    def run(node: Node, *args: str, input: str | None = None, ok: bool = True) -> str:
        result = node.run_cli(*args, input=input)
        outputs.append(result.stderr)
        if args[0] != "invite":
            outputs.append(result.stdout)
        if ok:
            assert result.returncode == 0, result.stderr
        return result.stdout

    passwords = {name: f"pw-{secrets.token_urlsafe(18)}" for name in ("alice", "bob")}
    network_psk = os.urandom(32)
    psk_file = tmp_path / "network.psk"
    psk_file.write_text(network_psk.hex() + "\n")
    psk_file.chmod(0o600)
    nodes = []
    for name in ("alice", "bob"):
        pw_file = tmp_path / f"{name}-init-password"
        pw_file.write_text(passwords[name] + "\n")
        pw_file.chmod(0o600)
        node = Node(
            tmp_path, name, UNREACHABLE, broker_user=name, broker_password_file=str(pw_file)
        ).init()
        nodes.append(node)
    a, b = nodes
    users = {n.peer_id: passwords[n.name] for n in nodes}
    with Broker(tmp_path / "shipped", shipped=True, users=users) as broker:
        for n in nodes:
            conf = n.config.read_text().replace(UNREACHABLE, broker.url)
            conf = conf.replace("[network]\n", f'[network]\npsk_file = "{psk_file}"\n', 1)
            n.config.write_text(conf)
            # The ACL confines each account to its peer id: log in as that.
            run(
                n,
                "broker-login",
                "--user",
                n.peer_id,
                "--password-stdin",
                input=passwords[n.name] + "\n",
            )
        a.start(extra_env={"PEERD_LOG_FORMAT": "json"})
        b.start()
        try:
            token = run(a, "invite", "--note", "for bob").strip()
            run(b, "join", token)
            src = random_file(tmp_path / "model.bin", 3 * CHUNK + 5, seed=3)
            assert run(a, "send", str(src), "--to", b.peer_id, "--wait", "--json")
            run(a, "msg", "send", b.peer_id, "round-1", "hello bob")
            assert "hello bob" in run(
                b, "msg", "listen", "round-1", "--count", "1", "--timeout", "30s"
            )
            run(b, "peers")
            run(a, "status")
            run(a, "metrics")
            passphrase = f"pp-{secrets.token_urlsafe(18)}"
            pp_file = tmp_path / "passphrase"
            pp_file.write_text(passphrase + "\n")
            pp_file.chmod(0o600)
            run(a, "backup", str(tmp_path / "alice.backup"), "--passphrase-file", str(pp_file))
            # A refused restore (the daemon runs) and a wrong token are errors worth a line.
            run(
                a,
                "restore",
                str(tmp_path / "alice.backup"),
                "--passphrase-file",
                str(pp_file),
                ok=False,
            )
            run(b, "join", token, "--timeout", "3s", ok=False)
            run(a, "rotate")
            time.sleep(0.5)  # let the last lines reach the log files
        finally:
            a.stop()
            b.stop()

    token_obj = InviteToken.from_text(token)
    texts = {
        "token": token,
        "broker password alice": passwords["alice"],
        "broker password bob": passwords["bob"],
        "backup passphrase": passphrase,
    }
    keys: dict[str, bytes] = {"network psk": network_psk, "invite psk": token_obj.psk}
    for n in nodes:
        ks = Keystore.load(n.dir / "keys", now=time.time())
        keys[f"{n.name} identity key"] = ks.signing_key().encode()
        for cert in ks.certificates():
            pair_ = ks.static_for(cert.serial)
            if pair_ is not None:
                keys[f"{n.name} static key {cert.serial}"] = pair_.private
    logs = {f"{n.name} daemon log": n.log_path.read_text(errors="replace") for n in nodes}
    logs["cli output"] = "\n".join(outputs)
    assert '"event": "transfer.done"' in logs["alice daemon log"]  # JSON lines, as asked
    assert "event=transfer.done" in logs["bob daemon log"]
    found = []
    for where, text in logs.items():
        for what, secret in texts.items():
            if secret in text:
                found.append((what, where))
        for what, raw in keys.items():
            for form in _forms(raw):
                if form in text:
                    found.append((what, where))
    assert not found, found


def test_under_systemd_the_daemon_writes_native_journal_entries(
    tmp_path: Path, broker: Broker
) -> None:
    """`peerd run` with stderr connected to "the journal" (JOURNAL_STREAM names its device and
    inode, as systemd sets it) sends native entries to the journal socket: here a real datagram
    socket of the test's own, read by the journal protocol's rules."""
    import socket  # noqa: PLC0415

    from tests.peerd.test_logs import _decode_journal  # noqa: PLC0415

    (a,) = make_nodes(tmp_path, broker.url, ["alice"])
    a.log_path.touch()
    st = a.log_path.stat()
    path = str(tmp_path / "journal.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(path)
        journal.settimeout(30)
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "PEERD_JOURNAL_SOCKET": path}
        a.start(extra_env=env)
        try:
            seen: dict[str, dict[str, str]] = {}
            while "broker.connected" not in seen:
                entry = _decode_journal(journal.recv(1 << 16))
                if "PEERD_EVENT" in entry:
                    seen[entry["PEERD_EVENT"]] = entry
        finally:
            a.stop()
    start = seen["daemon.start"]
    assert start["SYSLOG_IDENTIFIER"] == "peerd"
    assert start["PRIORITY"] == "6"
    assert start["PEERD_NODE"].replace("-", "") == a.peer_id
    assert start["PEERD_NETWORK"] == "test"
    assert seen["broker.connected"]["PEERD_URL"] == broker.url
    assert "event=daemon.start" in start["MESSAGE"]
    assert "ts=" not in start["MESSAGE"]  # the journal stamps time itself
    assert "event=" not in a.log()  # nothing went to stderr instead
