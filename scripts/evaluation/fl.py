"""Federated averaging of a small MLP on scikit-learn's bundled digits (no download), with every
model update exchanged through a transport: peerd messages, or plaintext MQTT.

Three parties each hold a third of the training set (IID split). Each round every party trains
the current global model for one epoch of minibatch SGD on its own data, encodes the result as
a safetensors file (float32 tensors, with round, party and sample count as metadata), sends it
to the two others and receives theirs; then each party averages the three models weighted by
sample count, in party order. Every party thus computes the same global model, and the
arithmetic is numpy's, single-threaded, from fixed seeds: a run is a pure function of the seed
and of the bytes that arrive. Since both transports deliver exactly the bytes sent, two runs with
one seed give the same accuracy to the last bit, whichever transport carried them, and the
evaluation checks it (also each party's global model against the others', by hash).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from scripts.evaluation import model as st

PARTIES = 3
HIDDEN = 32
BATCH = 32
LEARNING_RATE = 0.1
TEST_FRACTION = 0.3

Params = dict[str, np.ndarray]


class Transport(Protocol):
    """Moves update bytes between parties 0..2."""

    async def send(self, src: int, dst: int, channel: str, data: bytes) -> None: ...

    async def receive(self, dst: int, channel: str, count: int) -> list[bytes]: ...


@dataclass(frozen=True)
class Data:
    x_train: list[np.ndarray]  # one shard per party
    y_train: list[np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray


def load(seed: int) -> Data:
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]  # noqa: PLC0415

    digits = load_digits()
    # A fixed scaling of the pixels (0-16) to roughly zero mean and unit variance: no party
    # needs statistics of another's data.
    x = ((digits.data / 16.0 - 0.3) * 3.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    shards = np.array_split(train, PARTIES)
    return Data([x[s] for s in shards], [y[s] for s in shards], x[test], y[test])


def init(seed: int, features: int = 64, classes: int = 10) -> Params:
    rng = np.random.default_rng([seed, 7])
    return {
        "fc1.weight": (rng.standard_normal((features, HIDDEN)) * np.sqrt(2 / features)).astype(
            np.float32
        ),
        "fc1.bias": np.zeros(HIDDEN, np.float32),
        "fc2.weight": (rng.standard_normal((HIDDEN, classes)) * np.sqrt(2 / HIDDEN)).astype(
            np.float32
        ),
        "fc2.bias": np.zeros(classes, np.float32),
    }


def _forward(p: Params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.maximum(x @ p["fc1.weight"] + p["fc1.bias"], 0)
    logits = hidden @ p["fc2.weight"] + p["fc2.bias"]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return hidden, probs


def train_epoch(p: Params, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Params:
    p = {k: v.copy() for k, v in p.items()}
    lr = np.float32(LEARNING_RATE)
    order = rng.permutation(len(y))
    for start in range(0, len(y), BATCH):
        idx = order[start : start + BATCH]
        xb, yb = x[idx], y[idx]
        hidden, probs = _forward(p, xb)
        grad = probs
        grad[np.arange(len(yb)), yb] -= 1
        grad /= np.float32(len(yb))
        g_w2 = hidden.T @ grad
        g_b2 = grad.sum(axis=0)
        g_hidden = (grad @ p["fc2.weight"].T) * (hidden > 0)
        g_w1 = xb.T @ g_hidden
        g_b1 = g_hidden.sum(axis=0)
        p["fc2.weight"] -= lr * g_w2
        p["fc2.bias"] -= lr * g_b2
        p["fc1.weight"] -= lr * g_w1
        p["fc1.bias"] -= lr * g_b1
    return p


def evaluate(p: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on (x, y)."""
    _, probs = _forward(p, x)
    accuracy = float((probs.argmax(axis=1) == y).mean())
    loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())
    return accuracy, loss


def average(models: list[Params], weights: list[int]) -> Params:
    """Weighted average in party order (float64 accumulation, float32 result)."""
    total = float(sum(weights))
    return {
        name: sum(
            (
                m[name].astype(np.float64) * (w / total)
                for m, w in zip(models, weights, strict=True)
            ),
            start=np.zeros_like(models[0][name], dtype=np.float64),
        ).astype(np.float32)
        for name in models[0]
    }


def digest(p: Params) -> str:
    return hashlib.sha256(st.encode(p)).hexdigest()


@dataclass
class RoundResult:
    round: int
    accuracy: float
    loss: float
    seconds: float
    update_bytes: int
    model_sha256: str


async def run(
    transport: Transport,
    *,
    seed: int,
    rounds: int,
    on_round: Callable[[RoundResult], Awaitable[None] | None] | None = None,
) -> list[RoundResult]:
    data = load(seed)
    weights = [len(y) for y in data.y_train]
    global_models = [init(seed) for _ in range(PARTIES)]
    results = []
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        channel = f"fl.round.{r}"

        async def party(
            i: int, r: int = r, channel: str = channel, start: list[Params] = global_models
        ) -> tuple[Params, int]:
            rng = np.random.default_rng([seed, r, i])
            local = train_epoch(start[i], data.x_train[i], data.y_train[i], rng)
            blob = st.encode(local, {"round": str(r), "party": str(i), "samples": str(weights[i])})
            await asyncio.gather(
                *(transport.send(i, j, channel, blob) for j in range(PARTIES) if j != i)
            )
            got = await transport.receive(i, channel, PARTIES - 1)
            models: dict[int, Params] = {i: local}
            for payload in got:
                tensors, meta = st.decode(payload)
                if (
                    meta.get("round") != str(r)
                    or int(meta["samples"]) != weights[int(meta["party"])]
                ):
                    raise RuntimeError(f"party {i} received a stray update: {meta}")
                models[int(meta["party"])] = tensors
            if sorted(models) != list(range(PARTIES)):
                raise RuntimeError(f"party {i} did not receive one update from each party")
            return average([models[k] for k in range(PARTIES)], weights), len(blob)

        outcome = await asyncio.gather(*(party(i) for i in range(PARTIES)))
        global_models = [m for m, _ in outcome]
        digests = {digest(m) for m in global_models}
        if len(digests) != 1:
            raise RuntimeError(f"round {r}: the parties' global models differ")
        accuracy, loss = evaluate(global_models[0], data.x_test, data.y_test)
        result = RoundResult(
            r,
            accuracy,
            loss,
            time.perf_counter() - started,
            outcome[0][1],
            digests.pop(),
        )
        results.append(result)
        if on_round is not None:
            maybe = on_round(result)
            if maybe is not None:
                await maybe
    return results


def rounds_to(results: list[RoundResult], target: float) -> int | None:
    return next((r.round for r in results if r.accuracy >= target), None)


class LocalTransport:
    """In-memory delivery (for checking the training itself, not a baseline)."""

    def __init__(self) -> None:
        self.boxes: dict[tuple[int, str], asyncio.Queue[bytes]] = {}

    def _box(self, dst: int, channel: str) -> asyncio.Queue[bytes]:
        return self.boxes.setdefault((dst, channel), asyncio.Queue())

    async def send(self, src: int, dst: int, channel: str, data: bytes) -> None:
        self._box(dst, channel).put_nowait(data)

    async def receive(self, dst: int, channel: str, count: int) -> list[bytes]:
        box = self._box(dst, channel)
        return [await box.get() for _ in range(count)]


def _main() -> None:
    results: list[Any] = asyncio.run(run(LocalTransport(), seed=1, rounds=30))
    for r in results:
        print(r.round, f"{r.accuracy:.4f}", f"{r.loss:.4f}", r.update_bytes, r.model_sha256[:12])


if __name__ == "__main__":
    _main()
