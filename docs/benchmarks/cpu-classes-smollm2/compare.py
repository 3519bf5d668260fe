"""MKL's float32 linears against oneDNN's packed ones (the AVX2 path, models/cpu.py), interleaved
in one process (same model, same cache, same drafts): median milliseconds per verification forward
over the pending token plus n draft nodes (chains; a 2-wide tree of 16) after `--context` tokens,
and c(n) = that / the plain step's. Run it on the AVX2 path: on an AVX2-only CPU as it is, on a
bigger one with `SPECDECODE_CPU_ISA=avx2` (which caps oneDNN and MKL at AVX2).
Usage: python compare.py [--target smollm2-135m] [--threads 2]"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from specdecode.cli.shared import load_models
from specdecode.models import cpu, lean, packed
from specdecode.models import BatchTarget
from specdecode.policies.cost import wide_tree
from specdecode.types import Draft

parser = argparse.ArgumentParser()
parser.add_argument("--target", default="smollm2-135m")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--context", type=int, default=256)
parser.add_argument("--repeats", type=int, default=12)
args = parser.parse_args()
torch.set_num_threads(args.threads)
print(cpu.cpu_path())
if not cpu.packs(torch.float32):
    raise SystemExit("this CPU path does not pack float32 linears (run it with SPECDECODE_CPU_ISA=avx2)")
model, _, _ = load_models(args.target, None, False, dtype="float32")
packed.packs = lambda dtype: False  # the forward as it was: MKL's float32 matmuls
forwards = {"MKL": lean.LeanForward(model)}
packed.packs = cpu.packs
forwards["packed"] = lean.LeanForward(model)
assert forwards["packed"].pack and not forwards["MKL"].pack
target = BatchTarget(model)
rng = random.Random(0)
prompt = [rng.randrange(target.vocab_size) for _ in range(args.context)]
row = target.add_row(args.context + 80)
target.prefill(row, prompt[:-1], last_only=True)
base = target.lengths[row]
counts = [0, 1, 2, 3, 4, 8, 16]
drafts = {}
for n in counts:
    drafts[(n, "chain")] = Draft.chain(torch.tensor([rng.randrange(target.vocab_size)
                                                     for _ in range(n)]))
tree = wide_tree(16)
tree.tokens = torch.tensor([rng.randrange(target.vocab_size) for _ in range(16)])
drafts[(16, "tree")] = tree
times: dict[tuple, list[float]] = {}
for rep in range(args.repeats + 2):  # two warm-up rounds
    for key, draft in drafts.items():
        for name, forward in forwards.items():
            setattr(model, lean._ATTR, forward)
            start = time.perf_counter()
            target.step([prompt[-1]], [draft])
            elapsed = time.perf_counter() - start
            target.lengths[row] = base
            if rep >= 2:
                times.setdefault((*key, name), []).append(elapsed * 1e3)
ms = {k: statistics.median(v) for k, v in times.items()}
print(f"{args.target}, float32, {args.threads} threads, context {args.context}, "
      f"torch {torch.__version__}, median of {args.repeats}")
print("| draft | MKL ms | packed ms | c(n) MKL | c(n) packed |")
print("|---|---|---|---|---|")
for n, shape in drafts:
    cells = [f"{ms[(n, shape, m)]:.1f}" for m in forwards] + [
        f"{ms[(n, shape, m)] / ms[(0, 'chain', m)]:.2f}" for m in forwards]
    print(f"| {shape} of {n} | " + " | ".join(cells) + " |")
