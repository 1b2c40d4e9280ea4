"""`peerd init`, `peerd id`, `peerd audit verify|show`: identity and trust store, no daemon.

`peerd init` creates the node: its configuration file, its keys and its trust store. With
`--state-dir DIR` everything lives under DIR (DIR/peerd.toml, DIR/keys, DIR/peerd.db, DIR/run),
so several nodes can share one machine (`peerd --config DIR/peerd.toml ...`); without it the
system paths are used. It never overwrites an identity; an init interrupted after the keys were
written is completed by running it again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.cli import common
from peerd.errors import UsageError

if TYPE_CHECKING:
    from peerd.config import Config
    from peerd.keystore import Keystore
    from peerd.store import Store


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "init",
        help="create this node's identity, configuration and trust store",
        description="Create this node's identity keys, configuration file and trust store. "
        "Refuses to overwrite an existing identity.",
    )
    p.add_argument("--name", help="a name for this node, shown to people (default: host name)")
    p.add_argument("--network", help="the network to join (default: peerd)")
    p.add_argument(
        "--broker",
        metavar="URL",
        action="append",
        help="mqtt[s]://host:port, or ws[s]://host:port/path (WebSocket); repeat it for the"
        " nodes of a cluster (the node moves to the next when one is lost)",
    )
    p.add_argument("--broker-user", metavar="NAME", help="the user name to log in to the broker as")
    p.add_argument(
        "--broker-password-file",
        metavar="FILE",
        help="a file holding the broker password (read by the daemon at each connect)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep everything of this node under DIR (config DIR/peerd.toml, keys, store, socket)",
    )
    p.add_argument(
        "--passphrase-file", metavar="FILE", help="seal the private keys with this passphrase"
    )
    p.add_argument(
        "--authority-key", metavar="KEY", help="trust members certified by this network authority"
    )
    common.add_json_option(p)
    p.set_defaults(func=cmd_init)

    p = subparsers.add_parser("id", help="print this node's peer id and fingerprint")
    common.add_json_option(p)
    p.set_defaults(func=cmd_id)

    p = subparsers.add_parser("audit", help="check or show the trust event log")
    actions = p.add_subparsers(dest="audit_action", metavar="ACTION")
    v = actions.add_parser("verify", help="check the hash chain of the trust event log")
    common.add_json_option(v)
    v.set_defaults(func=cmd_audit_verify)
    s = actions.add_parser("show", help="print the trust event log")
    s.add_argument("--after", type=int, default=0, metavar="SEQ", help="entries after SEQ")
    s.add_argument("--limit", type=int, default=100, metavar="N", help="at most N entries")
    common.add_json_option(s)
    s.set_defaults(func=cmd_audit_show)
    p.set_defaults(func=lambda _a: common.usage(p))


# -- init ----------------------------------------------------------------------------------------


def _init_config_path(args: argparse.Namespace) -> Path:
    from peerd.config import CONFIG_NAME

    if args.config:
        return Path(args.config)
    if args.state_dir:
        return Path(args.state_dir) / CONFIG_NAME
    return Path(common.config_path(args))


def _init_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "node": {"name": args.name, "network": args.network},
        "broker": {
            "url": args.broker[0] if args.broker and len(args.broker) == 1 else None,
            "urls": args.broker if args.broker and len(args.broker) > 1 else None,
            "username": args.broker_user,
            "password_file": args.broker_password_file,
        },
        "keys": {"passphrase_file": args.passphrase_file},
        "network": {"authority_key": args.authority_key},
    }


def cmd_init(args: argparse.Namespace) -> int:
    import asyncio

    from peerd.config import default_config, load_config, render_config
    from peerd.keystore import Keystore, write_file_atomic

    path = _init_config_path(args).expanduser().absolute()
    settings = _init_settings(args)
    given = [
        f"--{k.replace('_', '-')}"
        for k in (
            "name",
            "network",
            "broker",
            "broker_user",
            "broker_password_file",
            "passphrase_file",
            "authority_key",
        )
        if getattr(args, k)
    ]
    if path.exists():
        if given:
            raise UsageError(
                f"the configuration {path} exists; {', '.join(given)} would not change it",
                hint="edit the file, or run `peerd init` without those options to use it",
            )
        config = load_config(path)
        write_config = False
    else:
        config = default_config(args.state_dir, settings)
        write_config = True
    now = time.time()
    resumed = Keystore.exists(config.keys.dir)
    keystore = _init_keys(config, now)
    asyncio.run(_init_store(config, keystore, now))
    if write_config:
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_file_atomic(path, render_config(config).encode("utf-8"), mode=0o644)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    _make_dirs(config, under_state_dir=args.state_dir is not None)
    result = {
        "peer_id": keystore.peer_id,
        "fingerprint": keystore.fingerprint,
        "name": config.node.name,
        "network": config.node.network,
        "config": str(path),
        "state_dir": str(config.node.state_dir),
        "resumed": resumed,
    }
    if args.json:
        common.print_json(result)
        return common.EXIT_OK
    if resumed:
        print("Completed an init that was interrupted after the keys were written.")
    print(f"Created node {config.node.name!r} in network {config.node.network!r}.")
    print(f"  peer id      {keystore.peer_id}")
    print(f"  fingerprint  {keystore.fingerprint}")
    print(f"  config       {path}")
    print(f"  state        {config.node.state_dir}")
    if config.keys.passphrase_file is not None:
        print(f"  keys sealed with the passphrase in {config.keys.passphrase_file}")
    from peerd import locate

    # Found without --config (the per-user or system file, or $PEERD_CONFIG)? Then say so.
    found = locate.config_file().expanduser().absolute() == path
    run = "peerd run" if found else f"peerd --config {path} run"
    print(f"Next: start the daemon ({run}) and pair with a peer (peerd invite / peerd join).")
    return common.EXIT_OK


def _passphrase(config: Config) -> bytes | None:
    from peerd.keystore import read_passphrase

    f = config.keys.passphrase_file
    return None if f is None else read_passphrase(f)


def _init_keys(config: Config, now: float) -> Keystore:
    import asyncio

    from peerd.keystore import IdentityExists, Keystore

    keys_dir = config.keys.dir
    passphrase = _passphrase(config)
    if Keystore.exists(keys_dir):
        store_path = config.node.store
        if store_path.exists() and asyncio.run(_store_has_identity(config)):
            raise IdentityExists(
                f"this node is already initialised (keys in {keys_dir}, store {store_path})",
                hint="`peerd id` shows it; use another --state-dir for another node",
            )
        # The keys were written but the store was not: complete that init.
        return Keystore.load(
            keys_dir,
            now=now,
            passphrase=passphrase,
            certificate_days=config.keys.certificate_days,
        )
    config.node.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Keystore.create(
        keys_dir, now=now, certificate_days=config.keys.certificate_days, passphrase=passphrase
    )


async def _store_has_identity(config: Config) -> bool:
    from peerd.store import open_store

    store = await open_store(config)
    try:
        return store.identity is not None
    finally:
        await store.close()


async def _init_store(config: Config, keystore: Keystore, now: float) -> None:
    from peerd.keystore import IdentityExists
    from peerd.store import open_store

    store = await open_store(config, create=True)
    try:
        if store.identity is not None:
            if store.identity.peer_id != keystore.peer_id:
                raise IdentityExists(
                    f"the store {store.path} belongs to another node ({store.identity.peer_id})"
                )
            return
        await store.init_identity(
            peer_id=keystore.peer_id,
            name=config.node.name,
            identity_public=keystore.identity_public,
            certificate=keystore.certificate,
            now=now,
        )
    finally:
        await store.close()


def _make_dirs(config: Config, *, under_state_dir: bool) -> None:
    dirs = [(config.node.inbox_dir, 0o750)]
    if under_state_dir:  # /run/peerd is systemd's (RuntimeDirectory=); DIR/run is ours
        dirs.append((config.node.runtime_dir, 0o750))
    for directory, mode in dirs:
        try:
            directory.mkdir(mode=mode, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {directory}: {exc.strerror}") from exc


# -- id ------------------------------------------------------------------------------------------


def cmd_id(args: argparse.Namespace) -> int:
    from peerd.keystore import Keystore, NoIdentity

    config = common.load(args)
    try:
        public = Keystore.read_public(config.keys.dir)
    except NoIdentity as exc:
        exc.hint = f"run `peerd init` (config {config.path})"
        raise
    cert = public.certificate
    result: dict[str, Any] = {
        "peer_id": public.peer_id,
        "peer_id_display": common.show_id(public.peer_id),
        "fingerprint": public.fingerprint,
        "identity_public": public.identity_public.hex(),
        "name": config.node.name,
        "network": config.node.network,
        "identity_successions": len(public.successions),
        "sealed": public.sealed,
        "certificate": None
        if cert is None
        else {
            "serial": cert.serial,
            "static_public": cert.static_public.hex(),
            "not_before": cert.not_before,
            "not_after": cert.not_after,
        },
    }
    if args.json:
        common.print_json(result)
        return common.EXIT_OK
    print(f"peer id      {public.peer_id}")
    print(f"fingerprint  {public.fingerprint}")
    print(f"name         {config.node.name}")
    print(f"network      {config.node.network}")
    if cert is not None:
        print(f"certificate  serial {cert.serial}, valid until {common.when(cert.not_after)}")
    return common.EXIT_OK


# -- audit ---------------------------------------------------------------------------------------


def cmd_audit_verify(args: argparse.Namespace) -> int:
    import asyncio

    from peerd.store import AuditError

    config = common.load(args)

    async def verify(store: Store) -> Any:
        return await store.verify_log()

    try:
        report = asyncio.run(common.with_store(config, verify))
    except AuditError as exc:
        if not args.json:
            raise
        common.print_json({"ok": False, "broken_at": exc.seq, "problem": exc.problem})
        return common.EXIT_FAILURE
    if args.json:
        common.print_json({"ok": True, "entries": report.entries, "head": report.head.hex()})
    else:
        print(f"audit log OK: {report.entries} entries, head {report.head.hex()[:16]}")
    return common.EXIT_OK


def cmd_audit_show(args: argparse.Namespace) -> int:
    import asyncio

    config = common.load(args)

    async def show(store: Store) -> Any:
        return await store.events(after=args.after, limit=args.limit)

    events = asyncio.run(common.with_store(config, show))
    if args.json:
        common.print_json(
            [
                {
                    "seq": e.seq,
                    "at": e.at,
                    "kind": e.kind,
                    "peer_id": e.peer_id,
                    "detail": dict(e.detail),
                    "hash": e.hash.hex(),
                }
                for e in events
            ]
        )
        return common.EXIT_OK
    common.print_table(
        ["seq", "time", "event", "peer", "detail"],
        [
            [
                e.seq,
                common.when(e.at),
                e.kind,
                e.peer_id or "",
                " ".join(f"{k}={v}" for k, v in sorted(e.detail.items())),
            ]
            for e in events
        ],
    )
    return common.EXIT_OK


__all__ = ["register"]
