"""Handshake patterns of the Noise Protocol Framework (revision 34), as data.

Every fundamental, one-way and deferred pattern of the specification is one entry of `PATTERNS`;
modifiers are applied to a pattern by `resolve_pattern`, so the engine itself never special-cases
a pattern name: PSK modifiers (`psk0`..`pskN`) and the KEM-based hybrid forward secrecy modifier
`hfs` (the Noise HFS extension, revision 1: tokens `e1` and `ekem1`), combinable with `+` and
applied in the order written (`XXhfs+psk0`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

from protocol.errors import LocalProtocolError


class Token(IntEnum):
    E = 1
    S = 2
    EE = 3
    ES = 4
    SE = 5
    SS = 6
    PSK = 7
    E1 = 8  # HFS: a fresh KEM key pair; its public key travels like a static key
    EKEM1 = 9  # HFS: encapsulate to the peer's e1; the ciphertext travels like a static key


_TOKEN_NAMES = {
    "e": Token.E,
    "s": Token.S,
    "ee": Token.EE,
    "es": Token.ES,
    "se": Token.SE,
    "ss": Token.SS,
    "psk": Token.PSK,
    "e1": Token.E1,
    "ekem1": Token.EKEM1,
}
_DH_TOKENS = frozenset({Token.EE, Token.ES, Token.SE, Token.SS})


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """A resolved pattern: pre-message keys and the token list of each message.

    Messages alternate initiator, responder, initiator ... starting with the initiator.
    """

    name: str
    initiator_pre: tuple[Token, ...]
    responder_pre: tuple[Token, ...]
    messages: tuple[tuple[Token, ...], ...]

    @property
    def one_way(self) -> bool:
        return len(self.messages) == 1

    @property
    def psk_count(self) -> int:
        return sum(msg.count(Token.PSK) for msg in self.messages)

    @property
    def hfs(self) -> bool:
        """Whether the pattern exchanges a KEM (the `hfs` modifier)."""
        return any(Token.E1 in msg for msg in self.messages)


# name: (initiator pre-message, responder pre-message, messages); each message is "->"/"<-"
# followed by comma-separated tokens, exactly as written in the specification.
_SOURCE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # One-way (section 7.4)
    "N": ("", "s", ("-> e, es",)),
    "K": ("s", "s", ("-> e, es, ss",)),
    "X": ("", "s", ("-> e, es, s, ss",)),
    # Fundamental interactive (section 7.5)
    "NN": ("", "", ("-> e", "<- e, ee")),
    "NK": ("", "s", ("-> e, es", "<- e, ee")),
    "NX": ("", "", ("-> e", "<- e, ee, s, es")),
    "XN": ("", "", ("-> e", "<- e, ee", "-> s, se")),
    "XK": ("", "s", ("-> e, es", "<- e, ee", "-> s, se")),
    "XX": ("", "", ("-> e", "<- e, ee, s, es", "-> s, se")),
    "KN": ("s", "", ("-> e", "<- e, ee, se")),
    "KK": ("s", "s", ("-> e, es, ss", "<- e, ee, se")),
    "KX": ("s", "", ("-> e", "<- e, ee, se, s, es")),
    "IN": ("", "", ("-> e, s", "<- e, ee, se")),
    "IK": ("", "s", ("-> e, es, s, ss", "<- e, ee, se")),
    "IX": ("", "", ("-> e, s", "<- e, ee, se, s, es")),
    # Deferred (section 18 of revision 34)
    "NK1": ("", "s", ("-> e", "<- e, ee, es")),
    "NX1": ("", "", ("-> e", "<- e, ee, s", "-> es")),
    "X1N": ("", "", ("-> e", "<- e, ee", "-> s", "<- se")),
    "X1K": ("", "s", ("-> e, es", "<- e, ee", "-> s", "<- se")),
    "XK1": ("", "s", ("-> e", "<- e, ee, es", "-> s, se")),
    "X1K1": ("", "s", ("-> e", "<- e, ee, es", "-> s", "<- se")),
    "X1X": ("", "", ("-> e", "<- e, ee, s, es", "-> s", "<- se")),
    "XX1": ("", "", ("-> e", "<- e, ee, s", "-> es, s, se")),
    "X1X1": ("", "", ("-> e", "<- e, ee, s", "-> es, s", "<- se")),
    "K1N": ("s", "", ("-> e", "<- e, ee", "-> se")),
    "K1K": ("s", "s", ("-> e, es", "<- e, ee", "-> se")),
    "KK1": ("s", "s", ("-> e", "<- e, ee, se, es")),
    "K1K1": ("s", "s", ("-> e", "<- e, ee, es", "-> se")),
    "K1X": ("s", "", ("-> e", "<- e, ee, s, es", "-> se")),
    "KX1": ("s", "", ("-> e", "<- e, ee, se, s", "-> es")),
    "K1X1": ("s", "", ("-> e", "<- e, ee, s", "-> se, es")),
    "I1N": ("", "", ("-> e, s", "<- e, ee", "-> se")),
    "I1K": ("", "s", ("-> e, es, s", "<- e, ee", "-> se")),
    "IK1": ("", "s", ("-> e, s", "<- e, ee, se, es")),
    "I1K1": ("", "s", ("-> e, s", "<- e, ee, es", "-> se")),
    "I1X": ("", "", ("-> e, s", "<- e, ee, s, es", "-> se")),
    "IX1": ("", "", ("-> e, s", "<- e, ee, se, s", "-> es")),
    "I1X1": ("", "", ("-> e, s", "<- e, ee, s", "-> se, es")),
}


def _tokens(text: str) -> tuple[Token, ...]:
    return tuple(_TOKEN_NAMES[t.strip()] for t in text.split(",") if t.strip())


def _build(name: str) -> HandshakePattern:
    ipre, rpre, msgs = _SOURCE[name]
    messages = []
    for i, msg in enumerate(msgs):
        arrow, _, rest = msg.partition(" ")
        expected = "->" if i % 2 == 0 else "<-"
        assert arrow == expected, f"{name}: message {i} must be {expected}"
        messages.append(_tokens(rest))
    return HandshakePattern(name, _tokens(ipre), _tokens(rpre), tuple(messages))


PATTERNS: dict[str, HandshakePattern] = {name: _build(name) for name in _SOURCE}

_MODIFIED = re.compile(r"([NKXI]1?[NKX]?1?)(.*)")
_PSK_MODIFIER = re.compile(r"psk(\d{1,2})")


def _apply_psk(text: str, messages: list[list[Token]], n: int) -> None:
    if n == 0:
        messages[0].insert(0, Token.PSK)
    elif n <= len(messages):
        messages[n - 1].append(Token.PSK)
    else:
        raise LocalProtocolError(f"{text}: psk{n} names a message the pattern does not have")


def _apply_hfs(text: str, messages: list[list[Token]]) -> None:
    """HFS revision 1, section 5: `e1` goes after the first `e`, or after the first DH of that
    message if it has one (so that the KEM public key is encrypted); `ekem1` goes directly after
    the first `ee`. (The HFS table writes KKhfs as `e, e1, es, ss`, against its own rule; we
    follow the rule, as the snow implementation does.)"""
    for msg in messages:
        if Token.E in msg:
            dhs = [i for i, t in enumerate(msg) if t in _DH_TOKENS]
            msg.insert(dhs[0] + 1 if dhs else msg.index(Token.E) + 1, Token.E1)
            break
    for msg in messages:
        if Token.EE in msg:
            msg.insert(msg.index(Token.EE) + 1, Token.EKEM1)
            return
    raise LocalProtocolError(f"{text}: hfs needs a pattern with an ee token")


def resolve_pattern(text: str) -> HandshakePattern:
    """`XXpsk3` -> the XX pattern with a psk token appended to its third message;
    `XXhfs+psk0` -> XX with the HFS KEM tokens, then a psk token before its first message."""
    match = _MODIFIED.fullmatch(text)
    if match is None or match.group(1) not in PATTERNS:
        raise LocalProtocolError(f"unknown Noise handshake pattern {text!r}")
    base = PATTERNS[match.group(1)]
    if not match.group(2):
        return base
    modifiers = match.group(2).split("+")
    if len(set(modifiers)) != len(modifiers):
        raise LocalProtocolError(f"{text}: a modifier appears twice")
    messages = [list(m) for m in base.messages]
    for modifier in modifiers:
        if modifier == "hfs":
            if base.one_way:
                raise LocalProtocolError(f"{text}: hfs needs an interactive pattern")
            _apply_hfs(text, messages)
        elif psk := _PSK_MODIFIER.fullmatch(modifier):
            _apply_psk(text, messages, int(psk.group(1)))
        else:
            raise LocalProtocolError(f"unknown Noise handshake pattern {text!r}")
    return HandshakePattern(
        text, base.initiator_pre, base.responder_pre, tuple(tuple(m) for m in messages)
    )
