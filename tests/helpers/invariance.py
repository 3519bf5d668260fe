"""The batch invariance check of the exact forward (test_exact.py, test_compiled.py): random rows
(random prompts, random chains and trees) in one forward, each node's logits compared bitwise with
its path decoded alone."""

from __future__ import annotations

import random

import torch

from specdecode.models import BatchTarget
from specdecode.types import Draft


def _random_draft(rng: random.Random, vocab: int) -> Draft:
    n = rng.randint(0, 7)
    if rng.random() < 0.5:  # a chain
        parents = list(range(-1, n - 1))
    else:
        parents = [rng.randint(-1, i - 1) for i in range(n)]
    return Draft(torch.tensor([rng.randrange(vocab) for _ in range(n)], dtype=torch.long),
                 torch.tensor(parents, dtype=torch.long))


def _path(draft: Draft, node: int) -> list[int]:
    tokens, parents = draft.tokens.tolist(), draft.parents.tolist()
    path = []
    while node >= 0:
        path.append(tokens[node])
        node = parents[node]
    return path[::-1]


def _alone(model, prompt: list[int], path: list[int], exact: bool) -> torch.Tensor:
    """Logits after ``prompt`` + ``path`` decoded one token per forward (plain decoding)."""
    target = BatchTarget(model, exact=exact)
    row = target.add_row(len(prompt) + len(path) + 8)
    target.prefill(row, prompt[:-1])
    logits = None
    for tok in [prompt[-1]] + path:
        logits = target.step([tok], [Draft.empty()])[0][0]
        target.keep(row, [])
    return logits


def mismatches(model, exact: bool, trials: int, seed: int) -> int:
    """Trials with B random rows (random prompts, random chains and trees) in one forward, each
    node's logits compared bitwise with its path decoded alone; returns the nodes that differ."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    bad = 0
    for _ in range(trials):
        rows = rng.randint(1, 4)
        sizes = [rng.choice([rng.randint(2, 40), rng.randint(110, 300)]) for _ in range(rows)]
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in sizes]  # across windows
        drafts = [_random_draft(rng, vocab) for _ in range(rows)]
        target = BatchTarget(model, exact=exact)
        for prompt in prompts:
            target.add_row(len(prompt) + 16)
            target.prefill(len(target.lengths) - 1, prompt[:-1])
        out = target.step([p[-1] for p in prompts], drafts)
        for r, (prompt, draft) in enumerate(zip(prompts, drafts)):
            for node in range(-1, len(draft)):
                path = _path(draft, node) if node >= 0 else []
                bad += not torch.equal(out[r][node + 1], _alone(model, prompt, path, exact))
    return bad
