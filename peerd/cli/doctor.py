"""`peerd doctor`: check this node's configuration, files, brokers, clock, disk and sandbox
(peerd/doctor.py); a table or `--json`; exit 0 only when nothing fails."""

from __future__ import annotations

import argparse
from typing import Any

from peerd.cli import common


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check config, keys, store, brokers, clock, disk and sandbox; say what to fix",
        description="Check the configuration and the permissions of its secret files, the keys "
        "and the trust store, each broker URL (reachable, TLS, login, MQTT version, limits in "
        "force; the daemon's own connection while it is connected), the clock, the free space "
        "for the inbox and, under systemd, the unit's sandbox. Exit status 0 only when no "
        "check fails (warnings do not fail).",
    )
    p.add_argument(
        "--timeout",
        type=common.duration,
        default=5.0,
        help="how long to wait for each broker (default 5s)",
    )
    common.add_json_option(p)
    p.set_defaults(func=cmd_doctor)


def _daemon_status(args: argparse.Namespace) -> dict[str, Any] | None:
    from peerd.errors import ConfigError, PeerdError

    try:
        status: dict[str, Any] = common.call(args, "v1.status", within=10)
    except ConfigError:
        return None  # reported by the config check
    except PeerdError:
        return None  # not running, or not ours to ask: the checks connect themselves
    return status


def cmd_doctor(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from peerd.doctor import FAIL, diagnose, healthy

    daemon = _daemon_status(args)
    path = Path(common.config_path(args)).expanduser().absolute()
    findings = asyncio.run(diagnose(path, daemon=daemon, within=args.timeout))
    ok = healthy(findings)
    if args.json:
        common.print_json(
            {
                "healthy": ok,
                "config": str(path),
                "daemon_running": daemon is not None,
                "checks": [f.as_json() for f in findings],
            }
        )
    else:
        common.print_table(
            ["check", "status", "detail"],
            [
                [f.check, f.status.upper() if f.status == FAIL else f.status, f.detail]
                for f in findings
            ],
        )
        fixes = [f for f in findings if f.fix and f.status != "ok"]
        if fixes:
            print()
            for f in fixes:
                print(f"{f.check}: {f.fix}")
        print(f"\n{'healthy' if ok else 'NOT healthy'}")
    return common.EXIT_OK if ok else common.EXIT_FAILURE


__all__ = ["register"]
