"""One draft forward (1 new token after 300 of context) of a SmolLM2 draft model, reading out its
reduced vocabulary and then the whole one; and the target's, for scale. bfloat16, 2 threads.

    python docs/benchmarks/smollm2-draft-variants-bf16-cpu/draft_forward.py runs/draft-smol/model
"""

import sys
import time

import torch

from specdecode.cli.shared import load_models
from specdecode.drafters.draft_model import reduced_vocab
from specdecode.models import HFModel


def per_token_ms(model: HFModel, repeats: int = 50) -> float:
    model.reset()
    model.extend(list(range(100, 400)))
    for _ in range(5):  # warm-up
        model.extend([5])
        model.crop(model.length - 1)
    start = time.perf_counter()
    for _ in range(repeats):
        model.extend([5])
        model.crop(model.length - 1)
    return (time.perf_counter() - start) / repeats * 1e3


torch.set_num_threads(2)
target, draft, _ = load_models("smollm2-135m", sys.argv[1], True, dtype="bfloat16")
vocab = reduced_vocab(draft, None, target.config.vocab_size)
print(f"draft, {0 if vocab is None else len(vocab)} tokens read out: "
      f"{per_token_ms(HFModel(draft, vocab)):.1f} ms")
print(f"draft, whole vocabulary: {per_token_ms(HFModel(draft)):.1f} ms")
print(f"target: {per_token_ms(HFModel(target), 10):.1f} ms")
