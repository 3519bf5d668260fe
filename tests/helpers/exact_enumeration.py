"""Exact enumeration with rational numbers (TESTING.md L0): every probability is a ``Fraction``.

``ExactRow`` is a distribution row with the arithmetic the pure acceptance rules use (the same
methods as a 1-D torch tensor), so the rules of ``verify/`` run on it unchanged. ``ExactScript`` is
a random source that follows a script of branch indices and records each branch's exact weight;
``enumerate_step`` replays a step along every branch (depth first, odometer order), so the outcome
distribution of one step is exact, and ``sequence_distribution`` chains steps (memoised on the
context) up to a horizon. A float leaking into a draw fails loudly: exactness would be lost.

Toy drafts: ``chain_step`` samples a chain, ``tree_step`` a tree of a given shape (children of a
node drawn independently, or without replacement, in index order), from context-dependent toy
distributions with some probabilities exactly 0, then calls a rule
``rule(tokens, parents, target_rows, draft_rows, rng) -> (path, next token)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import cache
from typing import Any

import torch

from helpers.enumerate_rules import enumerate_step as float_enumerate_step
from specdecode.types import Draft
from specdecode.verify.spectr import recursive_rejection
from specdecode.verify.tree import children_lists


class ExactRow:
    """An immutable row of Fractions with tensor-like arithmetic."""

    __slots__ = ("values",)

    def __init__(self, values: Sequence[Any]) -> None:
        self.values = tuple(Fraction(v) for v in values)

    def __getitem__(self, i: int) -> Fraction:
        return self.values[i]

    def __len__(self) -> int:
        return len(self.values)

    def __sub__(self, other: ExactRow) -> ExactRow:
        return ExactRow([a - b for a, b in zip(self.values, other.values)])

    def __mul__(self, scalar: Any) -> ExactRow:
        return ExactRow([a * scalar for a in self.values])

    __rmul__ = __mul__

    def __truediv__(self, scalar: Any) -> ExactRow:
        return ExactRow([a / scalar for a in self.values])

    def clamp(self, min: Any = 0) -> ExactRow:  # noqa: A002 (torch's keyword)
        return ExactRow([a if a > min else Fraction(min) for a in self.values])

    def minimum(self, other: ExactRow) -> ExactRow:
        return ExactRow([a if a < b else b for a, b in zip(self.values, other.values)])

    def sum(self) -> Fraction:
        return sum(self.values, Fraction(0))

    def equal(self, other: ExactRow) -> bool:
        return self.values == other.values

    def without(self, token: int) -> ExactRow:
        """This row with ``token`` removed, renormalised (all zero if nothing is left)."""
        left = [Fraction(0) if i == token else a for i, a in enumerate(self.values)]
        total = sum(left)
        return ExactRow([a / total for a in left] if total else left)

    def tolist(self) -> list[Fraction]:
        return list(self.values)


class ExactScript:
    """Random source following a script of branch indices; ``trace`` holds (choice, options,
    weight) for every draw."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.pos, self.trace = script, 0, []

    def _choose(self, options: list[tuple[object, Fraction]]):
        options = [(v, w) for v, w in options if w > 0]
        idx = self.script[self.pos] if self.pos < len(self.script) else 0
        self.pos += 1
        self.trace.append((idx, len(options), options[idx][1]))
        return options[idx][0]

    def bernoulli(self, prob: Any) -> bool:
        assert isinstance(prob, (Fraction, int)), f"inexact probability {prob!r}"
        return self._choose([(True, Fraction(prob)), (False, 1 - Fraction(prob))])

    def categorical(self, row: ExactRow) -> int:
        assert isinstance(row, ExactRow), f"inexact row {row!r}"
        total = row.sum()
        return self._choose([(i, p / total) for i, p in enumerate(row.values)])


def enumerate_step(step: Callable[[ExactScript], Any]) -> dict[Any, Fraction]:
    """Exact distribution of ``step(rng)``'s (hashable) outcome over every branch of its draws."""
    dist: dict[Any, Fraction] = {}
    script: list[int] = []
    while True:
        rng = ExactScript(list(script))
        out = step(rng)
        weight = Fraction(1)
        for _, _, w in rng.trace:
            weight *= w
        dist[out] = dist.get(out, Fraction(0)) + weight
        trace = rng.trace
        while trace and trace[-1][0] + 1 >= trace[-1][1]:
            trace = trace[:-1]
        if not trace:
            return dist
        script = [c for c, _, _ in trace[:-1]] + [trace[-1][0] + 1]


@cache
def toy_row(context: tuple[int, ...], salt: int, vocab: int) -> ExactRow:
    """A context-dependent distribution with small denominators and often a zero or two."""
    rng = random.Random(f"{salt}|{vocab}|{context}")
    weights = [rng.choice((0, 1, 1, 2, 3, 4)) for _ in range(vocab)]
    if sum(weights) == 0:
        weights[rng.randrange(vocab)] = 1
    total = sum(weights)
    return ExactRow([Fraction(w, total) for w in weights])


def target_sequence_distribution(vocab: int, horizon: int) -> dict[tuple[int, ...], Fraction]:
    out = {(): Fraction(1)}
    for _ in range(horizon):
        nxt = {}
        for seq, p in out.items():
            for tok, q in enumerate(toy_row(seq, 0, vocab).values):
                if q > 0:
                    nxt[seq + (tok,)] = p * q
        out = nxt
    return out


def sequence_distribution(make_step: Callable[[tuple[int, ...]], Callable], horizon: int
                          ) -> dict[tuple[int, ...], Fraction]:
    """Exact distribution of the first ``horizon`` tokens; ``make_step(context)(rng)`` returns
    (emitted tokens, accepted count) and the steps are chained."""

    @cache
    def rest(context: tuple[int, ...], need: int) -> tuple:
        out: dict[tuple[int, ...], Fraction] = {}
        emitted_dist: dict[tuple[int, ...], Fraction] = {}
        for (emitted, _), p in enumerate_step(make_step(context)).items():
            emitted_dist[emitted] = emitted_dist.get(emitted, Fraction(0)) + p
        for emitted, p in emitted_dist.items():
            if len(emitted) >= need:
                out[emitted[:need]] = out.get(emitted[:need], Fraction(0)) + p
                continue
            for tail, q in rest(context + emitted, need - len(emitted)):
                out[emitted + tail] = out.get(emitted + tail, Fraction(0)) + p * q
        return tuple(out.items())

    return dict(rest((), horizon))


def total_variation(a: dict, b: dict) -> Fraction:
    return sum((abs(a.get(k, Fraction(0)) - b.get(k, Fraction(0))) for k in set(a) | set(b)),
               Fraction(0)) / 2


def expected_accepted(make_step: Callable[[tuple[int, ...]], Callable],
                      context: tuple[int, ...] = ()) -> Fraction:
    """E[accepted draft tokens] of one step from ``context``."""
    dist = enumerate_step(make_step(context))
    return sum((p * accepted for (_, accepted), p in dist.items()), Fraction(0))


Rule = Callable[[list[int], list[int], list[ExactRow], list[ExactRow], ExactScript],
                tuple[list[int], int]]


def tree_step(rule: Rule, parents: Sequence[int], vocab: int, *, replacement: bool = True,
              target_salt: int = 0, draft_salt: int = 1) -> Callable:
    """``make_step(context)``: draw a tree of this shape (parents before children), verify it.
    Without replacement each child is drawn from its parent's draft row minus the earlier siblings
    (renormalised; that row is its ``draft_rows`` entry); a child with nothing left to draw is
    dropped with its subtree."""

    def make_step(context: tuple[int, ...]) -> Callable:
        def step(rng: ExactScript) -> tuple[tuple[int, ...], int]:
            tokens: list[int] = []
            new_parents: list[int] = []
            rows: list[ExactRow] = []
            paths: list[tuple[int, ...]] = []
            index: dict[int, int] = {}  # shape node -> drawn node
            left: dict[int, ExactRow] = {}  # without replacement: what the next child draws from
            for node, parent in enumerate(parents):
                if parent >= 0 and parent not in index:
                    continue
                mapped = index[parent] if parent >= 0 else -1
                prefix = paths[mapped] if mapped >= 0 else ()
                row = left[mapped] if mapped in left else toy_row(context + prefix, draft_salt, vocab)
                if not row.sum() > 0:
                    continue
                token = rng.categorical(row)
                index[node] = len(tokens)
                tokens.append(token)
                new_parents.append(mapped)
                rows.append(row)
                paths.append(prefix + (token,))
                if not replacement:
                    left[mapped] = row.without(token)
            target_rows = [toy_row(context, target_salt, vocab)]
            target_rows += [toy_row(context + p, target_salt, vocab) for p in paths]
            path, nxt = rule(tokens, new_parents, target_rows, rows, rng)
            return tuple(tokens[i] for i in path) + (nxt,), len(path)

        return step

    return make_step


def chain_parents(k: int) -> list[int]:
    return list(range(-1, k - 1))


def token_level(tokens, parents, target_rows, draft_rows, rng) -> tuple[list[int], int]:
    """Recursive rejection sampling level by level (SpecInfer; RRSw on rows without replacement;
    plain token-level rejection sampling on a chain): the rule the others are compared with."""
    kids = children_lists(list(parents))
    path: list[int] = []
    node = -1
    while True:
        children = kids.get(node, [])
        if not children:
            return path, rng.categorical(target_rows[node + 1])
        chosen, residual = recursive_rejection(target_rows[node + 1], [draft_rows[c] for c in children],
                                               [tokens[c] for c in children], rng)
        if chosen is None:
            return path, rng.categorical(residual)
        node = children[chosen]
        path.append(node)


class FloatDraws:
    """The float harness's scripted source, also drawing from the toy drafter's exact rows."""

    def __init__(self, rng: Any) -> None:
        self.rng = rng

    def categorical(self, row: Any) -> int:
        if isinstance(row, ExactRow):
            row = torch.tensor([float(v) for v in row.values], dtype=torch.float64)
        return self.rng.categorical(row)

    def bernoulli(self, prob: Any) -> bool:
        return self.rng.bernoulli(float(prob))


def float_entry_gap(verify_fn: Callable, exact_rule: Rule, parents: Sequence[int], vocab: int,
                    context: tuple[int, ...], replacement: bool = False) -> float:
    """Largest difference between the step law of the engine entry ``verify_fn(draft,
    target_probs, rng)`` on float64 tensors (float enumeration) and that of the exact rule
    (Fractions), over the same toy trees; inf if their supports differ."""
    exact: dict = {}
    for (emitted, _), p in enumerate_step(tree_step(exact_rule, parents, vocab,
                                                    replacement=replacement)(context)).items():
        exact[emitted] = exact.get(emitted, Fraction(0)) + p

    def as_tensor(row: ExactRow) -> torch.Tensor:
        return torch.tensor([float(v) for v in row.values], dtype=torch.float64)

    def rule(tokens, parents, target_rows, draft_rows, rng):
        draft = Draft(torch.tensor(tokens), torch.tensor(parents),
                      torch.stack([as_tensor(r) for r in draft_rows]))
        verdict = verify_fn(draft, torch.stack([as_tensor(r) for r in target_rows]), rng)
        return verdict.path, verdict.tokens[-1]

    make_step = tree_step(rule, parents, vocab, replacement=replacement)
    floats = float_enumerate_step(lambda rng: make_step(context)(FloatDraws(rng))[0])
    if set(floats) != set(exact):
        return float("inf")
    return max(abs(floats[k] - float(exact[k])) for k in floats)
