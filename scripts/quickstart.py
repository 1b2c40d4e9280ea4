"""See peerd work end to end on this machine, in about a minute: `./scripts/quickstart`.

It starts a private Mosquitto configured as peerd ships it (each node logs in with its peer id,
the ACL confines it to its own inbox), creates three nodes in a temporary directory with
`peerd init`, starts their daemons, pairs them by invite (`peerd invite` / `peerd join`),
writes a real .safetensors model of a few hundred MB (random weights), sends it from alice to
bob and carol in one transfer (`peerd send --wait`), checks that both received files hash-equal
to the source and that both daemons verified them, prints a summary, and removes everything:
daemons and broker stopped, directory deleted, also on failure or Ctrl-C. Exit status 0 only if
every check passed.

    ./scripts/quickstart [--size-mb 300] [--keep]

--size-mb (or $PEERD_QUICKSTART_MB) sets the model size; --keep leaves the directory (configs,
logs, files) for a look and prints where it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from peerd.client import SyncClient
from protocol.safetensors import header_length, parse_header
from scripts.evaluation.lab import Lab
from scripts.evaluation.model import ModelFile, sha256_file, write_model
from tests.support.broker import mosquitto_binary
from tests.support.cluster import CliError, Node, wait_until

MB = 1_000_000


_doing = ["starting"]  # what the quickstart was doing, for the one line a failure prints


def _step(what: str) -> None:
    _doing[0] = what


class Interrupted(Exception):
    """SIGTERM, SIGHUP or Ctrl-C: stop, clean up, exit non-zero."""


class Failed(Exception):
    """A check of the quickstart did not hold."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _say(step: str, text: str) -> None:
    print(f"  {step:<9} {text}", flush=True)


def _reason(exc: BaseException) -> str:
    """One line saying what went wrong."""
    if isinstance(exc, CliError):
        result = exc.result
        lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        cmd = " ".join(str(a) for a in result.args[5:6])
        return f"`peerd {cmd}` exited {result.returncode}: {lines[0] if lines else 'no output'}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no detail'}"


def _mosquitto_version() -> str:
    out = subprocess.run(
        [mosquitto_binary(), "-h"], capture_output=True, text=True, check=False
    ).stdout
    first = out.splitlines()[0] if out else ""
    return first.replace("mosquitto version", "Mosquitto").strip() or "Mosquitto"


def _join_handshake_ms(joiner: Node, inviter: Node) -> float:
    """The joiner's first handshake with the inviter (the invite's XXpsk3), as the joiner's
    daemon recorded it: from its first handshake message to the responder's confirmation."""
    with SyncClient(socket_path=joiner.socket) as client:
        records: list[dict[str, Any]] = client.call("v1.handshakes")
    first = next(r for r in records if r["peer"] == inviter.peer_id)
    return float(first["completed_at"] - first["started_at"]) * 1e3


def _check_received(node: Node, sender: Node, model: ModelFile, transfer_id: str) -> str:
    path = node.dir / "inbox" / sender.peer_id / model.path.name
    if not path.exists():
        raise Failed(f"{node.name} has no {model.path.name} in its inbox")
    digest = sha256_file(path)
    if digest != model.sha256:
        raise Failed(f"{node.name}'s copy differs from the source (sha256 {digest[:12]})")
    record = next((t for t in node.json("transfers") if t["id"] == transfer_id), None)
    if record is None or record["state"] != "verified":
        state = None if record is None else record["state"]
        raise Failed(f"{node.name}'s daemon reports the transfer as {state}, not verified")
    with path.open("rb") as f:
        prefix = f.read(8)
        n = header_length(prefix, model.size)
        header = parse_header(prefix + f.read(n), model.size)
    return f"sha256 {digest[:16]}… = source, {len(header.tensors)} tensors, daemon: verified"


def run(root: Path, size_mb: float) -> None:
    started = time.perf_counter()
    print("peerd quickstart: three nodes exchange a model file through an untrusted broker\n")
    _step("creating three nodes (peerd init)")
    with Lab(root, network="quickstart") as lab:
        alice, bob, carol = lab.add_nodes(["alice", "bob", "carol"])
        _step("starting Mosquitto")
        lab.start_broker()
        _say("broker", f"{_mosquitto_version()} on {lab.url}, configured as shipped:")
        _say("", "each node logs in as its peer id; the ACL lets it read only its own inbox")
        for node in (alice, bob, carol):
            _say(node.name, f"peer id {node.peer_id}  fingerprint {node.fingerprint}")
        _step("starting the daemons (peerd run)")
        lab.start_nodes([alice, bob, carol])
        _say("daemons", f"3 x `peerd run`, state under {root}")

        _step("pairing by invite (peerd invite, peerd join)")
        for joiner in (bob, carol):
            token = alice.cli("invite", "--note", joiner.name).strip()
            joiner.cli("join", token)
        # `join` returns when the joiner is paired; alice records the new peer a moment later.
        wait_until(
            lambda: all(
                alice.peers().get(n.peer_id, {}).get("state") == "trusted" for n in (bob, carol)
            ),
            30,
            what="alice to record bob and carol as trusted",
        )
        shakes = [_join_handshake_ms(n, alice) for n in (bob, carol)]
        _say(
            "paired",
            "bob, carol joined alice by invite: Noise XXpsk3 handshakes"
            f" {shakes[0]:.1f} ms, {shakes[1]:.1f} ms",
        )

        _step("writing the model file")
        model = write_model(root / "model.safetensors", int(size_mb * MB))
        _say(
            "model",
            f"{model.path.name}: {model.size / MB:.1f} MB, {model.tensors} tensors,"
            f" {model.parameters / 1e6:.1f} M parameters",
        )
        _say("", f"({model.description}, random weights)")

        _step("sending the model (peerd send --wait)")
        result = alice.json(
            "send",
            str(model.path),
            "--to",
            f"{bob.peer_id},{carol.peer_id}",
            "--wait",
            "--no-progress",
            timeout=600,
        )
        receivers = result["receivers"]
        seconds = result["finished_at"] - result["started_at"]
        states = {p: r["state"] for p, r in receivers.items()}
        if result["state"] != "verified" or set(states.values()) != {"verified"}:
            raise Failed(f"the transfer ended {result['state']}: receivers {states}")
        _say(
            "sent",
            f"alice -> bob + carol, one transfer: {seconds:.2f} s,"
            f" {model.size / seconds / MB:.0f} MB/s to each receiver",
        )

        _step("verifying the received files")
        for node in (bob, carol):
            check = _check_received(node, alice, model, result["id"])
            _say("verified" if node is bob else "", f"{node.name:<6} {check}")
    print(
        f"\nquickstart: OK in {time.perf_counter() - started:.0f} s: the model arrived intact and"
        " verified at both receivers; daemons and broker are stopped."
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/quickstart",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size-mb",
        type=float,
        default=float(os.environ.get("PEERD_QUICKSTART_MB", "300")),
        help="size of the model file in MB (default 300, or $PEERD_QUICKSTART_MB)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the directory for a look")
    args = parser.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    root = Path(tempfile.mkdtemp(prefix="peerd-quickstart-"))
    code = 0
    try:
        run(root, args.size_mb)
    except Interrupted as exc:
        print(f"\nquickstart: interrupted ({exc}); stopped everything it started", flush=True)
        code = 130
    except Exception as exc:  # noqa: BLE001 - any failure becomes one clear line and exit 1
        print(f"\nquickstart: FAILED while {_doing[0]}: {_reason(exc)}", flush=True)
        code = 1
    finally:
        # The Lab has stopped daemons and broker by now; only the directory is left.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if args.keep:
            print(f"quickstart: kept {root} (configs, daemon logs, files)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
