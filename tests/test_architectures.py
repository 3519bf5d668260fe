"""The architectures people run (issue 39, part 5): tiny random Llama, Qwen2, Qwen3, Gemma 2,
Gemma 3 (hybrid: a sliding layer and a global one), Mistral (window on), Phi-3, GPT-2, GPT-NeoX and
OLMo 2 configurations, built here. In float32 plain decoding equals transformers' ``generate``; in
float32 and bfloat16 every drafter family (lookup, suffix tree, a draft model's tree, layer-skip)
equals plain decoding token for token, batch rows equal their batch-1 output, and coupled
sampling equals plain sampling with the same seed (Gemma 2's soft-capped attention included in
the bfloat16 exact forward)."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import fixed_policy as sd
from transformers import AutoModelForCausalLM

from specdecode.models.lean import LeanForward

VOCAB, CONTEXT, NEW = 96, 256, 20
COMMON = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None,
              tie_word_embeddings=False)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=CONTEXT)
CONFIGS = {
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 8}),
    "phi3": ("Phi3Config", {**LLAMA_LIKE, "pad_token_id": None}),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=CONTEXT)),
    "olmo2": ("Olmo2Config", LLAMA_LIKE),
}
LEAN = {"llama", "qwen2", "mistral", "qwen3"}  # the rest run the model's own forward
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPTS = [[7, 3, 9, 7, 3, 9, 7, 3, 9, 7, 3, 9, 7, 3, 9, 7],
           [11, 42, 5, 60, 23, 8, 91, 14, 33, 2, 71, 19, 50, 6],
           [1, 2, 3, 1, 2, 3, 4, 1, 2, 3],
           [88]]


def tiny(arch: str, seed: int = 0, dtype=torch.float32):
    kind, options = CONFIGS[arch]
    config = getattr(transformers, kind)(**{**COMMON, **options})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # peaked: repeats for lookup to find
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.to(dtype).eval()


def run(model, prompt, drafter="none", **options) -> list[int]:
    return sd.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, eos_token_id=[],
                       **options).token_ids


def drafters(arch: str, dtype) -> list[tuple[str, dict]]:
    return [("ngram", {}), ("suffix", {"max_nodes": 8}),
            ("draft-model", {"draft_model": tiny(arch, seed=1, dtype=dtype), "tree_width": 2}),
            ("layer-skip", {"num_layers": 1, "num_draft_tokens": 3})]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_plain_decoding_equals_transformers(arch):
    model = tiny(arch)
    assert (LeanForward.build(model) is not None) == (arch in LEAN)
    for prompt in PROMPTS[:2]:
        x = torch.tensor([prompt])
        want = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=NEW, pad_token_id=0)[0, len(prompt):].tolist()
        assert run(model, prompt) == want
        assert run(model, prompt, "ngram") == want


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.e2e
def test_every_drafter_family_equals_plain_decoding(arch, dtype):
    model = tiny(arch, dtype=DTYPES[dtype])
    for prompt in PROMPTS:
        plain = run(model, prompt)
        for drafter, options in drafters(arch, DTYPES[dtype]):
            assert run(model, prompt, drafter, **options) == plain, (drafter, prompt)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.e2e
def test_batch_rows_and_coupled_sampling(arch, dtype):
    model = tiny(arch, dtype=DTYPES[dtype])
    alone = [run(model, p, "ngram") for p in PROMPTS]
    together = sd.generate_batch(model, PROMPTS, batch_size=len(PROMPTS), drafter="ngram",
                                 max_new_tokens=NEW, eos_token_id=[])
    assert [out.token_ids for out in together] == alone
    coupled = dict(temperature=1.0, seed=5, sampling="coupled")
    for prompt in PROMPTS[:2]:
        plain = run(model, prompt, **coupled)
        for drafter, options in drafters(arch, DTYPES[dtype])[::2]:
            assert run(model, prompt, drafter, **options, **coupled) == plain, drafter
