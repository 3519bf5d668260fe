"""Continuations a model writes after corpus prompts: the training data of the drafter trainers that
learn on generated text (DistillSpec's on-policy data, Medusa-2 / EAGLE-style self-distillation).

``continue_rows(model, prompts, gen_len, greedy, generator)``: each row of ``prompts`` [B, P] is
continued by ``gen_len`` tokens, greedily where ``greedy[row]`` is true and sampled at temperature 1
(no top-k / top-p) elsewhere, with a KV cache; the sampled rows draw from ``generator`` only, so a
step's data is a function of its seed.
"""

from __future__ import annotations

import torch

from specdecode.models import fresh_cache


@torch.no_grad()
def continue_rows(model, prompts: torch.Tensor, gen_len: int, greedy: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """``prompts`` followed by ``gen_len`` tokens of ``model``: [B, P + gen_len]."""
    was_training = model.training
    model.eval()
    cache = fresh_cache(model)
    logits = model(input_ids=prompts, use_cache=True, **cache).logits[:, -1]
    out = [prompts]
    for _ in range(gen_len):
        sampled = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
        nxt = torch.where(greedy[:, None], logits.argmax(-1, keepdim=True), sampled)
        out.append(nxt)
        logits = model(input_ids=nxt, use_cache=True, **cache).logits[:, -1]
    model.train(was_training)
    return torch.cat(out, 1)
