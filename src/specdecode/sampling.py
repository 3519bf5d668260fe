"""Logits -> processed probabilities (the target's and the drafters'), the engine's random source,
and keyed (coupled) noise with the choices and rankings it makes.

Target and draft distributions go through the same ``processed_probs`` so that rejection sampling
compares like with like (docs/DESIGN.md §4).
"""

from __future__ import annotations

from typing import Protocol

import torch

from specdecode.types import SamplingParams


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), then softmax; float64, last dim = vocab.

    Greedy (temperature 0) is a point mass on the argmax (first index on exact ties).
    """
    logits = logits.to(torch.float64)
    if params.greedy:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    vocab = logits.size(-1)
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


class RandomSource(Protocol):
    """All randomness of the acceptance rules comes through these two draws (injectable)."""

    def bernoulli(self, prob: float) -> bool: ...

    def categorical(self, probs: torch.Tensor) -> int: ...


class TorchRandom:
    """The engine's random source: a seeded ``torch.Generator``.

    ``bernoulli(p)`` is ``u < p`` with ``u`` uniform on [0, 1), so a probability of exactly 0 is
    never accepted (the ``u <= p`` bug lets it through when u = 0).
    """

    def __init__(self, seed: int | None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def bernoulli(self, prob: float) -> bool:
        return self.uniform() < float(prob)

    def categorical(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.to(torch.float64), 1, generator=self.generator))


_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def keyed_gumbel(seed: int, positions: list[int], vocab: int) -> torch.Tensor:
    """Gumbel noise [len(positions), vocab], a pure function of (seed, absolute position)."""
    out = torch.empty(len(positions), vocab, dtype=torch.float64)
    gen = torch.Generator()
    for row, pos in enumerate(positions):
        gen.manual_seed(((seed * _MIX) ^ (pos * 0xBF58476D1CE4E5B9 + 1)) & _MASK)
        u = torch.rand(vocab, generator=gen, dtype=torch.float64)
        out[row] = -torch.log(-torch.log(u))
    return out


def coupled_choice(probs: torch.Tensor, seed: int, positions: list[int]) -> list[int]:
    """Gumbel-max token per row: argmax(log probs + keyed noise); zero-probability tokens never win."""
    scores = torch.log(probs) + keyed_gumbel(seed, positions, probs.size(-1))
    return scores.argmax(-1).tolist()


def draft_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """A drafter's next-token probabilities: processed like the target's when sampling, plain
    softmax under greedy (there they only rank and score candidates)."""
    return torch.softmax(logits.float(), -1) if params.greedy else processed_probs(logits, params)


def coupled_ranking(probs: torch.Tensor, seed: int, positions: list[int]) -> torch.Tensor:
    """Under coupled sampling the target emits argmax(log p + g) with keyed Gumbel noise g known in
    advance, so a drafter ranks candidates by softmax(log q + g): its own coupled choice first,
    then the tokens that would win were p a little different from q. Rows [n, V] (float64)."""
    noise = keyed_gumbel(seed, positions, probs.size(-1))
    return torch.softmax(torch.log(probs.double()) + noise, -1)
