"""`peerd doctor` through the real CLI: healthy against a private Mosquitto (with the daemon
running and without), and failing, with what to do, when the broker is down, the password is
wrong or a private key is open to others (issue 16 item 4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.broker import Broker
from tests.support.cluster import UNREACHABLE, Node, log_in, make_nodes


def doctor(node: Node) -> tuple[int, dict[str, Any]]:
    result = node.run_cli("doctor", "--json", "--timeout", "3s")
    return result.returncode, json.loads(result.stdout)


def by_check(report: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for c in report["checks"]:
        out.setdefault(c["check"], []).append(c)
    return out


def test_a_fresh_node_on_a_running_broker_is_healthy(tmp_path: Path, broker: Broker) -> None:
    (a,) = make_nodes(tmp_path, broker.url, ["alice"])
    code, report = doctor(a)  # no daemon: doctor logs in itself
    assert code == 0, report
    assert report["healthy"] is True
    assert report["daemon_running"] is False
    checks = by_check(report)
    (row,) = checks[f"broker {broker.url}"]
    assert row["status"] == "ok"
    assert "reachable" in row["detail"]
    assert "MQTT 3.1.1" in row["detail"]
    assert "packets <=" in row["detail"]
    for name in ("config", "keys", "store"):
        assert all(c["status"] == "ok" for c in checks[name]), checks[name]
    a.start()
    try:
        code, report = doctor(a)  # the daemon's own connection, not a second login
        assert code == 0, report
        assert report["daemon_running"] is True
        (row,) = by_check(report)[f"broker {broker.url}"]
        assert row["status"] == "ok"
        assert "the daemon is connected" in row["detail"]
        assert a.status()["broker"]["stats"]["connects"] == 1, "doctor threw the daemon off"
        table = a.run_cli("doctor")
        assert table.returncode == 0
        assert table.stdout.rstrip().endswith("healthy")
    finally:
        a.kill()


def test_a_broker_that_is_down_fails_with_what_to_do(tmp_path: Path, broker: Broker) -> None:
    (a,) = make_nodes(tmp_path, broker.url, ["alice"])
    broker.stop()
    code, report = doctor(a)
    assert code == 1
    assert report["healthy"] is False
    (row,) = by_check(report)[f"broker {broker.url}"]
    assert row["status"] == "fail"
    assert "start the broker" in row["fix"]
    table = a.run_cli("doctor", "--timeout", "2s")
    assert table.returncode == 1
    assert f"broker {broker.url}: start the broker" in table.stdout
    assert table.stdout.rstrip().endswith("NOT healthy")


def test_a_wrong_password_fails_and_names_broker_login(tmp_path: Path) -> None:
    (a,) = make_nodes(tmp_path, UNREACHABLE, ["alice"])
    with Broker(tmp_path / "shipped", shipped=True, users={a.peer_id: "the right one"}) as broker:
        log_in(a, broker.url, "a wrong one")
        code, report = doctor(a)
        assert code == 1
        (row,) = by_check(report)[f"broker {broker.url}"]
        assert row["status"] == "fail"
        assert "password" in row["detail"] or "authori" in row["detail"]
        assert "peerd broker-login" in row["fix"]
        assert "a wrong one" not in json.dumps(report)
        (a.dir / "broker-password").write_text("the right one\n")  # the file log_in made
        code, report = doctor(a)
        assert code == 0, report


def test_a_private_key_open_to_others_fails_with_the_chmod(tmp_path: Path, broker: Broker) -> None:
    (a,) = make_nodes(tmp_path, broker.url, ["alice"])
    key = a.dir / "keys" / "identity.key"
    key.chmod(0o644)
    code, report = doctor(a)
    assert code == 1
    (row,) = by_check(report)["keys"]
    assert row["status"] == "fail"
    assert row["fix"] == f"chmod 600 {key}"


def test_each_broker_url_is_checked(tmp_path: Path, broker: Broker) -> None:
    (a,) = make_nodes(tmp_path, UNREACHABLE, ["alice"])
    conf = a.config.read_text().replace(
        f'url = "{UNREACHABLE}"', f'urls = ["{broker.url}", "{UNREACHABLE}"]', 1
    )
    a.config.write_text(conf)
    code, report = doctor(a)
    checks = by_check(report)
    assert checks[f"broker {broker.url}"][0]["status"] == "ok"
    assert checks[f"broker {UNREACHABLE}"][0]["status"] == "fail"
    assert code == 1
