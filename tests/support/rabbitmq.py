"""A private RabbitMQ node with its MQTT plugin (and, asked, its WebSocket one) on free ports.

It never touches a system RabbitMQ: its own node name, ports, Mnesia and log directories,
enabled-plugins file and config, all under `root`; stopped by killing its process group. Erlang
boots it in about 10-30 s on two cores, so tests using it are marked slow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.broker import free_port, wait_for_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def available() -> bool:
    return os.path.exists(RABBITMQ_SERVER)


@contextlib.contextmanager
def rabbitmq(root: Path, *, web: bool = False) -> Iterator[dict[str, str]]:
    """Run a node under `root` (keep it short: Erlang's paths have limits); yields its URLs:
    "mqtt", and "ws" (`ws://127.0.0.1:PORT/ws`) when `web`."""
    port, amqp, dist, ws = free_port(), free_port(), free_port(), free_port()
    plugins = "rabbitmq_mqtt" + (",rabbitmq_web_mqtt" if web else "")
    (root / "plugins").write_text(f"[{plugins}].\n")
    conf = (
        f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
        f"mqtt.listeners.tcp.default = 127.0.0.1:{port}\n"
        "mqtt.allow_anonymous = true\n"
        "loopback_users = none\n"
    )
    if web:
        conf += f"web_mqtt.tcp.port = {ws}\nweb_mqtt.tcp.ip = 127.0.0.1\n"
    (root / "rabbitmq.conf").write_text(conf)
    (root / "home").mkdir(exist_ok=True)
    env = dict(
        os.environ,
        HOME=str(root / "home"),
        RABBITMQ_NODENAME=f"peerdtest{port}@localhost",
        RABBITMQ_DIST_PORT=str(dist),
        RABBITMQ_MNESIA_BASE=str(root / "mnesia"),
        RABBITMQ_LOG_BASE=str(root / "log"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(root / "plugins"),
        RABBITMQ_CONFIG_FILE=str(root / "rabbitmq.conf"),
        RABBITMQ_PID_FILE=str(root / "pid"),
    )
    with (root / "out.log").open("wb") as log:
        proc = subprocess.Popen(
            [RABBITMQ_SERVER], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for_port(port, 120)
            urls = {"mqtt": f"mqtt://127.0.0.1:{port}"}
            if web:
                wait_for_port(ws, 60)
                urls["ws"] = f"ws://127.0.0.1:{ws}/ws"
            yield urls
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
