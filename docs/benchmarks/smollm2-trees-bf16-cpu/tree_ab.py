"""Interleaved A/B of the exact tree attention on SmolLM2-135M (bfloat16, 2 threads): before (each
node's whole key window gathered for it; the module as of commit 3ebb034, saved as
work/exact_old.py: `git show 3ebb034:src/specdecode/models/exact.py > work/exact_old.py`) and
after (one gathered layout per root-to-leaf chain). Median ms of one verification step per tree
shape, the two alternating step by step. Usage: python tree_ab.py CONTEXT (e.g. 300, 1000)

It swaps the attention the way the code did up to commit 33226f0 (a registered exact attention and
``models/hf.py``); run it in a checkout of that commit (``git worktree add /tmp/old 33226f0``)."""
import random
import statistics
import sys
import time

import torch
from transformers import AttentionInterface

sys.path.insert(0, "work")
import exact_old

from specdecode.cli_shared import load_models
from specdecode.models import exact as exact_new
from specdecode.models import hf
from specdecode.models.attention import EXACT_ATTENTION
from specdecode.models.hf import BatchTarget
from specdecode.policies.cost import wide_tree
from specdecode.types import Draft

torch.set_num_threads(2)
model, _, _ = load_models("smollm2-135m", None, False)
impls = {"before": (exact_old._exact_attention, exact_old.exact_plan),
         "after": (exact_new._exact_attention, exact_new.exact_plan)}


def bushy(n, width):  # `width` branches from the root, each a chain
    parents = []
    for i in range(n):
        parents.append(-1 if i < width else i - width)
    return Draft(torch.zeros(n, dtype=torch.long), torch.tensor(parents))


context = int(sys.argv[1]) if len(sys.argv) > 1 else 300
target = BatchTarget(model)
rng = random.Random(0)
prompt = [rng.randrange(target.vocab_size) for _ in range(context)]
row = target.add_row(context + 80)
target.prefill(row, prompt[:-1], last_only=True)
base = target.lengths[row]
shapes = {"chain8": Draft.chain(torch.zeros(8, dtype=torch.long)), "2x8": wide_tree(16),
          "4x4": bushy(16, 4), "8x2": bushy(16, 8), "16x1": bushy(16, 16), "4x8": bushy(32, 4)}
times = {}
for rep in range(12):
    for name, d in shapes.items():
        d.tokens = torch.tensor([rng.randrange(1000) for _ in range(len(d))])
        for impl, (attn, plan) in impls.items():
            AttentionInterface.register(EXACT_ATTENTION, attn)
            hf.exact_plan = plan
            s = time.perf_counter()
            target.step([prompt[-1]], [d])
            el = time.perf_counter() - s
            target.lengths[row] = base
            if rep >= 2:
                times.setdefault((name, impl), []).append(el * 1e3)
print(f"context {context}: " + ", ".join(
    f"{n} {statistics.median(times[(n, 'before')]):.1f} -> "
    f"{statistics.median(times[(n, 'after')]):.1f} ms" for n in shapes))
