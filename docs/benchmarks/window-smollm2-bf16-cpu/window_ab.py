"""Interleaved A/B of the exact attention's key window (32 against 128 tokens) on SmolLM2-135M,
bfloat16, 2 threads: median ms of one verification step over B rows of random lengths (80-600),
plain steps and 4-token chains, the two windows alternating step by step.
Usage: python window_ab.py B[,B...] SEED   (e.g. python window_ab.py 1,8,26 0)"""
import random
import statistics
import sys
import time

import torch

from specdecode.cli.shared import load_models
from specdecode.models import exact as ex
from specdecode.models import BatchTarget
from specdecode.types import Draft

torch.set_num_threads(2)
model, _, _ = load_models("smollm2-135m", None, False)
for B in [int(b) for b in sys.argv[1].split(",")]:
    rng = random.Random(B * 7 + int(sys.argv[2]))
    target = BatchTarget(model)
    lens = []
    for _ in range(B):
        n = rng.randint(80, 600)
        row = target.add_row(n + 200)
        target.prefill(row, [rng.randrange(1000) for _ in range(n)], last_only=True)
        lens.append(target.lengths[row])
    for k in (0, 4):
        drafts = [Draft.chain(torch.tensor([3] * k))] * B
        times = {32: [], 128: []}
        for rep in range(10):
            for w in (32, 128):
                ex.KEY_BLOCK = w
                s = time.perf_counter()
                target.step([5] * B, drafts)
                el = time.perf_counter() - s
                for r in range(B):
                    target.lengths[r] = lens[r]
                if rep >= 2:
                    times[w].append(el * 1e3)
        print(f"B={B} draft {k}: window 32 {statistics.median(times[32]):.1f} ms, "
              f"128 {statistics.median(times[128]):.1f} ms")
