"""Continuations a model writes after corpus prompts: the training data of the drafter trainers that
learn on generated text (DistillSpec's on-policy data, Medusa-2 / EAGLE-style self-distillation).

``continue_rows(model, prompts, gen_len, greedy, generator)``: each row of ``prompts`` [B, P] is
continued by ``gen_len`` tokens, greedily where ``greedy[row]`` is true and sampled at temperature 1
(no top-k / top-p) elsewhere, with a KV cache; the sampled rows draw from ``generator`` only, so a
step's data is a function of its seed.
"""

from __future__ import annotations

import inspect

import torch


def cache_kwargs(model) -> dict:
    """A fresh KV cache under the name the model's forward takes (transformers 5.25 renamed
    ``past_key_values`` to ``cache``)."""
    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": DynamicCache()}


@torch.no_grad()
def continue_rows(model, prompts: torch.Tensor, gen_len: int, greedy: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """``prompts`` followed by ``gen_len`` tokens of ``model``: [B, P + gen_len]."""
    was_training = model.training
    model.eval()
    cache = cache_kwargs(model)
    logits = model(input_ids=prompts, use_cache=True, **cache).logits[:, -1]
    out = [prompts]
    for _ in range(gen_len):
        sampled = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
        nxt = torch.where(greedy[:, None], logits.argmax(-1, keepdim=True), sampled)
        out.append(nxt)
        logits = model(input_ids=nxt, use_cache=True, **cache).logits[:, -1]
    model.train(was_training)
    return torch.cat(out, 1)
