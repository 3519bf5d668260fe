"""Per-token decode time on SmolLM2-135M-Instruct in bfloat16: specdecode's vanilla (the lean exact
forward, eager) against transformers' static cache + torch.compile (inductor, freezing) and
transformers' eager generate. One prompt, greedy; decode time per token = (time for 65 new tokens -
time for 1) / 64, median of 5; the compile (first call) is timed apart.

    python docs/benchmarks/hf-compiled-smollm2-bf16-cpu/hf_compiled.py 2   # torch threads
"""

import statistics
import sys
import time

import torch
import torch._inductor.config as inductor_config
from transformers import AutoTokenizer

import specdecode as sd
from specdecode.models.sources import load_causal_lm, resolve_source

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
PATH = resolve_source("smollm2-135m")
TOKENIZER = AutoTokenizer.from_pretrained(PATH)
MESSAGE = "Write a short story about a robot who learns to paint."
PROMPT = TOKENIZER.apply_chat_template([{"role": "user", "content": MESSAGE}],
                                       add_generation_prompt=True, return_dict=True)["input_ids"]


def per_token_ms(generate) -> float:
    def median(n: int) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            generate(n)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return (median(65) - median(1)) / 64 * 1e3


def ours(n: int):
    return sd.generate(OURS, PROMPT, drafter="none", max_new_tokens=n, eos_token_id=[])


def hf_generate(model, static: bool):
    ids = torch.tensor([PROMPT])
    extra = {"cache_implementation": "static"} if static else {}

    def run(n: int):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
    return run


OURS = load_causal_lm(PATH, dtype=torch.bfloat16)
ours(4)
print(f"specdecode vanilla (lean exact): {per_token_ms(ours):.1f} ms/token", flush=True)

inductor_config.freezing = True
compiled = load_causal_lm(PATH, dtype=torch.bfloat16)
compiled.forward = torch.compile(compiled.forward, dynamic=False)
run_compiled = hf_generate(compiled, static=True)
start = time.perf_counter()
run_compiled(65)
print(f"first call (compile) {time.perf_counter() - start:.0f} s", flush=True)
run_compiled(1)
print(f"transformers static cache + torch.compile (freezing): {per_token_ms(run_compiled):.1f} "
      "ms/token")
run_eager = hf_generate(load_causal_lm(PATH, dtype=torch.bfloat16), static=False)
run_eager(4)
print(f"transformers eager generate (dynamic cache): {per_token_ms(run_eager):.1f} ms/token")
same = ours(65).token_ids == run_compiled(65)[0, len(PROMPT):].tolist()
print("compiled transformers' 65 tokens equal ours:", same)
