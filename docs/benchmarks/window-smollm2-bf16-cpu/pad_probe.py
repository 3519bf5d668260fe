"""Is the bfloat16 exact attention's result bitwise unchanged when its key window is padded with
masked keys? (If it were, rows with different windows could share one call; it is not.)
Usage: python pad_probe.py [threads]"""
import sys

import torch

from specdecode.models.exact import _attend, additive

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
gen = torch.Generator().manual_seed(0)
bad = total = 0
for dim, kv, group in ((64, 3, 3), (64, 2, 1), (128, 1, 4), (8, 2, 2)):
    for E in (32, 64, 96, 160, 256, 288, 512, 544, 1024, 1056):
        for extra in (32, 64, 128, 256, 512):
            E2 = E + extra
            for rows in (4, 6, 12, 51):
                q = torch.randn(1, kv, rows, dim, generator=gen).bfloat16()
                k = torch.randn(1, kv, E2, dim, generator=gen).bfloat16()
                v = torch.randn(1, kv, E2, dim, generator=gen).bfloat16()
                pos = torch.randint(E - 32, E, (rows,), generator=gen)
                vis = torch.arange(E2)[None] <= pos[:, None]
                a = _attend(q, k[:, :, :E], v[:, :, :E], additive(vis[:, :E])[None, None][0], 0.125)
                b = _attend(q, k, v, additive(vis)[None, None][0], 0.125)
                total += 1
                if not torch.equal(a, b):
                    bad += 1
                    if bad < 10:
                        gap = (a.float() - b.float()).abs().max().item()
                        print("differs", dim, kv, group, E, E2, rows, gap)
print(f"{bad} of {total} differ")
