"""`peerd run` and the commands that talk to the running daemon over its control socket:
status, peers, invite, join, trust, block, rotate, revoke, connect."""

from __future__ import annotations

import argparse
import os
import sys
import time

from peerd.cli import common

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see check_imports.py)
if TYPE_CHECKING:
    from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the daemon in the foreground (as systemd does)",
        description="Run the daemon in the foreground until SIGTERM. SIGHUP reloads the config.",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("PEERD_LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: $PEERD_LOG_LEVEL, else [log] level, else info)",
    )
    p.add_argument(
        "--log-format",
        default=os.environ.get("PEERD_LOG_FORMAT"),
        choices=["auto", "text", "json", "journald"],
        help="text (key=value), json, journald (native fields), or auto: journald when systemd"
        " connected stderr to the journal, else text (default: $PEERD_LOG_FORMAT, else [log]"
        " format)",
    )
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "metrics", help="the daemon's metrics in the Prometheus text format (as /metrics serves)"
    )
    p.set_defaults(func=cmd_metrics)

    p = subparsers.add_parser("status", help="the daemon's state: broker, sessions, rejections")
    common.add_json_option(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("peers", help="known peers, their trust state and sessions")
    common.add_json_option(p)
    p.set_defaults(func=cmd_peers)

    p = subparsers.add_parser("invite", help="print a one-time invite token for a new peer")
    p.add_argument(
        "--ttl",
        default="1h",
        type=common.duration,
        help="how long it is valid (default 1h; e.g. 30m)",
    )
    p.add_argument("--note", default="", help="a note kept with the invite (who it is for)")
    common.add_json_option(p)
    p.set_defaults(func=cmd_invite)

    p = subparsers.add_parser("join", help="pair with the node that issued an invite token")
    p.add_argument("token", help="the token `peerd invite` printed on the other node")
    p.add_argument(
        "--timeout", type=common.duration, default=30.0, help="give up after (default 30s)"
    )
    p.add_argument("--name", default="", help="a name for the inviter, shown next to its id")
    common.add_json_option(p)
    p.set_defaults(func=cmd_join)

    p = subparsers.add_parser("name", help="name a peer (shown next to its id; empty to remove)")
    p.add_argument("peer", help="the peer id")
    p.add_argument("name", help="the name, e.g. bob-lab (this node's own label for the peer)")
    common.add_json_option(p)
    p.set_defaults(func=cmd_name)

    p = subparsers.add_parser(
        "trust", help="trust a peer whose fingerprint you compared out of band, or lift a block"
    )
    p.add_argument("peer", help="the peer id")
    p.add_argument("--fingerprint", metavar="FP", help="the fingerprint it read to you")
    common.add_json_option(p)
    p.set_defaults(func=cmd_trust)

    p = subparsers.add_parser("block", help="refuse a peer (ends its sessions now)")
    p.add_argument("peer", help="the peer id")
    common.add_json_option(p)
    p.set_defaults(func=cmd_block)

    p = subparsers.add_parser("rotate", help="rotate this node's static key now")
    common.add_json_option(p)
    p.set_defaults(func=cmd_rotate)

    p = subparsers.add_parser(
        "revoke",
        help="revoke this node's static key and rotate (default), or its whole identity",
        description="--static (the default): rotate to a fresh static key and revoke every "
        "older one. --identity --yes: revoke the node for good (every peer refuses it from "
        "then on; the daemon stops and never starts again).",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--static", action="store_true", help="the static key (default)")
    which.add_argument("--identity", action="store_true", help="the whole node, for good")
    p.add_argument("--yes", action="store_true", help="confirm --identity")
    p.add_argument("--reason", default="", help="why (kept in the signed statement)")
    common.add_json_option(p)
    p.set_defaults(func=cmd_revoke)

    p = subparsers.add_parser("connect", help="open a session with a trusted peer now")
    p.add_argument("peer", help="the peer id")
    common.add_json_option(p)
    p.set_defaults(func=cmd_connect)


# -- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from peerd.daemon import Daemon
    from peerd.logs import setup_logging

    config = common.load(args)
    _tune_allocator()
    setup_logging(args.log_level or config.log.level, args.log_format or config.log.format)
    daemon = Daemon(config)
    asyncio.run(daemon.run())
    if daemon.stopped_for is not None:
        raise daemon.stopped_for  # e.g. expelled: its one line and exit code (8)
    return common.EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    result = common.call(args, "v1.metrics")
    sys.stdout.write(result["text"])
    return common.EXIT_OK


def _tune_allocator() -> None:
    """Large, short-lived buffers (256 KiB chunks) must not be mmap'd and unmapped each time:
    with glibc's defaults every fresh one page-faults (~133 us per chunk, ~0.5 s per GiB per
    copy). Keep them in the heap, for the whole process. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 4 << 20)
    mallopt(m_trim_threshold, 256 << 20)


# -- status and peers ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    def both(link: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return link.call("v1.status"), link.call("v1.peers")

    st, peer_list = common.with_link(args, both)
    if args.json:
        common.print_json(st)
        return common.EXIT_OK
    broker = st["broker"]
    print(f"node        {common.show_id(st['peer_id'])}  ({st['name']})")
    print(f"network     {st['network']}")
    print(f"fingerprint {st['fingerprint']}")
    print(
        f"key         serial {st['serial']}, valid until {common.when(st['certificate_not_after'])}"
    )
    state = "connected" if broker["connected"] else "DISCONNECTED"
    if not broker["connected"] and broker.get("last_error"):
        state += f" ({broker['last_error']})"
    print(f"broker      {broker['url']}: {state}")
    for other in broker.get("urls") or ():
        if other["url"] != broker["url"] and other.get("last_error"):
            ago = int(time.time() - other["left_at"]) if other.get("left_at") else 0
            print(f"  left      {other['url']} {ago} s ago: {other['last_error']}")
        elif other["url"] != broker["url"]:
            print(f"  spare     {other['url']}")
    peers = ", ".join(f"{n} {s}" for s, n in sorted(st["peers"].items())) or "none"
    up = [
        common.with_name(p["peer"], p.get("name"))
        + ("" if _session_state(p) == "up" else f" ({_session_state(p)})")
        for p in peer_list
        if p["connected"]
    ]
    print(f"peers       {peers}; {st['sessions']} session(s) up" + (": " if up else ""))
    for who in up:
        print(f"            {who}")
    print(f"uptime      {int(st['uptime'])} s")
    rejections = st.get("rejections") or {}
    if rejections:
        total = sum(rejections.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(rejections.items(), key=lambda kv: -kv[1]))
        print(f"rejected    {total}: {detail}")
    else:
        print("rejected    0")
    transfers = st.get("transfers")
    if transfers:
        print(f"transfers   {transfers.get('active', 0)} active")
    return common.EXIT_OK


def _session_state(p: dict[str, Any]) -> str:
    """up; stale (the peer left what we sent unanswered: its daemon or broker is gone, and
    the daemon is trying to reach it again); or - (no session)."""
    if not p["connected"]:
        return "-"
    if p.get("silent_since"):
        return f"stale, silent {max(0, int(time.time() - p['silent_since']))} s"
    return "up"


def cmd_peers(args: argparse.Namespace) -> int:
    peers = common.call(args, "v1.peers")
    if args.json:
        common.print_json(peers)
        return common.EXIT_OK
    common.print_table(
        ["peer", "name", "state", "via", "session", "serial", "fingerprint"],
        [
            [
                common.show_id(p["peer"]),
                p.get("name") or "-",
                p["state"],
                p["source"] or "-",
                _session_state(p),
                p["serial"] if p["serial"] is not None else "-",
                p["fingerprint"] or "-",
            ]
            for p in peers
        ],
    )
    return common.EXIT_OK


# -- trust -------------------------------------------------------------------------------------


def cmd_invite(args: argparse.Namespace) -> int:
    result = common.call(args, "v1.invite.create", {"ttl": int(args.ttl), "note": args.note})
    if args.json:
        common.print_json(result)
    else:
        print(result["token"])
        print(
            f"(one use, valid until {common.when(result['expires_at'])}; on the other node: "
            "peerd join TOKEN)",
            file=sys.stderr,
        )
    return common.EXIT_OK


def cmd_join(args: argparse.Namespace) -> int:
    result = common.call(
        args,
        "v1.join",
        {"token": args.token.strip(), "timeout": args.timeout, "name": args.name},
        within=args.timeout + 10,
    )
    if args.json:
        common.print_json(result)
    else:
        who = common.with_name(result["peer"], result.get("name"))
        print(f"paired with {who} (fingerprint {result['fingerprint']})")
    return common.EXIT_OK


def cmd_name(args: argparse.Namespace) -> int:
    result = common.call(args, "v1.peer.name", {"peer": args.peer, "name": args.name})
    if args.json:
        common.print_json(result)
    elif result["name"]:
        print(f"{common.show_id(result['peer'])} is now {result['name']!r}")
    else:
        print(f"{common.show_id(result['peer'])} has no name now")
    return common.EXIT_OK


def _peer_result(args: argparse.Namespace, result: dict[str, Any], verb: str) -> int:
    if args.json:
        common.print_json(result)
    else:
        print(f"{common.show_id(result['peer'])}: {result['state']} ({verb})")
    return common.EXIT_OK


def cmd_trust(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"peer": args.peer}
    if args.fingerprint:
        params["fingerprint"] = args.fingerprint
    return _peer_result(args, common.call(args, "v1.trust", params), "trust")


def cmd_block(args: argparse.Namespace) -> int:
    return _peer_result(args, common.call(args, "v1.block", {"peer": args.peer}), "block")


def cmd_rotate(args: argparse.Namespace) -> int:
    result = common.call(args, "v1.rotate")
    if args.json:
        common.print_json(result)
    else:
        print(f"rotated: serial {result['serial']}, valid until {common.when(result['not_after'])}")
    return common.EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    if args.identity:
        from peerd.cli.identity import cmd_revoke_identity

        return cmd_revoke_identity(args)
    result = common.call(args, "v1.revoke", {"reason": args.reason})
    if args.json:
        common.print_json(result)
    else:
        print(
            f"revoked serials up to {result['revoked_through']}; now using serial "
            f"{result['serial']}"
        )
        if result.get("stored"):
            print("the broker keeps the revocation for peers offline now (read back)")
        else:
            print(
                "the broker has not yet shown that it keeps the revocation (not read back):"
                " peers online now have it; keep this daemon running and connected, it"
                " publishes it again every [broker] republish_interval and after each"
                " reconnect"
            )
    return common.EXIT_OK


def cmd_connect(args: argparse.Namespace) -> int:
    result = common.call(args, "v1.connect", {"peer": args.peer})
    if args.json:
        common.print_json(result)
    else:
        print(f"connecting to {common.show_id(result['peer'])}")
    return common.EXIT_OK
