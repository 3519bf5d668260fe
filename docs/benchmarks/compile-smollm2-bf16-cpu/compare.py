"""Eager against compiled lean forward, interleaved in one process (same model, same cache, same
drafts): median milliseconds per verification forward of a chain and a tree of n draft nodes after
`--context` tokens. Usage: python compare.py [--target smollm2-135m] [--threads 2]"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from specdecode.cli.shared import load_models
from specdecode.models import compile_forward, warm_up
from specdecode.models import BatchTarget
from specdecode.models.lean import LeanForward
from specdecode.policies.cost import wide_tree
from specdecode.types import Draft

parser = argparse.ArgumentParser()
parser.add_argument("--target", default="smollm2-135m")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--context", type=int, default=256)
parser.add_argument("--repeats", type=int, default=12)
args = parser.parse_args()
torch.set_num_threads(args.threads)
model, _, _ = load_models(args.target, None, False)
compile_forward(model)
lean = LeanForward.build(model)
print(f"first calls (compiling): {warm_up(model):.1f} s")
forwards = {"eager": None, "compiled": lean.compiled}
target = BatchTarget(model)
rng = random.Random(0)
prompt = [rng.randrange(target.vocab_size) for _ in range(args.context)]
row = target.add_row(args.context + 80)
target.prefill(row, prompt[:-1], last_only=True)
base = target.lengths[row]
counts = [0, 4, 8, 16]
drafts = {}
for n in counts:
    tokens = torch.tensor([rng.randrange(target.vocab_size) for _ in range(n)])
    tree = wide_tree(n)
    tree.tokens = tokens
    drafts[n] = {"chain": Draft.chain(tokens), "tree": tree}
times: dict[tuple, list[float]] = {}
for rep in range(args.repeats + 2):  # two warm-up rounds
    for n in counts:
        for shape, draft in drafts[n].items():
            for name, functions in forwards.items():
                lean.compiled = functions
                start = time.perf_counter()
                target.step([prompt[-1]], [draft])
                elapsed = time.perf_counter() - start
                target.lengths[row] = base
                if rep >= 2:
                    times.setdefault((n, shape, name), []).append(elapsed * 1e3)
print(f"{args.target}, {next(model.parameters()).dtype}, {args.threads} threads, "
      f"context {args.context}, torch {torch.__version__}")
print("| nodes | chain eager ms | chain compiled ms | tree eager ms | tree compiled ms |")
print("|---|---|---|---|---|")
for n in counts:
    cells = [f"{statistics.median(times[(n, s, m)]):.1f}" for s in ("chain", "tree")
             for m in forwards]
    print(f"| {n} | " + " | ".join(cells) + " |")
