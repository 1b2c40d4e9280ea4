"""`peerd msg send|listen|outbox`: messages on named channels, through the running daemon."""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time

from peerd.cli import common
from peerd.errors import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see check_imports.py)
if TYPE_CHECKING:
    from typing import Any

    from peerd.control.blocking import ControlLink


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("msg", help="send and receive messages on named channels")
    actions = p.add_subparsers(dest="msg_action", metavar="ACTION")
    s = actions.add_parser("send", help="send a message (queued while the peer is offline)")
    s.add_argument("peer", help="the peer id")
    s.add_argument("channel", help="the channel name (letters, digits, . _ / -)")
    s.add_argument("data", nargs="?", default="-", help="the message, or - for stdin (default)")
    s.add_argument(
        "--ttl",
        type=common.duration,
        default=None,
        help="expire if undelivered after (default: [limits] message_ttl_days, 7d)",
    )
    common.add_json_option(s)
    s.set_defaults(func=cmd_msg_send)
    s = actions.add_parser("listen", help="print messages arriving on a channel")
    s.add_argument("channel", help="the channel name")
    s.add_argument("--count", type=int, default=0, help="stop after N messages (default: never)")
    s.add_argument(
        "--timeout", type=common.duration, default=0.0, help="stop after (default: never)"
    )
    common.add_json_option(s)
    s.set_defaults(func=cmd_msg_listen)
    s = actions.add_parser("outbox", help="messages waiting to be delivered or read")
    common.add_json_option(s)
    s.set_defaults(func=cmd_msg_outbox)
    p.set_defaults(func=lambda _a: common.usage(p))


def cmd_msg_send(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.data == "-" else os.fsencode(args.data)
    result = common.call(
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
        print(f"queued as {result['channel']}#{result['seq']} for {common.show_id(result['peer'])}")
    return common.EXIT_OK


def cmd_msg_listen(args: argparse.Namespace) -> int:
    if args.count < 0:
        raise UsageError("--count cannot be negative")
    deadline = time.monotonic() + args.timeout if args.timeout else None

    def listen(link: ControlLink) -> int:
        seen = 0
        while not args.count or seen < args.count:
            wait = 30.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            limit = (args.count - seen) if args.count else 100
            msgs = link.call(
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
                link.call("v1.msg.ack", {"ids": [m["id"]]})
                seen += 1
        if args.count and seen < args.count:
            # Like `receive`: a script piping `--count 1` into a file must not succeed on nothing.
            print(
                f"peerd: timed out after {seen} of {args.count} messages on {args.channel!r}",
                file=sys.stderr,
            )
            return common.EXIT_TIMEOUT
        return common.EXIT_OK

    code: int = common.with_link(args, listen)
    return code


def cmd_msg_outbox(args: argparse.Namespace) -> int:
    result = common.call(args, "v1.msg.outbox")
    if args.json:
        common.print_json(result)
        return common.EXIT_OK
    print("waiting for delivery:")
    common.print_table(
        ["peer", "channel", "messages", "bytes", "oldest"],
        [
            [
                common.show_id(o["peer"]),
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
