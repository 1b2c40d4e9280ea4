"""`scripts/bench NAME`: run one benchmark (or `all`) and print its table."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from datetime import UTC, datetime

# name -> (module under scripts.benchmarks, one-line description)
BENCHMARKS = {
    "noise": ("noise", "in-memory handshakes: ours vs noiseprotocol, hybrid vs classic"),
    "handshake": ("handshake", "sessions between daemons: latency vs the MQTT floor, 200 peers"),
    "transfer": ("transfer", "files between daemons: vs aiomqtt and scp, memory, fan-out, resume"),
    "erasure": ("erasure", "the WAL scrub after a commit that erases a secret, on a real store"),
    "wan": ("wan", "transfers across emulated 20-200 ms paths: vs the path, aiomqtt and scp"),
    "firstbyte": ("firstbyte", "time to first transfer byte at 20-200 ms (wan's, alone)"),
    "safetensors": ("safetensors", "checking a received header: the caps, memory, the loop"),
    "cli": ("cli", "a CLI command from the shell: vs a bare interpreter and vs peerd.Client"),
    "delta": ("delta", "new versions of a model: bytes on the wire vs rsync, no-gain cost"),
    "ws": ("ws", "MQTT over WebSocket vs over TCP, both clients, on a private RabbitMQ"),
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    args = parser.parse_args()
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    print(f"# peerd benchmarks, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"# {platform.node()}: {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}\n"
    )
    failed = 0
    for name in names:
        module = importlib.import_module(f"scripts.benchmarks.{BENCHMARKS[name][0]}")
        print(f"## {name}: {BENCHMARKS[name][1]}\n")
        ok: bool = module.run(quick=args.quick)
        failed += not ok
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
