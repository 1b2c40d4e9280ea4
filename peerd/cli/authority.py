"""`peerd authority ...`: the network authority's key, the membership certificates it signs and
the members it expels. No daemon and no node are needed (keep the authority directory offline);
`revoke` hands its statement to this machine's daemon when one runs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.cli import common
from peerd.errors import PeerdError, UsageError

if TYPE_CHECKING:
    from peerd.authority import AuthorityKey, MembershipRequest

common.EXIT_CODES.setdefault("AuthorityError", common.EXIT_FAILURE)

PASSPHRASE_ENV = "PEERD_AUTHORITY_PASSPHRASE_FILE"  # noqa: S105 - a variable name


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "authority",
        help="the network authority: its key, membership certificates, expulsions",
        description="The network authority signs membership certificates: nodes configured "
        "with its public key trust every member without pairing. These commands need no "
        "daemon; keep the authority directory offline.",
    )
    actions = p.add_subparsers(dest="authority_action", metavar="ACTION")

    def dir_options(s: argparse.ArgumentParser, *, passphrase: bool) -> None:
        s.add_argument(
            "--dir",
            type=Path,
            default=None,
            # Not computed here: that would load the key code for every `peerd` command.
            help="the authority directory (default: $PEERD_AUTHORITY_DIR, else "
            "$XDG_DATA_HOME/peerd/authority, ~/.local/share/peerd/authority)",
        )
        if passphrase:
            s.add_argument(
                "--passphrase-file",
                metavar="FILE",
                default=os.environ.get(PASSPHRASE_ENV),
                help=f"the passphrase sealing the authority key (default: ${PASSPHRASE_ENV})",
            )

    s = actions.add_parser("init", help="create the authority key and print its public key")
    dir_options(s, passphrase=True)
    common.add_json_option(s)
    s.set_defaults(func=cmd_authority_init)

    s = actions.add_parser("key", help="print the authority's public key again")
    dir_options(s, passphrase=False)
    common.add_json_option(s)
    s.set_defaults(func=cmd_authority_key)

    s = actions.add_parser(
        "issue",
        help="sign a membership certificate for a node",
        description="Sign a membership certificate. Give the member's request "
        "(peerd-member-request-1-..., from `peerd membership request`), or its peer id with "
        "--identity-key and --network. Compare the fingerprint shown with the member's over a "
        "channel you trust before you hand the certificate out.",
    )
    s.add_argument("member", help="the member's request text, or its peer id")
    s.add_argument(
        "--identity-key", metavar="HEX", help="the member's identity public key (peerd id --json)"
    )
    s.add_argument("--network", help="the network (required with a peer id)")
    s.add_argument("--days", type=float, default=365.0, help="validity (default 365 days)")
    dir_options(s, passphrase=True)
    common.add_json_option(s)
    s.set_defaults(func=cmd_authority_issue)

    s = actions.add_parser(
        "revoke",
        help="expel a member: sign an authority revocation and publish it",
        description="Sign an authority revocation of PEER. If a peerd daemon runs here (see "
        "--config), it publishes it at once: retained on the broker and pushed to its peers. "
        "The statement is printed in any case; publish it on any node of the network with "
        "`peerd revocation publish TEXT`.",
    )
    s.add_argument("peer", help="the member's peer id")
    s.add_argument("--reason", default="", help="why (kept in the signed statement)")
    s.add_argument("--network", help="the network (default: that of the member's last certificate)")
    s.add_argument("--no-publish", action="store_true", help="only print the statement")
    dir_options(s, passphrase=True)
    common.add_json_option(s)
    s.set_defaults(func=cmd_authority_revoke)

    s = actions.add_parser("list", help="the certificates and revocations this authority issued")
    dir_options(s, passphrase=False)
    common.add_json_option(s)
    s.set_defaults(func=cmd_authority_list)

    p.set_defaults(func=lambda _a: common.usage(p))


def _dir(args: argparse.Namespace) -> Path:
    from peerd.authority import default_authority_dir

    return Path(args.dir) if args.dir is not None else default_authority_dir()


def _authority_passphrase(args: argparse.Namespace) -> bytes | None:
    from peerd.keystore import read_passphrase

    return None if not args.passphrase_file else read_passphrase(args.passphrase_file)


def _load_authority(args: argparse.Namespace) -> AuthorityKey:
    from peerd.authority import AuthorityKey

    return AuthorityKey.load(_dir(args), passphrase=_authority_passphrase(args))


def cmd_authority_init(args: argparse.Namespace) -> int:
    from peerd.authority import AuthorityKey

    key = AuthorityKey.create(_dir(args), passphrase=_authority_passphrase(args))
    result = {
        "authority_key": key.key_text,
        "dir": str(key.dir),
        "sealed": bool(args.passphrase_file),
    }
    if args.json:
        common.print_json(result)
        return common.EXIT_OK
    print(key.key_text)
    common.note(
        f"Authority key created in {key.dir}{' (sealed)' if result['sealed'] else ''}; keep it "
        "offline and backed up.\nPut its public key into every member's configuration:\n"
        f'  [network]\n  authority_key = "{key.key_text}"\n'
        "(or `peerd init --authority-key KEY` for a new node)."
    )
    return common.EXIT_OK


def cmd_authority_key(args: argparse.Namespace) -> int:
    from peerd.authority import AuthorityKey

    public, sealed = AuthorityKey.read_public(_dir(args))
    from protocol.identity import format_authority_key

    text = format_authority_key(public)
    if args.json:
        common.print_json({"authority_key": text, "dir": str(_dir(args)), "sealed": sealed})
    else:
        print(text)
    return common.EXIT_OK


def _request_from_args(args: argparse.Namespace) -> MembershipRequest:
    from peerd.authority import MembershipRequest

    member = args.member.strip()
    if member.lower().startswith("peerd-member-request-"):
        request = MembershipRequest.from_text(member)
        if args.identity_key:
            raise UsageError("--identity-key comes with a peer id, not with a request")
        if args.network and args.network != request.network:
            raise UsageError(
                f"the request is for network {request.network!r}, not {args.network!r}"
            )
        return request
    if not args.identity_key or not args.network:
        raise UsageError(
            "give the member's request text, or its peer id with --identity-key and --network",
            hint="on the member: peerd membership request",
        )
    try:
        identity = bytes.fromhex(args.identity_key.strip())
    except ValueError:
        identity = b""
    if len(identity) != 32:
        raise UsageError("--identity-key is the 64 hex digits of `peerd id --json`")
    from protocol.identity import parse_peer_id

    try:
        request = MembershipRequest(args.network, parse_peer_id(member), identity)
        MembershipRequest.decode(request.encode())  # the same checks as a pasted request
    except PeerdError as exc:
        raise UsageError(str(exc)) from exc
    return request


def cmd_authority_issue(args: argparse.Namespace) -> int:
    from peerd.authority import membership_to_text

    request = _request_from_args(args)
    key = _load_authority(args)
    membership, record = key.issue(request, days=args.days, now=time.time())
    text = membership_to_text(membership)
    if args.json:
        common.print_json({**record, "membership": text})
        return common.EXIT_OK
    print(text)
    common.note(
        f"membership of {common.show_id(request.peer_id)} in network {request.network!r}, "
        f"valid until {common.when(membership.not_after)}\n"
        f"  member fingerprint: {request.fingerprint}  (compare it with the member's)\n"
        "On the member: peerd membership install TEXT"
    )
    return common.EXIT_OK


def cmd_authority_revoke(args: argparse.Namespace) -> int:
    from peerd.authority import AuthorityKey, statement_to_text
    from peerd.client import DaemonNotRunning
    from protocol.identity import parse_peer_id

    peer = parse_peer_id(args.peer)
    directory = _dir(args)
    network = args.network or AuthorityKey.network_of(directory, peer)
    if network is None:
        raise UsageError(
            f"this authority issued nothing to {peer}: say which network with --network"
        )
    key = _load_authority(args)
    statement, record = key.revoke(
        network=network, peer_id=peer, reason=args.reason, now=time.time()
    )
    text = statement_to_text(statement.encode())
    published: dict[str, Any] | None = None
    problem: PeerdError | None = None
    if not args.no_publish:
        try:
            published = common.call(args, "v1.revocation.publish", {"statement": text})
        except PeerdError as exc:
            problem = exc
    if args.json:
        common.print_json(
            {
                **record,
                "statement": text,
                "published": published is not None,
                "daemon": published,
                "error": None if problem is None else problem.one_line(),
            }
        )
    else:
        print(text)
        if published is not None:
            common.note(
                f"{common.show_id(peer)} expelled from {network!r}: published by this node's "
                f"daemon, pushed to {len(published['pushed'])} connected peer(s)"
            )
        else:
            why = "" if problem is None else f" (not published here: {problem.one_line()})"
            common.note(
                f"{common.show_id(peer)} expelled from {network!r} by this statement{why}.\n"
                "Publish it on any node of the network: peerd revocation publish TEXT"
            )
    if problem is not None and not isinstance(problem, DaemonNotRunning | common.ConfigError):
        return common.exit_code_for(problem)  # a daemon that refused it: say so
    return common.EXIT_OK


def cmd_authority_list(args: argparse.Namespace) -> int:
    from peerd.authority import AuthorityKey

    records = AuthorityKey.records(_dir(args))
    if args.json:
        common.print_json(records)
        return common.EXIT_OK
    common.print_table(
        ["time", "action", "peer", "network", "until / reason"],
        [
            [
                common.when(r.get("at")),
                r.get("action"),
                r.get("peer"),
                r.get("network"),
                common.when(r.get("not_after"))
                if r.get("action") == "membership"
                else r.get("reason"),
            ]
            for r in records
        ],
    )
    return common.EXIT_OK


__all__ = ["register"]
