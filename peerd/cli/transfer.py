"""`peerd send`, `peerd transfers`, `peerd cancel`, `peerd receive`: model files."""

from __future__ import annotations

import argparse
import os
import sys
import time

from peerd.cli import common
from peerd.errors import PeerdError, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see check_imports.py)
if TYPE_CHECKING:
    from typing import Any

    from peerd.control.blocking import ControlLink


class TransferFailed(PeerdError):
    """A transfer ended without every receiver verifying the file."""


common.EXIT_CODES.setdefault("TransferFailed", common.EXIT_FAILURE)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "send",
        help="send a file to trusted peers, end to end encrypted",
        description="Send FILE to one or more trusted peers. It is encrypted once and published "
        "once, whatever the number of receivers; each verifies the whole file and the "
        "sender's signature before it appears in its inbox. Offline peers get it when they "
        "come online (the transfer survives restarts), unless --timeout says otherwise.",
    )
    p.add_argument("file", help="the file to send")
    p.add_argument("--to", required=True, help="peer id(s), comma-separated")
    p.add_argument(
        "--wait",
        action="store_true",
        help="block until every receiver has verified the file (default: print the transfer id "
        "and return once it is queued)",
    )
    p.add_argument(
        "--timeout",
        type=common.duration,
        default=None,
        help="receivers that have not accepted within this time are dropped (e.g. 10m)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress display while --wait waits"
    )
    common.add_json_option(p)
    p.set_defaults(func=cmd_send)

    p = subparsers.add_parser("transfers", help="list transfers with their state and progress")
    common.add_json_option(p)
    p.set_defaults(func=cmd_transfers)

    p = subparsers.add_parser("cancel", help="cancel a transfer (either side)")
    p.add_argument("id", help="the transfer id (from `peerd send` or `peerd transfers`)")
    common.add_json_option(p)
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser("receive", help="wait for the next verified file and print its path")
    p.add_argument("--from", dest="peer", help="only from this peer")
    p.add_argument("--name", help="only a file of this name")
    p.add_argument("--timeout", type=common.duration, default=None, help="give up after (e.g. 10m)")
    common.add_json_option(p)
    p.set_defaults(func=cmd_receive)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _Progress:
    """A live, in-place progress display on stderr: one line per receiver."""

    def __init__(self, transfer: dict[str, Any], names: dict[str, str]) -> None:
        self.names = names
        self.size = max(1, transfer["size"])
        self.peers = transfer["peers"]
        self.start = time.monotonic()
        self.bytes = dict.fromkeys(self.peers, 0)
        self.state = dict.fromkeys(self.peers, "offered")
        self.drawn = 0
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.offline: dict[str, float] = {}  # receiver -> silent since (the daemon's event)

    def update(self, data: dict[str, Any]) -> None:
        peer = str(data.get("peer"))
        if peer not in self.bytes:
            return
        if "bytes" in data:
            self.bytes[peer] = data["bytes"]
        if data.get("accepted"):
            self.state[peer] = "sending"
        if data.get("verified"):
            self.state[peer] = "verified"
        if data.get("failed"):
            self.state[peer] = f"failed: {data.get('detail') or data['failed']}"
        if data.get("offline_since"):
            self.offline[peer] = data["offline_since"]
        if data.get("online") or data.get("verified") or data.get("failed"):
            self.offline.pop(peer, None)
        self.draw()

    def draw(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        lines = []
        for peer in self.peers:
            done = self.bytes[peer]
            rate = done / elapsed
            state = self.state[peer]
            frac = min(done / self.size, 1.0)
            if state != "verified":
                # Every byte acknowledged is not a verified file: 100% only once it is.
                frac = min(frac, 0.999)
            bar = "#" * int(frac * 30)
            eta = (self.size - done) / rate if rate > 0 and done < self.size else 0
            if state == "sending" and done < self.size:
                state = f"{_size(rate)}/s, ETA {eta:.0f}s"
            elif state == "sending":
                state = "all sent, the receiver verifies"
            if peer in self.offline:
                state = offline_text(self.offline[peer])
            label = self.names.get(peer) or common.show_id(peer)
            lines.append(f"{label[:23]:23} [{bar:30}] {frac * 100:5.1f}%  {state}")
        if self.tty:
            if self.drawn:
                sys.stderr.write(f"\x1b[{self.drawn}F")
            sys.stderr.write("".join(f"\x1b[2K{line}\n" for line in lines))
            self.drawn = len(lines)
        elif final:
            sys.stderr.write("".join(f"{line}\n" for line in lines))
        sys.stderr.flush()


def offline_text(since: float, name: str = "") -> str:
    """'bob offline since 12 s; waiting': a receiver the daemon has not heard from."""
    who = f"{name} " if name else ""
    return f"{who}offline since {max(0, int(time.time() - since))} s; waiting"


def _final_state(rec: dict[str, Any]) -> str:
    state = str(rec.get("state", "?"))
    detail = rec.get("detail")
    return f"{state} ({detail})" if detail and state.startswith("failed") else state


def _interrupted(link: ControlLink, tid: str) -> None:
    """Ctrl-C while `send --wait` waits: the transfer goes on in the daemon (it is queued and
    survives restarts), so say so, and how to stop it; at a terminal, offer to stop it now."""
    sys.stderr.write("\n")
    if sys.stdin.isatty() and sys.stderr.isatty():
        try:
            answer = input(f"interrupted. Cancel transfer {tid} too? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer.strip().lower() in ("y", "yes"):
            link.call("v1.cancel", {"id": tid}, timeout=10)
            common.note(f"transfer {tid}: cancelled")
            return
    common.note(
        f"interrupted: transfer {tid} goes on in the daemon; `peerd transfers` shows it, "
        f"`peerd cancel {tid}` stops it"
    )


def cmd_send(args: argparse.Namespace) -> int:
    peers = [p.strip() for p in args.to.split(",") if p.strip()]
    if not peers:
        raise UsageError("--to names no peer")
    path = os.path.abspath(args.file)
    if not os.path.isfile(path):
        raise UsageError(f"{args.file} is not a file")
    params: dict[str, Any] = {"path": path, "to": peers}
    if args.timeout is not None:
        params["timeout"] = args.timeout
    # Without --wait the command returns as soon as the transfer is queued (it survives restarts
    # and offline peers); progress is drawn only while waiting for the receivers.
    show = args.wait and not args.no_progress and not args.json

    def go(link: ControlLink) -> Any:
        if not args.wait:
            return link.call("v1.send", params)
        link.subscribe(["transfer.progress"])
        started = link.call("v1.send", params)
        tid = started["id"]
        # From here on the transfer exists: a Ctrl-C at any point (even before the wait
        # starts) says that it goes on and how to cancel it.
        try:
            names = common.peer_names(link)
            progress = _Progress(started, names) if show else None
            if not args.json:  # the id first: whatever happens while waiting, it is known
                to = ", ".join(common.with_name(p, names.get(p)) for p in started["peers"])
                common.note(f"transfer {tid}: {started['name']}, {_size(started['size'])}, to {to}")

            def on_event(name: str, data: Any) -> None:
                if progress is not None and isinstance(data, dict) and data.get("id") == tid:
                    progress.update(data)

            result = link.call("v1.transfer.wait", {"id": tid}, timeout=None, on_event=on_event)
        except KeyboardInterrupt:
            _interrupted(link, tid)
            raise
        if progress is not None:
            for peer, rec in result.get("receivers", {}).items():
                progress.bytes[peer] = rec.get("bytes", progress.bytes[peer])
                if not progress.state.get(peer, "").startswith("failed"):  # keep its detail
                    progress.state[peer] = _final_state(rec)
            progress.draw(final=True)
        return {**result, "_names": names}

    result = common.with_link(args, go)
    names: dict[str, str] = result.pop("_names", {})
    if args.json:
        common.print_json(result)
    else:
        state = result.get("state", "active")
        print(f"transfer {result['id']}: {state}")
        if note := savings(result):
            print(note)
    if args.wait and result.get("state") != "verified":
        failed = {
            p: _final_state(r)
            for p, r in result.get("receivers", {}).items()
            if r["state"] != "verified"
        }
        raise TransferFailed(
            "not every receiver verified the file: "
            + ", ".join(f"{common.with_name(p, names.get(p))} {s}" for p, s in failed.items())
        )
    return common.EXIT_OK


def savings(t: dict[str, Any]) -> str | None:
    """What deltas saved (protocol/SPEC.md 7.11): "sent 27 MB of 268 MB; 90% already at bob"
    for a send, "received 27 MB of 268 MB; 90% was already here" for a receive; None when
    nothing was reused."""
    size = t.get("size") or 0
    if size <= 0:
        return None
    if t.get("direction") == "send":
        held = {p: r.get("held_bytes", 0) for p, r in t.get("receivers", {}).items()}
        if not any(held.values()):
            return None
        at = ", ".join(
            f"{100 * h / size:.0f}% already at {common.show_id(p)}" for p, h in held.items()
        )
        return f"sent {_size(t.get('published_bytes', 0))} of {_size(size)}; {at}"
    reused = t.get("reused_bytes", 0)
    if not reused:
        return None
    return (
        f"received {_size(max(0, size - reused))} of {_size(size)};"
        f" {100 * reused / size:.0f}% was already here"
    )


def cmd_transfers(args: argparse.Namespace) -> int:
    def both(link: ControlLink) -> tuple[list[dict[str, Any]], dict[str, str]]:
        return link.call("v1.transfers"), common.peer_names(link)

    items, names = common.with_link(args, both)
    if args.json:
        common.print_json(items)
        return common.EXIT_OK
    rows = []
    for t in items:
        if t["direction"] == "send":
            receivers = t.get("receivers", {})
            done = sum(r.get("bytes", 0) for r in receivers.values())
            total = max(1, t["size"] * max(1, len(receivers)))
            who = ",".join(names.get(p) or common.show_id(p)[:11] for p in t["peers"])
        else:
            done, total = t.get("bytes", 0), max(1, t["size"])
            who = names.get(t["peers"][0]) or common.show_id(t["peers"][0])[:11]
        pct = 100.0 if t["state"] == "verified" else min(100.0, 100.0 * done / total)
        state = t["state"]
        for p, r in t.get("receivers", {}).items() if t["direction"] == "send" else ():
            if r.get("offline_since"):
                name = names.get(p) or common.show_id(p)[:11]
                state += f"; {offline_text(r['offline_since'], name)}"
        rows.append(
            [
                t["id"],
                t["direction"],
                t["name"],
                _size(t["size"]),
                who,
                state,
                f"{pct:.0f}%",
                common.when(t.get("started_at")),
                savings(t) or "",
            ]
        )
    common.print_table(
        ["id", "dir", "name", "size", "peers", "state", "done", "started", "delta"], rows
    )
    return common.EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    result = common.call(args, "v1.cancel", {"id": args.id})
    if args.json:
        common.print_json(result)
    else:
        print(f"transfer {result['id']}: cancelled")
    return common.EXIT_OK


def cmd_receive(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "since": time.time(),
        "wait": args.timeout if args.timeout is not None else 24 * 3600.0,
    }
    if args.peer:
        params["peer"] = args.peer
    if args.name:
        params["name"] = args.name
    result = common.call(args, "v1.transfer.received", params, within=params["wait"] + 30)
    if result is None:
        from peerd.client import Timeout

        raise Timeout("no file arrived in time")
    if args.json:
        common.print_json(result)
    else:
        print(result["path"])
    return common.EXIT_OK
