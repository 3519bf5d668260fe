"""Exact enumeration of an acceptance rule's output distribution (TESTING.md L0).

All randomness of a step (the drafter's samples and the rule's draws) goes through a scripted
random source; replaying the step along every branch of its choices, with each branch's exact
probability, gives the exact distribution of the emitted tokens. Steps are chained until the horizon
is reached, memoised on the context, so the distribution of the first L tokens is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

VOCAB = 4


@cache
def _toy_probs(context: tuple[int, ...], salt: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(hash((context, salt)) % (2**31))
    weights = torch.rand(VOCAB, generator=gen, dtype=torch.float64) + 0.05
    zero = int(torch.randint(0, VOCAB + 1, (), generator=gen))  # VOCAB = none zeroed
    if zero < VOCAB:
        weights[zero] = 0.0
    return weights / weights.sum()


def toy_probs(context: tuple[int, ...], salt: int) -> torch.Tensor:
    """A context-dependent distribution over VOCAB tokens with some probabilities exactly 0."""
    return _toy_probs(context, salt).clone()


class Scripted:
    """Random source that follows a script of branch indices and records the options it met."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.pos, self.trace = script, 0, []  # trace: (chosen, n_options, weight)

    def _choose(self, options: list[tuple[object, float]]):
        options = [(v, w) for v, w in options if w > 0]
        idx = self.script[self.pos] if self.pos < len(self.script) else 0
        self.pos += 1
        self.trace.append((idx, len(options), options[idx][1]))
        return options[idx][0]

    def bernoulli(self, prob: float) -> bool:
        return self._choose([(True, float(prob)), (False, 1.0 - float(prob))])

    def categorical(self, probs: torch.Tensor) -> int:
        total = float(probs.sum())
        return self._choose([(i, float(p) / total) for i, p in enumerate(probs.tolist())])


def enumerate_step(step: Callable[[Scripted], list[int]]) -> dict[tuple[int, ...], float]:
    """Distribution of a step's emitted tokens: depth-first over every branch of its choices."""
    dist: dict[tuple[int, ...], float] = {}
    script: list[int] = []
    while True:
        rng = Scripted(list(script))
        out = tuple(step(rng))
        weight = 1.0
        for _, _, w in rng.trace:
            weight *= w
        dist[out] = dist.get(out, 0.0) + weight
        trace = rng.trace
        # odometer: advance the last choice that has options left
        while trace and trace[-1][0] + 1 >= trace[-1][1]:
            trace = trace[:-1]
        if not trace:
            return dist
        script = [c for c, _, _ in trace[:-1]] + [trace[-1][0] + 1]


def sequence_distribution(make_step, horizon: int) -> dict[tuple[int, ...], float]:
    """Exact distribution of the first ``horizon`` tokens when ``make_step(context)`` decodes."""

    @cache
    def rest(context: tuple[int, ...], need: int) -> tuple:
        out: dict[tuple[int, ...], float] = {}
        for emitted, p in enumerate_step(make_step(context)).items():
            if len(emitted) >= need:
                key = emitted[:need]
                out[key] = out.get(key, 0.0) + p
                continue
            for tail, q in rest(context + emitted, need - len(emitted)):
                key = emitted + tail
                out[key] = out.get(key, 0.0) + p * q
        return tuple(out.items())

    return dict(rest((), horizon))


def target_sequence_distribution(horizon: int) -> dict[tuple[int, ...], float]:
    out = {(): 1.0}
    for _ in range(horizon):
        nxt = {}
        for seq, p in out.items():
            for tok, q in enumerate(toy_probs(seq, 0).tolist()):
                if q > 0:
                    nxt[seq + (tok,)] = p * q
        out = nxt
    return out


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))
