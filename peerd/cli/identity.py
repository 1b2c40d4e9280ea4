"""This node's identity beyond its static key: `peerd membership ...` (its certificate from the
network authority), `peerd revocation publish`, `peerd succeed-identity`, and the identity side
of `peerd revoke`.

Commands that change a node's keys talk to its daemon when one is running (so the change takes
effect at once) and otherwise work on the keys and the trust store directly
(`common.daemon_or_offline`).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from peerd.cli import common
from peerd.errors import UsageError

if TYPE_CHECKING:
    from peerd.config import Config
    from peerd.keystore import Keystore
    from peerd.store import Store

common.EXIT_CODES.setdefault("MembershipError", common.EXIT_DENIED)


def register(subparsers: Any) -> None:
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


# -- the node: daemon first, else its files -----------------------------------------------------


def _load_keys(config: Config) -> Keystore:
    from peerd.keystore import Keystore, read_passphrase

    f = config.keys.passphrase_file
    return Keystore.load(
        config.keys.dir,
        now=time.time(),
        passphrase=None if f is None else read_passphrase(f),
        certificate_days=config.keys.certificate_days,
    )


def cmd_membership_request(args: argparse.Namespace) -> int:
    from peerd.authority import request_for

    config = common.load(args)
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
    common.note(
        f"Give this to the authority of network {request.network!r}; it runs\n"
        "  peerd authority issue REQUEST\n"
        f"and should compare this fingerprint with you: {request.fingerprint}"
    )
    return common.EXIT_OK


def cmd_membership_install(args: argparse.Namespace) -> int:
    from peerd.authority import install_membership, membership_from_text

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

    result, live = common.daemon_or_offline(
        args, "v1.membership.install", {"membership": text}, offline
    )
    if args.json:
        common.print_json({**result, "daemon": live})
        return common.EXIT_OK
    print(
        f"membership installed: network {result['network']!r}, valid until "
        f"{common.when(result['not_after'])}"
        + (" (in use now)" if live else " (used when the daemon starts)")
    )
    if not result["authority_configured"]:
        common.note(
            "warning: [network] authority_key is not set in this node's configuration, so it "
            "does not trust other members; set it to "
            f"{result['authority_key']}"
        )
    return common.EXIT_OK


def cmd_membership_show(args: argparse.Namespace) -> int:
    from peerd.authority import describe_membership
    from peerd.keystore import Keystore, read_membership

    config = common.load(args)
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
    result = common.call(args, "v1.revocation.publish", {"statement": args.statement.strip()})
    if args.json:
        common.print_json(result)
        return common.EXIT_OK
    what = "expelled by the authority" if result["kind"] == "authority" else "revoked"
    news = "" if result["changed"] else " (already known here: nothing changed)"
    print(
        f"{common.show_id(result['peer'])} {what}{news}; retained on the broker, pushed to "
        f"{len(result['pushed'])} connected peer(s)"
    )
    return common.EXIT_OK


def cmd_succeed_identity(args: argparse.Namespace) -> int:
    from peerd.authority import MembershipRequest, succeed_identity

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

    result, live = common.daemon_or_offline(args, "v1.identity.succeed", {}, offline)
    if args.json:
        common.print_json({**result, "daemon": live})
        return common.EXIT_OK
    print(f"peer id      {result['peer']} (unchanged)")
    print(f"fingerprint  {result['fingerprint']} (was {result['previous_fingerprint']})")
    print(f"certificate  serial {result['serial']}")
    common.note(
        "Peers take the new key at their next handshake"
        + (" (connected peers: now)." if live else " (when the daemon starts).")
        + " Tell peers who compare fingerprints the new one."
    )
    if result.get("membership_request"):
        common.note(
            "Your membership names the old key: members refuse new sessions until you install a "
            "new one. Give this request to the authority:"
        )
        print(result["membership_request"])
    return common.EXIT_OK


def cmd_revoke_identity(args: argparse.Namespace) -> int:
    """`peerd revoke --identity`: retire this node for good (called from peerd.cli.daemon)."""
    from peerd.authority import retire_identity, statement_to_text

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

    result, live = common.daemon_or_offline(
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
        common.note(
            f"{common.show_id(result['peer'])} is revoked for good: {state}, pushed to "
            f"{len(result['pushed'])} connected peer(s). The daemon stops now and will not "
            "start again."
        )
    else:
        common.note(
            f"{common.show_id(result['peer'])} is revoked for good, but no daemon ran here to "
            "publish it: on another node run `peerd revocation publish TEXT`."
        )
    return common.EXIT_OK


__all__ = ["cmd_revoke_identity", "register"]
