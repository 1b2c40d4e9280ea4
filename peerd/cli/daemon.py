"""`peerd run` and the commands that talk to the running daemon over its control socket:
status, peers, invite, join, trust, block, rotate, revoke, connect, msg."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from peerd.cli import common
from peerd.client import Client
from peerd.config import load_config
from peerd.errors import UsageError
from protocol.identity import format_peer_id


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the daemon in the foreground (as systemd does)",
        description="Run the daemon in the foreground until SIGTERM. SIGHUP reloads the config.",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("PEERD_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info, or $PEERD_LOG_LEVEL)",
    )
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("status", help="the daemon's state: broker, sessions, rejections")
    common.add_json_option(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("peers", help="known peers, their trust state and sessions")
    common.add_json_option(p)
    p.set_defaults(func=cmd_peers)

    p = subparsers.add_parser("invite", help="print a one-time invite token for a new peer")
    p.add_argument(
        "--ttl", default="1h", type=_duration, help="how long it is valid (default 1h; e.g. 30m)"
    )
    p.add_argument("--note", default="", help="a note kept with the invite (who it is for)")
    common.add_json_option(p)
    p.set_defaults(func=cmd_invite)

    p = subparsers.add_parser("join", help="pair with the node that issued an invite token")
    p.add_argument("token", help="the token `peerd invite` printed on the other node")
    p.add_argument("--timeout", type=_duration, default=30.0, help="give up after (default 30s)")
    common.add_json_option(p)
    p.set_defaults(func=cmd_join)

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

    p = subparsers.add_parser("msg", help="send and receive messages on named channels")
    actions = p.add_subparsers(dest="msg_action", metavar="ACTION")
    s = actions.add_parser("send", help="send a message (queued while the peer is offline)")
    s.add_argument("peer", help="the peer id")
    s.add_argument("channel", help="the channel name (letters, digits, . _ / -)")
    s.add_argument("data", nargs="?", default="-", help="the message, or - for stdin (default)")
    s.add_argument(
        "--ttl",
        type=_duration,
        default=None,
        help="expire if undelivered after (default: [limits] message_ttl_days, 7d)",
    )
    common.add_json_option(s)
    s.set_defaults(func=cmd_msg_send)
    s = actions.add_parser("listen", help="print messages arriving on a channel")
    s.add_argument("channel", help="the channel name")
    s.add_argument("--count", type=int, default=0, help="stop after N messages (default: never)")
    s.add_argument("--timeout", type=_duration, default=0.0, help="stop after (default: never)")
    common.add_json_option(s)
    s.set_defaults(func=cmd_msg_listen)
    s = actions.add_parser("outbox", help="messages waiting to be delivered or read")
    common.add_json_option(s)
    s.set_defaults(func=cmd_msg_outbox)
    p.set_defaults(func=lambda _a: common.usage(p))


def _duration(text: str) -> float:
    """`90`, `90s`, `30m`, `2h`, `7d` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    scale = units.get(text[-1:], 1)
    try:
        value = float(text[:-1] if text[-1:] in units else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return value


# -- talking to the daemon -------------------------------------------------------------------


def _client_call(
    args: argparse.Namespace,
    work: Callable[[Client], Awaitable[Any]],
    *,
    timeout: float | None = 60.0,
) -> Any:
    async def go() -> Any:
        client = await Client.connect(
            socket_path=args.socket, config_path=args.config, timeout=timeout
        )
        async with client:
            return await work(client)

    return asyncio.run(go())


def _call(
    args: argparse.Namespace,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    within: float = 60.0,
) -> Any:
    return _client_call(args, lambda c: c.request(method, params or {}, timeout=within))


# -- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from peerd.daemon import Daemon, tune_allocator  # noqa: PLC0415 - only `run` needs it

    config = load_config(common.config_path(args))
    tune_allocator()
    level = getattr(logging, args.log_level.upper())
    journald = "JOURNAL_STREAM" in os.environ  # journald stamps time and unit itself
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s"
        if journald
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosqlite logs every statement at DEBUG: that is its debugging, not ours.
    logging.getLogger("aiosqlite").setLevel(max(level, logging.INFO))
    asyncio.run(Daemon(config).run())
    return common.EXIT_OK


# -- status and peers ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    st = _call(args, "v1.status")
    if args.json:
        common.print_json(st)
        return common.EXIT_OK
    broker = st["broker"]
    print(f"node        {format_peer_id(st['peer_id'])}  ({st['name']})")
    print(f"network     {st['network']}")
    print(f"fingerprint {st['fingerprint']}")
    print(
        f"key         serial {st['serial']}, valid until {common.when(st['certificate_not_after'])}"
    )
    state = "connected" if broker["connected"] else "DISCONNECTED"
    if not broker["connected"] and broker.get("last_error"):
        state += f" ({broker['last_error']})"
    print(f"broker      {broker['url']}: {state}")
    peers = ", ".join(f"{n} {s}" for s, n in sorted(st["peers"].items())) or "none"
    print(f"peers       {peers}; {st['sessions']} session(s) up")
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


def cmd_peers(args: argparse.Namespace) -> int:
    peers = _call(args, "v1.peers")
    if args.json:
        common.print_json(peers)
        return common.EXIT_OK
    common.print_table(
        ["peer", "state", "via", "session", "serial", "fingerprint"],
        [
            [
                format_peer_id(p["peer"]),
                p["state"],
                p["source"] or "-",
                "up" if p["connected"] else "-",
                p["serial"] if p["serial"] is not None else "-",
                p["fingerprint"] or "-",
            ]
            for p in peers
        ],
    )
    return common.EXIT_OK


# -- trust -------------------------------------------------------------------------------------


def cmd_invite(args: argparse.Namespace) -> int:
    result = _call(args, "v1.invite.create", {"ttl": int(args.ttl), "note": args.note})
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
    result = _call(
        args,
        "v1.join",
        {"token": args.token.strip(), "timeout": args.timeout},
        within=args.timeout + 10,
    )
    if args.json:
        common.print_json(result)
    else:
        print(f"paired with {format_peer_id(result['peer'])} (fingerprint {result['fingerprint']})")
    return common.EXIT_OK


def _peer_result(args: argparse.Namespace, result: dict[str, Any], verb: str) -> int:
    if args.json:
        common.print_json(result)
    else:
        print(f"{format_peer_id(result['peer'])}: {result['state']} ({verb})")
    return common.EXIT_OK


def cmd_trust(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"peer": args.peer}
    if args.fingerprint:
        params["fingerprint"] = args.fingerprint
    return _peer_result(args, _call(args, "v1.trust", params), "trust")


def cmd_block(args: argparse.Namespace) -> int:
    return _peer_result(args, _call(args, "v1.block", {"peer": args.peer}), "block")


def cmd_rotate(args: argparse.Namespace) -> int:
    result = _call(args, "v1.rotate")
    if args.json:
        common.print_json(result)
    else:
        print(f"rotated: serial {result['serial']}, valid until {common.when(result['not_after'])}")
    return common.EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    if args.identity:
        from peerd.cli.authority import cmd_revoke_identity  # noqa: PLC0415 - imports this module

        return cmd_revoke_identity(args)
    result = _call(args, "v1.revoke", {"reason": args.reason})
    if args.json:
        common.print_json(result)
    else:
        print(
            f"revoked serials up to {result['revoked_through']}; now using serial "
            f"{result['serial']}"
        )
    return common.EXIT_OK


def cmd_connect(args: argparse.Namespace) -> int:
    result = _call(args, "v1.connect", {"peer": args.peer})
    if args.json:
        common.print_json(result)
    else:
        print(f"connecting to {format_peer_id(result['peer'])}")
    return common.EXIT_OK


# -- messages ----------------------------------------------------------------------------------


def cmd_msg_send(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.data == "-" else os.fsencode(args.data)
    result = _call(
        args,
        "v1.msg.send",
        {
            "peer": args.peer,
            "channel": args.channel,
            "data_b64": base64.b64encode(data).decode("ascii"),
            **({} if args.ttl is None else {"ttl": args.ttl}),
        },
    )
    if args.json:
        common.print_json(result)
    else:
        print(f"queued as {result['channel']}#{result['seq']} for {format_peer_id(result['peer'])}")
    return common.EXIT_OK


def cmd_msg_listen(args: argparse.Namespace) -> int:
    if args.count < 0:
        raise UsageError("--count cannot be negative")
    deadline = time.monotonic() + args.timeout if args.timeout else None

    async def listen(client: Client) -> int:
        seen = 0
        while not args.count or seen < args.count:
            wait = 30.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            limit = (args.count - seen) if args.count else 100
            msgs = await client.request(
                "v1.msg.recv",
                {"channel": args.channel, "wait": wait, "limit": limit},
                timeout=wait + 30,
            )
            for m in msgs:
                data = base64.b64decode(m["data_b64"])
                if args.json:
                    common.print_json(m)
                else:
                    sys.stdout.buffer.write(data)
                    if not data.endswith(b"\n"):
                        sys.stdout.buffer.write(b"\n")
                sys.stdout.flush()
                # Acknowledge after it is out: a crash here repeats a message, never loses one.
                await client.request("v1.msg.ack", {"ids": [m["id"]]})
                seen += 1
        return common.EXIT_OK

    code: int = _client_call(args, listen, timeout=None)
    return code


def cmd_msg_outbox(args: argparse.Namespace) -> int:
    result = _call(args, "v1.msg.outbox")
    if args.json:
        common.print_json(result)
        return common.EXIT_OK
    print("waiting for delivery:")
    common.print_table(
        ["peer", "channel", "messages", "bytes", "oldest"],
        [
            [
                format_peer_id(o["peer"]),
                o["channel"],
                o["messages"],
                o["bytes"],
                common.when(o["oldest"]),
            ]
            for o in result["outbox"]
        ],
    )
    print("\nreceived, not yet read:")
    common.print_table(
        ["channel", "messages", "bytes"],
        [[i["channel"], i["messages"], i["bytes"]] for i in result["inbox"]],
    )
    return common.EXIT_OK
