"""Tiny GGUF files for the loader's tests, written here with the ``gguf`` package the way llama.cpp's
converter lays them out (tensor names, Q/K row permutation for Llama, byte-level BPE tokenizer),
from a tiny random transformers model, so that the loaded result can be compared with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from specdecode.demo import demo_dir

ARCHS = ("llama", "qwen2")


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0))
    for p in model.parameters():  # peaked enough that greedy decoding is not a coin toss
        p.data.normal_(0, 0.08)
    return model.eval()


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for rotary Q/K weights (its converter's ``permute``)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model, arch: str, path: Path) -> Path:
    """``model`` as an fp32 GGUF with the demo tokenizer's vocabulary and merges."""
    import gguf

    cfg = model.config
    tok = json.loads((demo_dir() / "tokenizer" / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert len(vocab) == cfg.vocab_size
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([1] * len(vocab))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy().copy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch == "llama" and module == "self_attn.q_proj":
                data = _permute(data, heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                data = _permute(data, kv_heads)
            out = f"blk.{i}.{per_layer[module]}.{kind}"
        else:
            out = names[name]
        w.add_tensor(out, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
