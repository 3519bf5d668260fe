"""The EAGLE-3 trainer's objective (``train/eagle3.py``): training-time test (Li et al.,
"EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test",
2025). Pair t is (the target's feature at position t, the embedding of token t + 1); every step's
output at pair t predicts token t + 2.

- Target pass (no grad, the target's dtype, right-padded batch with an attention mask): the
  residual stream after the decoder layers ``feature_layers`` (transformers' ``hidden_states[i +
  1]``; layers < L - 1, whose output is not yet the final-normed state), concatenated [B, T, k*H],
  and the final-normed states, read out through the draft vocabulary's rows of the target's LM
  head only (``soft_labels``).
- Step 1: inputs (lift(F_t), embed(token t + 1)), causal: query t sees the step-1 keys s <= t.
- Step k > 1: inputs (h_{k-1}[t - 1], embed(token t + 1)): the previous step's output one index
  earlier (index 0 has none: zeros, never in the loss). Query t sees the step-1 keys s <= t - k + 1
  and, for j = 2..k, the step-j key at index t - (k - j): its own chain, as a depth-k node sees the
  committed pairs and its ancestors when drafting (``ttt_visible``). Every step runs through the
  head's own ``forward`` with the earlier steps' keys and values as ``past``; positions: pair t at
  t + 1 at every step. A step-k output at t < k - 1 descends from index 0's placeholder: out of the
  loss, and no valid query sees it.
- Loss: step k at pair t is the cross-entropy of the head's draft-vocabulary logits against the
  target's distribution of token t + 2 restricted to the draft vocabulary and renormalised (soft
  labels), averaged over the answer tokens (t + 2 inside the answer), summed over steps with
  weight 0.8^(k - 1) (EAGLE-3's training code, ``ploss_weight``). Nothing is detached between
  steps (as EAGLE-3 does): the gradient of step k reaches steps 1..k-1 through their outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from specdecode.models.eagle3 import Eagle3Head
from specdecode.train.eagle3_data import Batch

STEP_WEIGHT = 0.8  # step k's loss weight is STEP_WEIGHT ** (k - 1) (EAGLE-3)


@torch.no_grad()
def target_states(target, batch: Batch, layers: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, T, k*H]: the outputs of ``layers`` concatenated; final-normed states
    [B, T, H]), in the target's dtype."""
    out = target.get_decoder()(input_ids=batch.ids, attention_mask=batch.attention.long(),
                               output_hidden_states=True)
    states = out.hidden_states
    return torch.cat([states[i + 1] for i in layers], -1), out.last_hidden_state


def ttt_visible(n: int, k: int) -> torch.Tensor:
    """bool [n, k * n]: which keys query t of step k sees, over the keys of steps 1..k in order:
    step-1 keys s <= t - k + 1, and for j = 2..k the step-j key at index t - (k - j)."""
    t = torch.arange(n)[:, None]
    s = torch.arange(n)[None]
    return torch.cat([s <= t - (k - 1)] + [s == t - (k - j) for j in range(2, k + 1)], 1)


def ttt_hidden(head: Eagle3Head, feats: torch.Tensor, embeds: torch.Tensor, steps: int
               ) -> list[torch.Tensor]:
    """The head's outputs [B, n, H] at steps 1..``steps`` over pairs (feats [B, n, k*H] lifted,
    embeds [B, n, H])."""
    b, n, _ = embeds.shape
    positions = torch.arange(1, n + 1)[None].expand(b, -1)
    x, past, outs = head.lift(feats), None, []
    for k in range(1, steps + 1):
        visible = ttt_visible(n, k)[None].expand(b, -1, -1)
        h, (key, value) = head(embeds, x, positions, visible, past)
        outs.append(h)
        past = (key, value) if past is None else (torch.cat([past[0], key], 2),
                                                  torch.cat([past[1], value], 2))
        x = nn.functional.pad(h[:, :-1], (0, 0, 1, 0))  # h_k[t - 1] at index t
    return outs


def soft_labels(final: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log p [M, V] of the target's next token at the ``mask``ed pairs (pair t: position t + 1),
    over the draft vocabulary's rows ``weight`` [V, H] of its LM head, renormalised there."""
    rows = final[:, 1:][mask].float()
    return torch.log_softmax(rows @ weight.T, -1)


def ttt_loss(head: Eagle3Head, outs: list[torch.Tensor], mask: torch.Tensor,
             label_logp: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(weighted loss, each step's mean loss, step 1's top-1 agreement with the soft labels)."""
    index = torch.arange(mask.shape[1])[None].expand_as(mask)[mask]
    total, per_step, agree = label_logp.new_zeros(()), [], label_logp.new_zeros(())
    probs = label_logp.exp()
    for k, h in enumerate(outs, 1):
        keep = index >= k - 1
        if not keep.any():
            per_step.append(label_logp.new_zeros(()))
            continue
        logits = head.logits(h[mask][keep])
        loss = -(probs[keep] * torch.log_softmax(logits, -1)).sum(-1).mean()
        total = total + STEP_WEIGHT ** (k - 1) * loss
        per_step.append(loss.detach())
        if k == 1:
            agree = (logits.argmax(-1) == label_logp.argmax(-1)).float().mean()
    if not total.requires_grad:  # no answer token in the batch: a zero step
        total = total + 0 * sum(p.sum() for p in head.parameters())
    return total, per_step, agree
