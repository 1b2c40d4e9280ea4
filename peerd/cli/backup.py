"""`peerd backup FILE` and `peerd restore FILE`: the node's identity and trust store in one file
sealed with a passphrase (peerd/backup.py). Neither needs the daemon; restore refuses while it
runs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from peerd.cli import common
from peerd.errors import UsageError

PASSPHRASE_ENV = "PEERD_BACKUP_PASSPHRASE_FILE"  # noqa: S105 - a variable name


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "backup",
        help="write the node's identity and trust store to a file sealed with a passphrase",
        description="Copy the node's keys and trust store (peers, certificates, revocations, "
        "audit log, queued messages, transfer state) into FILE, encrypted with a key derived "
        "from a passphrase (Argon2id). Works while the daemon runs. Received files and the "
        "configuration are not included.",
    )
    p.add_argument("file", help="the backup file to write (never overwritten)")
    _passphrase_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_backup)

    p = subparsers.add_parser(
        "restore",
        help="put a backup's identity and trust store in place (the daemon must be stopped)",
        description="Restore the keys and trust store from FILE into the places the "
        "configuration names. Refuses while the daemon runs. An existing identity or store is "
        "replaced only with --force, and then moved aside (*.before-restore-TIME), not deleted.",
    )
    p.add_argument("file", help="the backup file")
    _passphrase_option(p)
    p.add_argument(
        "--force", action="store_true", help="replace an existing identity and store (kept aside)"
    )
    common.add_json_option(p)
    p.set_defaults(func=cmd_restore)


def _passphrase_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        default=os.environ.get(PASSPHRASE_ENV),
        help=f"read the passphrase from FILE (default: ${PASSPHRASE_ENV}; else it is asked for)",
    )


def _passphrase(args: argparse.Namespace, *, confirm: bool) -> bytes:
    import getpass

    from peerd.keystore import read_passphrase

    if args.passphrase_file:
        return read_passphrase(args.passphrase_file)
    if not sys.stdin.isatty():
        raise UsageError(
            "no passphrase: give --passphrase-file FILE, or run on a terminal to be asked"
        )
    first = getpass.getpass("backup passphrase: ")
    if not first:
        raise UsageError("the passphrase is empty")
    if confirm and getpass.getpass("again: ") != first:
        raise UsageError("the passphrases differ")
    return first.encode()


def cmd_backup(args: argparse.Namespace) -> int:
    # Imported here: every other command starts without the store and crypto modules.
    from peerd.backup import backup_to

    config = common.load(args)
    passphrase = _passphrase(args, confirm=True)
    path, backup = backup_to(config, args.file, passphrase)
    info = {"file": str(path), **backup.describe()}
    if args.json:
        common.print_json(info)
    else:
        print(
            f"backed up node {backup.peer_id} ({len(backup.keys)} key files, trust store "
            f"{len(backup.store) // 1024} KiB, schema {backup.schema_version}) to {path}"
        )
        print("keep the file and its passphrase apart: together they are this node's identity")
    return common.EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from peerd.backup import restore_from

    config = common.load(args)
    passphrase = _passphrase(args, confirm=False)
    restored = restore_from(config, args.file, passphrase, force=args.force)
    backup = restored.backup
    if args.json:
        common.print_json(
            {**backup.describe(), "moved_aside": [str(p) for p in restored.moved_aside]}
        )
        return common.EXIT_OK
    print(
        f"restored node {backup.peer_id} (backed up {common.when(backup.created_at)} by peerd "
        f"{backup.peerd_version}) into {config.keys.dir} and {config.node.store}"
    )
    for path in restored.moved_aside:
        print(f"the previous one is kept as {path}")
    return common.EXIT_OK
