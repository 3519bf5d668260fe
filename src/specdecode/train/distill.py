"""Distil a draft model from a frozen target (``specdecode train-drafter --kind distill``).

DistillSpec (Zhou et al., "DistillSpec: Improving Speculative Decoding via Knowledge
Distillation", ICLR 2024): train the draft on the sequences it will meet while drafting, i.e. its
own samples (on-policy data), to match the target's next-token distributions, with the divergence
as a choice: total variation distance (``tvd``: 1 - TVD is exactly the expected acceptance rate of
one sampled draft token) or forward KL (``kl``).

Each step: ``batch_size`` corpus windows of ``prompt_len`` tokens (generator seeded by (seed,
step)); the draft (no gradient) samples ``gen_len`` tokens after each at temperature 1 (torch
generator seeded by (seed, step) too), except the first ``target_rows`` rows, which the target
continues (half of them greedily, the other half sampled): DistillSpec's mix of student- and
teacher-generated data, which puts the target's own greedy paths (what greedy speculative decoding
verifies) into the data; the frozen target scores the whole sequences; the loss is
the divergence between the target's and the draft's next-token distributions at every position
that predicts a generated token. AdamW, warm-up then cosine decay by step count; checkpoints every
``checkpoint_every`` steps and at the time budget, so a stopped run resumes exactly (the loop every
trainer shares: ``train/loop.py``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from specdecode.train.loop import LoopSettings, TrainLoop
from specdecode.train.rollout import continue_rows

LOSSES = ("tvd", "kl")


@dataclass
class DistillConfig:
    loss: str = "tvd"
    steps: int = 600
    batch_size: int = 16
    prompt_len: int = 64
    gen_len: int = 64
    lr: float = 3e-4
    warmup: int = 30
    seed: int = 0
    threads: int = 0
    time_budget_s: float = 0.0
    checkpoint_every: int = 50
    eval_batches: int = 8
    target_rows: int = 0  # rows per batch the target continues (half greedy) instead of the draft


def divergence(target_logp: torch.Tensor, draft_logits: torch.Tensor, loss: str,
               vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position divergence between the target's distribution and the draft's. With ``vocab``
    the draft reads out only those tokens (its logits are over them) and puts no mass elsewhere:
    the TVD then counts the target's mass outside ``vocab`` in full."""
    draft_logp = torch.log_softmax(draft_logits.float(), -1)
    if vocab is not None:
        p = target_logp.exp().index_select(-1, vocab)
        return 0.5 * ((p - draft_logp.exp()).abs().sum(-1) + (1.0 - p.sum(-1)).clamp_min(0))
    if loss == "tvd":
        return 0.5 * (target_logp.exp() - draft_logp.exp()).abs().sum(-1)
    return (target_logp.exp() * (target_logp - draft_logp)).sum(-1)


def draft_logits(draft, seqs: torch.Tensor, first: int, vocab: torch.Tensor | None
                 ) -> torch.Tensor:
    """The draft's logits at the positions from ``first`` on (over ``vocab`` only, if given: the
    LM head's other rows are never computed)."""
    if vocab is None:
        return draft(input_ids=seqs).logits[:, first:-1]
    states = draft.model(input_ids=seqs).last_hidden_state[:, first:-1]
    weight = draft.get_output_embeddings().weight
    return torch.nn.functional.linear(states, weight.index_select(0, vocab))


def prompts_at(data: np.ndarray, step: int, cfg: DistillConfig, salt: int = 0) -> torch.Tensor:
    gen = np.random.default_rng([cfg.seed, step, salt])
    starts = gen.integers(0, data.size - cfg.prompt_len - 1, size=cfg.batch_size)
    return torch.from_numpy(np.stack([data[s:s + cfg.prompt_len] for s in starts]).astype(np.int64))


def on_policy(target, draft, prompts: torch.Tensor, cfg: DistillConfig, step: int, salt: int = 0
              ) -> torch.Tensor:
    """The prompts followed by ``gen_len`` generated tokens: the first ``target_rows`` rows written
    by the target (the first half of them greedily, the rest sampled at temperature 1), the others
    sampled by the draft at temperature 1 (no top-k)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7 + salt)
    n_target = min(cfg.target_rows, prompts.size(0))
    parts = []
    if n_target < prompts.size(0):
        rest = prompts[n_target:]
        parts.append(continue_rows(draft, rest, cfg.gen_len,
                                   torch.zeros(rest.size(0), dtype=torch.bool), generator))
    if n_target:
        greedy = torch.arange(n_target) < (n_target + 1) // 2
        parts.insert(0, continue_rows(target, prompts[:n_target], cfg.gen_len, greedy, generator))
    return torch.cat(parts)


def step_loss(target, draft, seqs: torch.Tensor, cfg: DistillConfig,
              vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence, expected acceptance sum(min(p, q))) over the positions predicting generated
    tokens."""
    first = cfg.prompt_len - 1
    with torch.no_grad():
        target_logp = torch.log_softmax(target(input_ids=seqs).logits[:, first:-1].float(), -1)
    logits = draft_logits(draft, seqs, first, vocab)
    loss = divergence(target_logp, logits, cfg.loss, vocab).mean()
    with torch.no_grad():
        p = target_logp.exp() if vocab is None else target_logp.exp().index_select(-1, vocab)
        accept = torch.minimum(p, torch.softmax(logits.float(), -1)).sum(-1).mean()
    return loss, accept


def distill(target, draft, train_data: np.ndarray, val_data: np.ndarray, out_dir: Path,
            cfg: DistillConfig, tokenizer=None, vocab: torch.Tensor | None = None) -> dict:
    """Train (or resume) ``draft`` against the frozen ``target`` (in the target's own dtype; the
    draft trains in fp32); saves it to ``out_dir/model`` (fp16 safetensors, with the tokenizer)
    and returns the summary. ``vocab``: the draft reads out only these token ids (sorted); the
    loss must then be ``tvd``. The draft's frozen weights (``requires_grad`` off) stay as they
    are."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}")
    if vocab is not None and cfg.loss != "tvd":
        raise ValueError("a reduced draft vocabulary trains with the tvd loss only (the forward "
                         "KL is infinite where the target puts mass outside it)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    target, draft = target.eval(), draft.float().train()
    for p in target.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    shaping = {k: v for k, v in asdict(cfg).items()
               if k not in ("time_budget_s", "threads", "checkpoint_every", "eval_batches")}
    loop = TrainLoop(LoopSettings.of(cfg), {"draft": draft}, opt, out_dir / "checkpoint.pt",
                     shaping=shaping)
    if loop.step == 0:
        loop.extra["before"] = evaluate(target, draft, val_data, cfg, vocab)
    before = loop.extra.get("before")

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        seqs = on_policy(target, draft, prompts_at(train_data, step, cfg), cfg, step)
        loss, accept = step_loss(target, draft, seqs, cfg, vocab)
        return loss, {"expected_acceptance": accept}

    loop.run(step_fn, f"distill draft ({cfg.loss})")
    step, elapsed, history = loop.step, loop.elapsed, loop.history
    after = evaluate(target, draft, val_data, cfg, vocab)
    model_dir = out_dir / "model"
    copy.deepcopy(draft).to(torch.float16).save_pretrained(model_dir)  # the draft stays fp32
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    tokens = cfg.batch_size * (cfg.prompt_len + cfg.gen_len)
    return {"kind": "distill", "loss": cfg.loss, "steps": step, "finished": step >= cfg.steps,
            "tokens_seen": step * tokens, "generated_tokens": step * cfg.batch_size * cfg.gen_len,
            "wall_time_s": round(elapsed, 1), "before": before, "after": after,
            "history": history, "config": asdict(cfg), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


@torch.no_grad()
def evaluate(target, draft, data: np.ndarray, cfg: DistillConfig,
             vocab: torch.Tensor | None = None) -> dict:
    """On held-out prompts and the draft's own continuations: the divergence, the expected
    acceptance of a sampled token (sum of min(p, q)) and the greedy agreement (argmax match)."""
    losses, accepts, agrees = [], [], []
    first = cfg.prompt_len - 1
    for i in range(cfg.eval_batches):
        seqs = on_policy(target, draft, prompts_at(data, i, cfg, salt=1), cfg, i, salt=1)
        loss, accept = step_loss(target, draft, seqs, cfg, vocab)
        t = target(input_ids=seqs).logits[:, first:-1].argmax(-1)
        d = draft_logits(draft, seqs, first, vocab).argmax(-1)
        d = d if vocab is None else vocab[d]
        losses.append(loss.item())
        accepts.append(accept.item())
        agrees.append((t == d).float().mean().item())
    return {"val_divergence": round(float(np.mean(losses)), 4),
            "val_expected_acceptance": round(float(np.mean(accepts)), 4),
            "val_greedy_agreement": round(float(np.mean(agrees)), 4)}
