"""Coverage-guided fuzzing (atheris, libFuzzer) of the decoders of outside input.

Hypothesis (the other tests of this package) mutates seeds blindly; this harness lets coverage
steer the mutations into branches a seed never reaches. It found the first bug in the project's
text parsers that the Hypothesis suite had missed (a Unicode-digit invite version).

Run: `python -m tests.fuzz.atheris_harness CORPUS_DIR [libFuzzer options]`; the corpus
directory is seeded from tests/fuzz/corpus.py. The first byte of an input picks the target.
Only `PeerdError` (and `ValueError` from `decode_line`, its documented error) may escape a
target; anything else is a crash that libFuzzer reports with the input that caused it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from peerd.authority import MembershipRequest, membership_from_text, statement_from_text
    from peerd.control import decode_line
    from protocol import frames
    from protocol.identity import (
        Credentials,
        InviteToken,
        KeyCertificate,
        decode_statement,
        parse_authority_key,
        parse_fingerprint,
        parse_peer_id,
    )
    from protocol.messaging import decode_app
    from protocol.safetensors import parse_header
    from protocol.transfer import Manifest, decode_message, parse_chunk_header

from protocol.errors import PeerdError
from tests.fuzz.corpus import NOW, make_world, seeds

WORLD = make_world()


def _text(fn: Callable[[str], object]) -> Callable[[bytes], object]:
    return lambda data: fn(data.decode("utf-8", "replace"))


def _invite(text: str) -> object:
    return InviteToken.from_text(text)


def _session(data: bytes) -> object:
    return WORLD.b.receive(data, NOW)  # documented never to raise


def _control_line(data: bytes) -> object:
    try:
        return decode_line(data)
    except ValueError:  # its documented error: the server answers a parse error
        return None


TARGETS: list[Callable[[bytes], object]] = [
    frames.decode,
    _session,
    decode_app,
    decode_message,
    Manifest.decode,
    parse_chunk_header,
    KeyCertificate.decode,
    decode_statement,
    Credentials.decode,
    lambda data: parse_header(data, len(data) + 64),
    _text(_invite),
    _text(parse_authority_key),
    _text(parse_peer_id),
    _text(parse_fingerprint),
    _control_line,
    _text(MembershipRequest.from_text),
    _text(membership_from_text),
    _text(statement_from_text),
]


def one(data: bytes) -> None:
    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    try:
        target(data[1:])
    except PeerdError:
        pass


def seed_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for kind, values in seeds().items():
        for i, value in enumerate(values):
            for t in range(len(TARGETS)):
                (directory / f"{kind}-{i}-{t}").write_bytes(bytes([t]) + value)


def main() -> None:
    corpus = Path(sys.argv[1])
    seed_corpus(corpus)
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
