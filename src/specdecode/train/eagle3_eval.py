"""Held-out evaluation of an EAGLE-3 head in training (``train/eagle3.py``), and its log.

For every held-out answer position the head runs the training-time test for ``eval_depth`` steps
(teacher-forced tokens, its own features), and we count:

- ``top1[k-1]``: step k's top-1 (mapped to a target id) equals the target's argmax over its whole
  vocabulary, for the token it predicts: the agreement at draft depth k (all held-out rows);
- ``loss``: the training loss (weighted over the trained steps) and each step's loss;
- ``accept_length[D-1]``: greedy rows only, where the data's next tokens are the target's argmax:
  a chain of depth D drafted at pair s is accepted up to its first wrong step, and step k of the
  chain from s is the step-k prediction at pair s + k - 1 (given steps 1..k-1 right, its input
  tokens are exactly the drafted ones), so its accepted length is 1 + the consecutive right steps
  (DESIGN.md §5: accepted draft tokens + 1), averaged over every answer position;
  ``chain_accept[k-1]``: the share of depth-k chain steps accepted given steps 1..k-1 were.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from specdecode.train import eagle3_data as data
from specdecode.train.eagle3_ttt import STEP_WEIGHT, soft_labels, target_states, ttt_hidden


@torch.no_grad()
def evaluate(head, target, held: list[data.Window], layers: list[int], weight: torch.Tensor,
             cfg) -> dict:
    was_training = head.training
    head.eval()
    depth = max(cfg.eval_depth, cfg.ttt_steps)
    vocab = head.vocab
    full = target.get_output_embeddings().weight
    embed = target.get_input_embeddings()
    agree, seen = torch.zeros(depth), torch.zeros(depth)
    losses, counted = torch.zeros(depth), torch.zeros(depth)
    accepted, starts = torch.zeros(cfg.eval_depth), 0
    hits, tries = torch.zeros(cfg.eval_depth), torch.zeros(cfg.eval_depth)
    order = sorted(range(len(held)), key=lambda i: len(held[i].ids))  # similar lengths together
    for first in range(0, len(order), cfg.batch_size):
        batch = data.collate(held, order[first:first + cfg.batch_size])
        feats, final = target_states(target, batch, layers)
        mask = batch.loss_mask()
        n = mask.shape[1]
        label_logp = soft_labels(final, mask, weight)
        probs = label_logp.exp()
        rows = final[:, 1:][mask]
        argmax = torch.cat([(part.float() @ full.float().T).argmax(-1)  # whole vocabulary
                            for part in rows.split(512)]) if len(rows) else rows.new_zeros(
            0, dtype=torch.long)
        nxt = nn.functional.pad(batch.ids[:, 2:], (0, 1))[mask]  # the data's token t + 2
        greedy = (~batch.sampled)[:, None].expand_as(mask)[mask]
        index = torch.arange(n)[None].expand_as(mask)[mask]
        outs = ttt_hidden(head, feats[:, :-1].float(), embed(batch.ids[:, 1:]).float(), depth)
        right = torch.zeros(depth, *mask.shape, dtype=torch.bool)
        for k, h in enumerate(outs, 1):
            keep = index >= k - 1
            logits = head.logits(h[mask][keep])
            pred = vocab[logits.argmax(-1)]
            agree[k - 1] += (pred == argmax[keep]).sum()
            seen[k - 1] += int(keep.sum())
            losses[k - 1] += -(probs[keep] * torch.log_softmax(logits, -1)).sum(-1).sum()
            counted[k - 1] += int(keep.sum())
            grid = torch.zeros(mask.shape, dtype=torch.bool)
            grid[mask.nonzero()[keep].unbind(1)] = (pred == nxt[keep]) & greedy[keep]
            right[k - 1] = grid
        chain_from = mask & (~batch.sampled)[:, None]
        alive = chain_from.clone()
        starts += int(chain_from.sum())
        for k in range(1, cfg.eval_depth + 1):  # chain from s: step k at pair s + k - 1
            step_ok = nn.functional.pad(right[k - 1][:, k - 1:], (0, k - 1))
            tries[k - 1] += int(alive.sum())
            alive = alive & step_ok
            hits[k - 1] += int(alive.sum())
            accepted[k - 1] += int(alive.sum())
    if was_training:
        head.train()
    step_loss = losses / counted.clamp(min=1)
    trained = sum(STEP_WEIGHT ** k * step_loss[k] for k in range(cfg.ttt_steps))
    cumulative = accepted.cumsum(0) / max(starts, 1)
    return {"loss": round(float(trained), 4),
            "step_loss": [round(float(x), 4) for x in step_loss],
            "top1": [round(float(x), 4) for x in agree / seen.clamp(min=1)],
            "accept_length": [round(1 + float(x), 4) for x in cumulative],
            "chain_accept": [round(float(x), 4) for x in hits / tries.clamp(min=1)],
            "positions": int(seen[0]), "greedy_positions": starts, "examples": len(held)}


class EvalLog:
    """``OUT/eval.log``: one JSON line per evaluation (step, results, tokens seen, times)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.results: dict[int, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                entry = json.loads(line)
                self.results[entry["step"]] = entry["heldout"]

    def has(self, step: int) -> bool:
        return step in self.results

    def write(self, step: int, result: dict, counts: dict) -> None:
        entry = {"step": step, "tokens_seen": counts["tokens"], "heldout": result}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.results[step] = result
