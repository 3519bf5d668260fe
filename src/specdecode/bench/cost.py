"""The target's verification cost curve c(n): wall time of one forward over the pending token plus n
draft nodes, on top of a cache of ``context`` tokens, as a chain and as a tree. Draft budgets are
chosen from this curve: drafting n nodes pays only when the expected extra tokens outweigh
c(n) / c(0) - 1."""

from __future__ import annotations

import random
import statistics
import time

import torch

from specdecode.models.hf import HFModel
from specdecode.types import Draft


def wide_tree(n: int) -> Draft:
    """A tree of n nodes with branching 2 near the root and chains below (a typical draft tree)."""
    parents: list[int] = []
    for i in range(n):
        parents.append(-1 if i < 2 else (i - 2))
    return Draft(torch.zeros(n, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


@torch.inference_mode()
def verify_cost_curve(model, node_counts: list[int], context: int = 256, repeats: int = 15,
                      seed: int = 0) -> list[dict]:
    """Median milliseconds per verification forward for each n in ``node_counts`` (chain and tree),
    interleaved so that drift hits every n alike."""
    target = HFModel(model)
    rng = random.Random(seed)
    prompt = [rng.randrange(target.vocab_size) for _ in range(context)]
    target.reset()
    target.extend(prompt[:-1], last_only=True)
    drafts = {}
    for n in node_counts:
        tokens = torch.tensor([rng.randrange(target.vocab_size) for _ in range(n)])
        chain = Draft.chain(tokens)
        tree = wide_tree(n)
        tree.tokens = tokens
        drafts[n] = {"chain": chain, "tree": tree}
    times: dict[tuple[int, str], list[float]] = {(n, s): [] for n in node_counts
                                                 for s in ("chain", "tree")}
    for rep in range(repeats + 2):  # two warm-up rounds
        for n in node_counts:
            for shape, draft in drafts[n].items():
                start = time.perf_counter()
                target.forward_tree(prompt[-1], draft)
                elapsed = time.perf_counter() - start
                target.keep([], len(draft))
                if rep >= 2:
                    times[(n, shape)].append(elapsed)
    base = statistics.median(times[(0, "chain")]) if 0 in node_counts else None
    rows = []
    for n in node_counts:
        row = {"nodes": n}
        for shape in ("chain", "tree"):
            ms = statistics.median(times[(n, shape)]) * 1e3
            row[f"{shape}_ms"] = round(ms, 3)
            if base:
                row[f"{shape}_ratio"] = round(ms / (base * 1e3), 3)
        rows.append(row)
    return rows
