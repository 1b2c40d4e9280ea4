"""`peerd authority ...` (the network authority, no daemon), `peerd membership ...`,
`peerd revocation publish`, `peerd succeed-identity`, and the identity side of `peerd revoke`.

Commands that change a node's keys talk to its daemon when one is running (so the change takes
effect at once) and otherwise work on the keys and the trust store directly. They fall back only
when nothing listens on the control socket: a daemon that is there but refuses, or that hangs
up mid-call, is an error, never a reason to write its files behind its back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from peerd.authority import (
    AuthorityKey,
    MembershipRequest,
    default_authority_dir,
    describe_membership,
    install_membership,
    membership_from_text,
    membership_to_text,
    request_for,
    retire_identity,
    statement_to_text,
    succeed_identity,
)
from peerd.cli import common
from peerd.cli.daemon import _call
from peerd.client import ConnectionLost, DaemonNotRunning
from peerd.config import Config, load_config
from peerd.errors import PeerdError, UsageError
from peerd.keystore import Keystore, read_membership, read_passphrase
from peerd.store import Store
from protocol.identity import (
    format_authority_key,
    format_peer_id,
    parse_peer_id,
)

common.EXIT_CODES.setdefault("AuthorityError", common.EXIT_FAILURE)
common.EXIT_CODES.setdefault("MembershipError", common.EXIT_DENIED)

PASSPHRASE_ENV = "PEERD_AUTHORITY_PASSPHRASE_FILE"  # noqa: S105 - a variable name


def register(subparsers: Any) -> None:
    _register_authority(subparsers)
    _register_membership(subparsers)

    p = subparsers.add_parser("revocation", help="carry revocation statements to the broker")
    actions = p.add_subparsers(dest="revocation_action", metavar="ACTION")
    s = actions.add_parser(
        "publish",
        help="verify a revocation statement, enforce it, push it to peers and retain it",
        description="Hand a revocation statement (peerd-revocation-1-..., as `peerd authority "
        "revoke` or `peerd revoke --identity` printed it) to this node's daemon: it verifies "
        "it, enforces it, pushes it to its connected peers and retains it on the broker so "
        "that nodes offline now learn it when they connect.",
    )
    s.add_argument("statement", help="the statement text")
    common.add_json_option(s)
    s.set_defaults(func=cmd_revocation_publish)
    p.set_defaults(func=lambda _a: common.usage(p))

    p = subparsers.add_parser(
        "succeed-identity",
        help="replace this node's identity key (peer id unchanged, fingerprint changes)",
        description="Create a new identity key, hand the peer id over to it with a succession "
        "record signed by the old key, and issue a new static key certificate. Peers take the "
        "new key at their next handshake (at once for connected peers) and refuse the old one "
        "from then on. In authority mode the membership names the old key: ask the authority "
        "for a new one (this command prints the request).",
    )
    common.add_json_option(p)
    p.set_defaults(func=cmd_succeed_identity)


def _register_authority(subparsers: Any) -> None:
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
            help="the authority directory (default: $PEERD_AUTHORITY_DIR, else "
            f"{default_authority_dir()})",
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


def _register_membership(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "membership", help="this node's membership certificate from the network authority"
    )
    actions = p.add_subparsers(dest="membership_action", metavar="ACTION")
    s = actions.add_parser(
        "request", help="print the request to give the network authority (no secret in it)"
    )
    common.add_json_option(s)
    s.set_defaults(func=cmd_membership_request)
    s = actions.add_parser(
        "install",
        help="install the certificate the authority issued (effective at once)",
    )
    s.add_argument("membership", help="the certificate text (peerd-membership-1-...)")
    common.add_json_option(s)
    s.set_defaults(func=cmd_membership_install)
    s = actions.add_parser("show", help="show the installed certificate and whether it is usable")
    common.add_json_option(s)
    s.set_defaults(func=cmd_membership_show)
    p.set_defaults(func=lambda _a: common.usage(p))


def _note(text: str) -> None:
    print(text, file=sys.stderr)


# -- the authority (no daemon) -------------------------------------------------------------------


def _dir(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir is not None else default_authority_dir()


def _authority_passphrase(args: argparse.Namespace) -> bytes | None:
    return None if not args.passphrase_file else read_passphrase(args.passphrase_file)


def _load_authority(args: argparse.Namespace) -> AuthorityKey:
    return AuthorityKey.load(_dir(args), passphrase=_authority_passphrase(args))


def cmd_authority_init(args: argparse.Namespace) -> int:
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
    _note(
        f"Authority key created in {key.dir}{' (sealed)' if result['sealed'] else ''}; keep it "
        "offline and backed up.\nPut its public key into every member's configuration:\n"
        f'  [network]\n  authority_key = "{key.key_text}"\n'
        "(or `peerd init --authority-key KEY` for a new node)."
    )
    return common.EXIT_OK


def cmd_authority_key(args: argparse.Namespace) -> int:
    public, sealed = AuthorityKey.read_public(_dir(args))
    text = format_authority_key(public)
    if args.json:
        common.print_json({"authority_key": text, "dir": str(_dir(args)), "sealed": sealed})
    else:
        print(text)
    return common.EXIT_OK


def _request_from_args(args: argparse.Namespace) -> MembershipRequest:
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
    try:
        request = MembershipRequest(args.network, parse_peer_id(member), identity)
        MembershipRequest.decode(request.encode())  # the same checks as a pasted request
    except PeerdError as exc:
        raise UsageError(str(exc)) from exc
    return request


def cmd_authority_issue(args: argparse.Namespace) -> int:
    request = _request_from_args(args)
    key = _load_authority(args)
    membership, record = key.issue(request, days=args.days, now=time.time())
    text = membership_to_text(membership)
    if args.json:
        common.print_json({**record, "membership": text})
        return common.EXIT_OK
    print(text)
    _note(
        f"membership of {format_peer_id(request.peer_id)} in network {request.network!r}, "
        f"valid until {common.when(membership.not_after)}\n"
        f"  member fingerprint: {request.fingerprint}  (compare it with the member's)\n"
        "On the member: peerd membership install TEXT"
    )
    return common.EXIT_OK


def cmd_authority_revoke(args: argparse.Namespace) -> int:
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
            published = _call(args, "v1.revocation.publish", {"statement": text})
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
            _note(
                f"{format_peer_id(peer)} expelled from {network!r}: published by this node's "
                f"daemon, pushed to {len(published['pushed'])} connected peer(s)"
            )
        else:
            why = "" if problem is None else f" (not published here: {problem.one_line()})"
            _note(
                f"{format_peer_id(peer)} expelled from {network!r} by this statement{why}.\n"
                "Publish it on any node of the network: peerd revocation publish TEXT"
            )
    if problem is not None and not isinstance(problem, DaemonNotRunning | common.ConfigError):
        return common.exit_code_for(problem)  # a daemon that refused it: say so
    return common.EXIT_OK


def cmd_authority_list(args: argparse.Namespace) -> int:
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


# -- the node: daemon first, else its files -----------------------------------------------------


def _daemon_or_offline(
    args: argparse.Namespace,
    method: str,
    params: dict[str, Any],
    offline: Callable[[Config], Coroutine[Any, Any, dict[str, Any]]],
) -> tuple[dict[str, Any], bool]:
    """(result, through the daemon?)."""
    try:
        result: dict[str, Any] = _call(args, method, params)
        return result, True
    except ConnectionLost:
        raise
    except DaemonNotRunning:
        pass
    config = load_config(common.config_path(args))
    return asyncio.run(offline(config)), False


def _load_keys(config: Config) -> Keystore:
    f = config.keys.passphrase_file
    return Keystore.load(
        config.keys.dir,
        now=time.time(),
        passphrase=None if f is None else read_passphrase(f),
        certificate_days=config.keys.certificate_days,
    )


def cmd_membership_request(args: argparse.Namespace) -> int:
    config = load_config(common.config_path(args))
    request = request_for(config.keys.dir, config.node.network)
    text = request.to_text()
    if args.json:
        common.print_json(
            {
                "request": text,
                "peer": request.peer_id,
                "network": request.network,
                "fingerprint": request.fingerprint,
                "identity_public": request.identity_public.hex(),
            }
        )
        return common.EXIT_OK
    print(text)
    _note(
        f"Give this to the authority of network {request.network!r}; it runs\n"
        "  peerd authority issue REQUEST\n"
        f"and should compare this fingerprint with you: {request.fingerprint}"
    )
    return common.EXIT_OK


def cmd_membership_install(args: argparse.Namespace) -> int:
    text = args.membership.strip()
    membership_from_text(text)  # a damaged paste is reported here, daemon or not

    async def offline(config: Config) -> dict[str, Any]:
        keys = _load_keys(config)
        return await common.with_store(
            config,
            lambda store: install_membership(
                keys,
                store,
                membership_from_text(text),
                network=config.node.network,
                authority_key=config.network.authority_public,
                now=time.time(),
            ),
        )

    result, live = _daemon_or_offline(args, "v1.membership.install", {"membership": text}, offline)
    if args.json:
        common.print_json({**result, "daemon": live})
        return common.EXIT_OK
    print(
        f"membership installed: network {result['network']!r}, valid until "
        f"{common.when(result['not_after'])}"
        + (" (in use now)" if live else " (used when the daemon starts)")
    )
    if not result["authority_configured"]:
        _note(
            "warning: [network] authority_key is not set in this node's configuration, so it "
            "does not trust other members; set it to "
            f"{result['authority_key']}"
        )
    return common.EXIT_OK


def cmd_membership_show(args: argparse.Namespace) -> int:
    config = load_config(common.config_path(args))
    membership = read_membership(config.keys.dir)
    if membership is None:
        if args.json:
            common.print_json(None)
        else:
            print("no membership certificate (ask the authority: peerd membership request)")
        return common.EXIT_FAILURE
    current = Keystore.read_public(config.keys.dir).identity_public
    configured = config.network.authority_public
    now = time.time()
    problems = []
    if membership.identity_public != current:
        problems.append("issued for an identity key this node has since replaced")
    if configured is None:
        problems.append("no [network] authority_key configured")
    elif membership.authority_public != configured:
        problems.append("signed by another authority than the configured one")
    if membership.network != config.node.network:
        problems.append(f"for network {membership.network!r}, not {config.node.network!r}")
    if now >= membership.not_after:
        problems.append("expired")
    elif now + 300 < membership.not_before:
        problems.append("not valid yet")
    info = {**describe_membership(membership), "usable": not problems, "problems": problems}
    if args.json:
        common.print_json(info)
        return common.EXIT_OK
    print(f"network      {info['network']}")
    print(f"peer id      {info['peer']}")
    print(f"fingerprint  {info['fingerprint']}")
    print(f"authority    {info['authority_key']}")
    print(
        f"valid        {common.when(membership.not_before)} .. {common.when(membership.not_after)}"
    )
    print(f"status       {'usable' if not problems else 'NOT USABLE: ' + '; '.join(problems)}")
    return common.EXIT_OK


def cmd_revocation_publish(args: argparse.Namespace) -> int:
    result = _call(args, "v1.revocation.publish", {"statement": args.statement.strip()})
    if args.json:
        common.print_json(result)
        return common.EXIT_OK
    what = "expelled by the authority" if result["kind"] == "authority" else "revoked"
    news = "" if result["changed"] else " (already known here: nothing changed)"
    print(
        f"{format_peer_id(result['peer'])} {what}{news}; retained on the broker, pushed to "
        f"{len(result['pushed'])} connected peer(s)"
    )
    return common.EXIT_OK


def cmd_succeed_identity(args: argparse.Namespace) -> int:
    async def offline(config: Config) -> dict[str, Any]:
        keys = _load_keys(config)

        async def work(store: Store) -> dict[str, Any]:
            _, result = await succeed_identity(
                keys, store, now=time.time(), certificate_days=config.keys.certificate_days
            )
            if result["membership_lost"]:
                result["membership_request"] = MembershipRequest(
                    config.node.network, keys.peer_id, keys.identity_public
                ).to_text()
            return result

        return await common.with_store(config, work)

    result, live = _daemon_or_offline(args, "v1.identity.succeed", {}, offline)
    if args.json:
        common.print_json({**result, "daemon": live})
        return common.EXIT_OK
    print(f"peer id      {result['peer']} (unchanged)")
    print(f"fingerprint  {result['fingerprint']} (was {result['previous_fingerprint']})")
    print(f"certificate  serial {result['serial']}")
    _note(
        "Peers take the new key at their next handshake"
        + (" (connected peers: now)." if live else " (when the daemon starts).")
        + " Tell peers who compare fingerprints the new one."
    )
    if result.get("membership_request"):
        _note(
            "Your membership names the old key: members refuse new sessions until you install a "
            "new one. Give this request to the authority:"
        )
        print(result["membership_request"])
    return common.EXIT_OK


def cmd_revoke_identity(args: argparse.Namespace) -> int:
    """`peerd revoke --identity`: retire this node for good (called from peerd.cli.daemon)."""
    if not args.yes:
        raise UsageError(
            "revoking the identity retires this node for good: every peer refuses it from then "
            "on and its daemon never starts again",
            hint="add --yes if that is what you want; `peerd revoke` alone revokes the static "
            "key and rotates",
        )

    async def offline(config: Config) -> dict[str, Any]:
        keys = _load_keys(config)
        statement = await common.with_store(
            config,
            lambda store: retire_identity(keys, store, reason=args.reason, now=time.time()),
        )
        return {
            "peer": keys.peer_id,
            "statement": statement_to_text(statement.encode()),
            "pushed": [],
            "published": False,
            "stopping": False,
        }

    result, live = _daemon_or_offline(
        args, "v1.revoke.identity", {"reason": args.reason, "confirm": True}, offline
    )
    if args.json:
        common.print_json({**result, "daemon": live})
        return common.EXIT_OK
    print(result["statement"])
    if live:
        state = (
            "retained on the broker"
            if result["published"]
            else "NOT confirmed by the broker (publish it again from another node)"
        )
        _note(
            f"{format_peer_id(result['peer'])} is revoked for good: {state}, pushed to "
            f"{len(result['pushed'])} connected peer(s). The daemon stops now and will not "
            "start again."
        )
    else:
        _note(
            f"{format_peer_id(result['peer'])} is revoked for good, but no daemon ran here to "
            "publish it: on another node run `peerd revocation publish TEXT`."
        )
    return common.EXIT_OK


__all__ = ["cmd_revoke_identity", "register"]
