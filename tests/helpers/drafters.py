"""Test-only drafters that exercise every acceptance pattern (TESTING.md L4). They are plain
objects with ``propose``/``observe``: the engine needs no registration or subclassing."""

from __future__ import annotations

import dataclasses
import random

import torch

from specdecode import Draft, DraftContext, Verdict
from specdecode.policies import Budget, StepRecord
from specdecode.policies.adaptive import AdaptivePolicy
from specdecode.policies.cost import CostModel


class OraclePrefixTree:
    """Proposes the reference continuation correctly for a random number of tokens, then a wrong
    token; adds random wrong siblings (and sometimes puts the right child after them) so that tree
    acceptance and out-of-order cache trimming are exercised."""

    def __init__(self, reference: list[int], vocab: int, seed: int, depth: int = 6,
                 siblings: int = 2) -> None:
        self.ref, self.vocab, self.depth, self.siblings = reference, vocab, depth, siblings
        self.rng = random.Random(seed)

    def propose(self, ctx: DraftContext) -> Draft:
        start = ctx.num_generated
        truth = self.ref[start:start + min(self.depth, ctx.max_depth)]
        good = self.rng.randint(0, len(truth))
        tokens, parents, prev = [], [], -1
        for d, tok in enumerate(truth):
            right = tok if d < good else (tok + 1) % self.vocab
            wrong = [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(0, self.siblings))]
            order = wrong + [right] if self.rng.random() < 0.5 else [right] + wrong
            node_of_right = None
            for t in order:
                if t == right and node_of_right is None:
                    node_of_right = len(tokens)
                tokens.append(t)
                parents.append(prev)
            prev = node_of_right
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def observe(self, verdict: Verdict) -> None:
        pass


class AntiOracle:
    """Always wrong: proposes tokens the reference does not have next."""

    def __init__(self, reference: list[int], vocab: int, k: int = 4) -> None:
        self.ref, self.vocab, self.k = reference, vocab, k

    def propose(self, ctx: DraftContext) -> Draft:
        start = ctx.num_generated
        if start >= len(self.ref):
            return Draft.empty()
        return Draft.chain([(self.ref[start] + 1) % self.vocab] * min(self.k, ctx.max_depth))

    def observe(self, verdict: Verdict) -> None:
        pass


class Exploding:
    """Raises on every other proposal and in observe: the engine must fall back to plain steps."""

    def __init__(self) -> None:
        self.calls = 0

    def propose(self, ctx: DraftContext) -> Draft:
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("drafter bug")
        return Draft.chain([10**9])  # outside the vocabulary: rejected by validation

    def observe(self, verdict: Verdict) -> None:
        raise RuntimeError("observe bug")


class FlakyPolicy:
    """A policy that drafts nothing on a random third of the steps and a random smaller budget on
    others: every drafter must survive being skipped and catch up (outputs stay identical)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.plain = 0

    def plan(self, max_nodes: int, max_depth: int) -> Budget:
        roll = self.rng.random()
        if roll < 1 / 3:
            self.plain += 1
            return Budget(0, 0)
        if roll < 2 / 3:
            return Budget(self.rng.randint(1, max_nodes), self.rng.randint(1, max_depth))
        return Budget(max_nodes, max_depth)

    def select(self, draft: Draft) -> Draft:
        return draft

    def observe(self, record: StepRecord) -> None:
        pass


def steep_adaptive() -> AdaptivePolicy:
    """The adaptive policy believing verification is expensive (each node costs a third of a step),
    so it turns drafting off and probes: its plain steps and probes run on real drafters."""
    return AdaptivePolicy(CostModel({n: 1e-3 * (1 + n / 3) for n in (0, 1, 2, 4, 8, 16, 64)}))


class _FreeDrafting:
    def add(self, depth: int, seconds: float, provisional: bool = False) -> None:
        pass

    def __call__(self, depth: int) -> float:
        return 0.0


class _FlatCost(CostModel):
    def observe(self, n: int, seconds: float, tree: bool = False) -> None:
        pass  # keeps believing verification is flat, whatever the timings say


def eager_adaptive() -> AdaptivePolicy:
    """The adaptive policy believing drafting is free and verification flat: on tiny test models
    (where a draft model costs as much as the target) it keeps drafting, so its ``select`` and
    ``min_score`` cuts are exercised on real drafts."""
    policy = _Clockless(_FlatCost({0: 1e-3, 64: 1.01e-3}))
    policy.draft_cost = _FreeDrafting()
    return policy


class _Clockless(AdaptivePolicy):
    """Sees every step as taking no time beyond its flat verification, so that its choices follow
    the acceptance alone, never the clock (a slow or busy machine would otherwise find the
    bookkeeping of spec steps dearer than the drafts' worth on tiny models, and stop drafting)."""

    def observe(self, record: StepRecord) -> None:
        super().observe(dataclasses.replace(record, draft_s=0.0, verify_s=1e-3, other_s=0.0))


_HEADS: dict[int, tuple] = {}


def trained_heads(target, steps: int = 60) -> tuple:
    """(EAGLE head, Medusa heads) trained for a moment on ``target``'s own samples (so their drafts
    are accepted now and then), cached per target; (None, None) without a target."""
    if target is None:
        return None, None
    if id(target) not in _HEADS:
        import copy
        import tempfile
        from pathlib import Path

        import numpy as np

        import specdecode as sd
        from specdecode.models.heads import load_head
        from specdecode.train.heads import HeadConfig, train_head

        vocab = int(target.config.vocab_size)
        rng = random.Random(0)
        rows = [sd.generate(target, [rng.randrange(vocab)], drafter="none", max_new_tokens=47,
                            temperature=1.0, seed=i, eos_token_id=[], policy="fixed").token_ids
                for i in range(24)]
        data = np.asarray([t for row in rows for t in row], dtype=np.int64)
        frozen = copy.deepcopy(target)
        heads = []
        for kind in ("eagle", "medusa"):
            out = Path(tempfile.mkdtemp(prefix=f"specdecode-test-{kind}-"))
            cfg = HeadConfig(kind=kind, steps=steps, batch_size=8, seq_len=32, lr=3e-3, warmup=5,
                             eval_batches=1, checkpoint_every=steps)
            train_head(frozen, data, data, out, cfg)
            heads.append(load_head(out / "head", kind, target)[0])
        _HEADS[id(target)] = (*heads, target)  # the target is kept so its id stays unique
    return _HEADS[id(target)][:2]


def eagle3_head(target, seed: int = 0, vocab: list[int] | None = None):
    """An untrained EAGLE-3 head for ``target``: its default feature layers, a reduced draft
    vocabulary (every other token id unless given), random weights seeded by ``seed``."""
    from specdecode.models.eagle3 import Eagle3Head, default_layers

    config = target.config
    torch.manual_seed(seed)
    layers = default_layers(config.num_hidden_layers)
    vocab = list(range(0, config.vocab_size, 2)) if vocab is None else vocab
    head = Eagle3Head(config.hidden_size, config.num_attention_heads, 64, layers, vocab)
    return head.to(next(target.parameters()).dtype).eval()
