"""Prometheus metrics: the counters the daemon already keeps, in the exposition format.

Nothing is counted twice. A scrape reads the daemon's `status()` (the same numbers `peerd status
--json` shows: sessions, rejections by reason, the broker link's counters, the transfer totals,
the event lanes), the peer list when `[metrics] per_peer` asks for it, and two small queries of
the store (outbox and inbox), and turns them into metric families. The same text is served at
`http://<[metrics] listen>/metrics` (peerd/metrics_http.py, inside the daemon's event loop: a
collector that runs on the loop reads the daemon's state between two awaits, never while it
changes) and returned by the control method `v1.metrics` (`peerd metrics`).

Labels are bounded: reasons and states come from the code, never from a peer; peer ids appear
only with `per_peer = true`, one series per peer in the trust store.

prometheus_client is imported when a scrape renders, not when the daemon (or the CLI) starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from peerd.host import control_method

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from peerd.config import Config
    from peerd.metrics_http import MetricsServer
    from peerd.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsSource(Protocol):
    """What a scrape reads of the daemon."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    def status(self) -> dict[str, Any]: ...

    def peers(self) -> list[dict[str, Any]]: ...


class Metrics:
    """The `v1.metrics` control method and, when configured, the HTTP endpoint."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source
        self.server: MetricsServer | None = None
        self.scrapes = 0

    async def start(self) -> None:
        cfg = self.source.config.metrics
        if cfg.listen is None:
            return
        from peerd.metrics_http import MetricsServer  # noqa: PLC0415 - only when configured

        self.server = MetricsServer(cfg.host, cfg.port, self.render)
        await self.server.start()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def render(self) -> bytes:
        """The exposition text of the daemon's state now."""
        from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

        self.scrapes += 1
        snapshot = await self.snapshot()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(list(families(snapshot))))
        return generate_latest(registry)

    async def snapshot(self) -> dict[str, Any]:
        src = self.source
        status = src.status()
        out_n, out_bytes = await src.store.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(length(data)), 0) FROM outbox"
        )
        in_n, in_bytes = await src.store.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(length(data)), 0) FROM inbox"
        )
        return {
            "status": status,
            "outbox": {"messages": out_n, "bytes": out_bytes},
            "inbox": {"messages": in_n, "bytes": in_bytes},
            "peers": src.peers() if src.config.metrics.per_peer else None,
            "scrapes": self.scrapes,
            "now": time.time(),
        }

    @control_method("v1.metrics")
    async def _metrics(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        return {"text": (await self.render()).decode(), "content_type": CONTENT_TYPE}


class _Families:
    """A collector that yields families built before the registry asks for them."""

    def __init__(self, built: list[Metric]) -> None:
        self.built = built

    def collect(self) -> Iterable[Metric]:
        return self.built


def families(snap: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one snapshot (`Metrics.snapshot`)."""
    from prometheus_client.core import (  # noqa: PLC0415
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    st: dict[str, Any] = snap["status"]
    now: float = snap["now"]

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"peerd_{name}", doc, value=value)

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(f"peerd_{name}", doc, value=value)

    def labelled(
        kind: type[Any], name: str, doc: str, labels: list[str], rows: Iterable[tuple[Any, ...]]
    ) -> Metric:
        family = kind(f"peerd_{name}", doc, labels=labels)
        for *values, value in rows:
            family.add_metric([str(v) for v in values], value)
        return family  # type: ignore[no-any-return]

    yield InfoMetricFamily(
        "peerd_node",
        "this node",
        value={"version": st["version"], "peer_id": st["peer_id"], "network": st["network"]},
    )
    yield gauge("uptime_seconds", "seconds since the daemon started", st["uptime"])

    # Sessions and handshakes.
    yield gauge("sessions_up", "peers with an established session", st["sessions"])
    yield labelled(
        GaugeMetricFamily,
        "sessions_by_protocol",
        "established sessions by the Noise protocol of their handshake",
        ["protocol"],
        sorted(st.get("session_protocols", {}).items()),
    )
    yield gauge(
        "handshakes_half_open",
        "handshakes waiting for their third message",
        st["half_open_handshakes"],
    )
    hs: dict[str, int] = st.get("handshakes", {})
    yield labelled(
        CounterMetricFamily,
        "handshakes_completed",
        "handshakes completed, first sessions (new) and rekeys",
        ["kind"],
        [(k, hs.get(k, 0)) for k in ("new", "rekey")],
    )
    yield labelled(
        CounterMetricFamily,
        "handshakes_failed",
        "handshakes this node started or answered that failed, by reason",
        ["reason"],
        sorted((k.split(":", 1)[1], v) for k, v in hs.items() if k.startswith("failed:")),
    )
    yield labelled(
        CounterMetricFamily,
        "rejections",
        "what peers, the broker or local callers sent that was refused, by reason"
        " (handshakes, frames, messages, transfers, revocations, control socket)",
        ["reason"],
        sorted(st.get("rejections", {}).items()),
    )
    yield labelled(
        GaugeMetricFamily,
        "peers",
        "peers in the trust store by state",
        ["state"],
        sorted(st.get("peers", {}).items()),
    )

    # The broker.
    broker = st["broker"]
    yield gauge("broker_connected", "1 while connected to the broker", int(broker["connected"]))
    yield gauge("broker_queued", "publishes waiting for the broker connection", broker["queued"])
    link = broker["stats"]
    yield counter("broker_connects", "connections to the broker established", link["connects"])
    yield counter("broker_disconnects", "connections to the broker lost", link["disconnects"])
    yield counter(
        "broker_connect_failures", "connection attempts that failed", link["connect_failures"]
    )
    yield counter("broker_published_messages", "MQTT publishes sent", link["published"])
    yield counter("broker_published_bytes", "payload bytes published", link["published_bytes"])
    yield counter(
        "broker_retransmitted_messages", "QoS 1 publishes sent again", link["retransmitted"]
    )
    yield counter("broker_received_messages", "MQTT publishes received", link["received"])
    yield counter("broker_received_bytes", "payload bytes received", link["received_bytes"])

    # Transfers.
    tr = st.get("transfers", {})
    totals = tr.get("totals", {})
    yield labelled(
        GaugeMetricFamily,
        "transfers_active",
        "transfers under way",
        ["direction"],
        [("send", tr.get("sending", 0)), ("receive", tr.get("receiving", 0))],
    )
    yield labelled(
        CounterMetricFamily,
        "transfers_started",
        "transfers started (resumed ones not counted again)",
        ["direction"],
        sorted(totals.get("started", {}).items()),
    )
    yield labelled(
        CounterMetricFamily,
        "transfers_finished",
        "transfers ended, by direction and final state",
        ["direction", "state"],
        sorted((*k.split(" ", 1), v) for k, v in totals.get("finished", {}).items()),
    )
    for name, doc in (
        ("chunks_sent", "chunks published (re-sends included)"),
        ("bytes_sent", "file bytes published in chunks (re-sends included)"),
        ("chunks_resent", "chunks published again (repair)"),
        ("bytes_resent", "file bytes published again (repair)"),
        ("chunks_received", "chunks received and written"),
        ("bytes_received", "file bytes received and written"),
        ("chunks_direct", "chunks received and written past the page cache (O_DIRECT)"),
        ("bytes_reused", "file bytes a delta copied from local files instead of receiving"),
    ):
        yield counter(f"transfer_{name}", doc, totals.get(name, 0))

    # Messages.
    yield labelled(
        CounterMetricFamily,
        "messages",
        "channel messages by what happened to them",
        ["event"],
        sorted(st.get("messages", {}).items()),
    )
    for box, doc in (("outbox", "waiting for their peers"), ("inbox", "received, not yet read")):
        yield gauge(f"{box}_messages", f"messages {doc}", snap[box]["messages"])
        yield gauge(f"{box}_bytes", f"bytes of messages {doc}", snap[box]["bytes"])

    # Queues and internals.
    yield labelled(
        GaugeMetricFamily,
        "event_queue_depth",
        "store work waiting for the event task, by lane",
        ["lane"],
        sorted(st.get("event_lanes", {}).items()),
    )
    control = st["control"]
    yield gauge("control_connections", "open control socket connections", control["connections"])
    yield counter("control_requests", "control socket requests", control["requests"])
    yield counter(
        "log_lines_suppressed", "log lines held back by the log budget", st["log_lines_suppressed"]
    )
    yield counter(
        "revocations_applied",
        "revocation statements that changed the trust store",
        st.get("revocations", {}).get("applied", 0),
    )
    yield counter("metrics_scrapes", "metrics renderings (HTTP and v1.metrics)", snap["scrapes"])

    # Keys.
    yield gauge("key_serial", "serial of the current static key certificate", st["serial"])
    not_before = st.get("certificate_not_before")
    if not_before is not None:
        yield gauge("key_age_seconds", "age of the current static key", now - not_before)
    yield gauge(
        "key_expiry_timestamp_seconds",
        "when the current static key certificate expires (Unix time)",
        st["certificate_not_after"],
    )

    peers = snap.get("peers")
    if peers is not None:
        yield labelled(
            GaugeMetricFamily,
            "peer_session_up",
            "1 while a session with the peer is up (per_peer = true)",
            ["peer", "state"],
            [(p["peer"], p["state"], int(bool(p["connected"]))) for p in peers],
        )
        yield labelled(
            GaugeMetricFamily,
            "peer_session_since_timestamp_seconds",
            "when the peer's current session came up (per_peer = true)",
            ["peer"],
            [(p["peer"], p["session_since"]) for p in peers if p.get("session_since")],
        )


__all__ = ["CONTENT_TYPE", "Metrics", "MetricsSource", "families"]
