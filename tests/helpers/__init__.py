"""The tests' shared helpers (no fixtures: those live in tests/conftest.py): tiny random models
built from configs (no downloads), the shared prompt sets, batch-1 vanilla decoding, and a tiny
target with its own tokenizer for the trainers. Submodules hold the rest: test-only drafters
(``drafters``), the drafter matrix of the greedy identity tests (``matrix``), exact enumeration of
acceptance rules (``enumerate_rules``, ``exact_enumeration``, ``rules``), the batch invariance
check (``invariance``), benchmark answer files (``bench_files``), tiny GGUF files (``gguf_files``)
and a live server (``live_server``)."""

from __future__ import annotations

import random

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import specdecode as sd

ARCHS = ["llama", "qwen2", "gpt2"]


def tiny_config(arch: str, vocab: int = 96, layers: int = 3, context: int = 512):
    common = dict(vocab_size=vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=context, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=context, **common)
    if arch in ("mistral", "qwen3"):  # lean too (not in ARCHS): Mistral with a binding window
        options = {"sliding_window": 16} if arch == "mistral" else {"head_dim": 8}
        kind = MistralConfig if arch == "mistral" else Qwen3Config
        return kind(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=context, **options, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=context, **common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", *, vocab: int = 96, layers: int = 3, seed: int = 0,
               scale: float = 4.0, dtype: torch.dtype = torch.float64, context: int = 512):
    """A random causal LM; ``scale`` sharpens its output distribution (peaked models repeat
    themselves, which gives model-free drafters something to find)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, layers, context),
                                             attn_implementation="sdpa")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.to(dtype).eval()


def make_prompts(count: int = 20, vocab: int = 96, seed: int = 0) -> list[list[int]]:
    """Half repetitive (a short pattern repeated), half random; lengths 1..40."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab)]]  # a one-token prompt is an edge case
    while len(prompts) < count:
        if len(prompts) % 2:
            pattern = [rng.randrange(vocab) for _ in range(rng.randint(2, 6))]
            prompts.append((pattern * 10)[: rng.randint(6, 40)])
        else:
            prompts.append([rng.randrange(vocab) for _ in range(rng.randint(2, 40))])
    return prompts


def vanilla(model, prompt, max_new_tokens, **kw) -> list[int]:
    """Plain decoding (the fixed policy: nothing to budget, no cost curve to measure)."""
    return sd.generate(model, prompt, drafter="none", max_new_tokens=max_new_tokens,
                       eos_token_id=kw.pop("eos_token_id", []), **{"policy": "fixed", **kw}).token_ids


def corpus_target(tmp_path, monkeypatch):
    """A tiny llama target saved with its own tokenizer in ``tmp_path / "target"``, and the
    trainers' corpus replaced by a few documents: (tokenizer, model)."""
    import specdecode.train.corpus as corpus
    from specdecode.train.prepare import train_tokenizer

    texts = [f"Document {i}: the quick brown fox {i % 7} jumps over the lazy dog. " * 8
             for i in range(200)]
    monkeypatch.setattr(corpus, "all_documents", lambda: ((f"d{i}", t) for i, t in
                                                          enumerate(texts)))
    tok = train_tokenizer(texts[:50], 120, tmp_path / "target")
    model = tiny_model("llama", vocab=len(tok), seed=2, dtype=torch.float32)
    model.save_pretrained(tmp_path / "target")
    return tok, model
