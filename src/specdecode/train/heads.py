"""Train EAGLE and Medusa heads on a frozen target (``specdecode train-drafter --kind eagle|medusa``).

Each step draws ``batch_size`` windows of ``seq_len`` tokens (generator seeded by (seed, step), so a
resumed run continues exactly): corpus text, or with ``data="target"`` short corpus prompts continued
by the target itself, a ``greedy_share`` of the rows greedily and the rest sampled
(self-distillation: Medusa-2 trains on the target's own outputs, and what the heads must predict at
decoding time is the target's own text); ``init_head`` starts from a saved head (a second stage).
Then it runs the frozen target once to get its features
F (last hidden states after the final norm) and its next-token distributions P, and trains:

- EAGLE-1 (Li et al., ICML 2024): the head reads (F_t + uniform noise in [-0.1, 0.1], embedding of
  token t+1) and predicts F_{t+1}; loss = SmoothL1(prediction, F_{t+1}) + 0.1 * cross-entropy of
  the target's LM head on the prediction against P_{t+1} (the paper's weights and input noise).
- Medusa-1 (Cai et al., ICML 2024): head d reads F_t and predicts token t+1+d; loss = sum over d of
  0.8^(d-1) * cross-entropy against the target's own distribution P_{t+d} (self-distillation, as
  the paper recommends when the corpus is not the target's own output).

The learning rate warms up then decays by cosine, by step count only (``train/loop.py``, shared
by every trainer); AdamW; checkpoints every
``checkpoint_every`` steps and at the time budget. At the end: held-out loss and top-1 agreement
with the target per depth (Medusa: the top-k accuracy table that shapes its static tree).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from specdecode.models.heads import EagleHead, MedusaHeads, load_head, save_head
from specdecode.train.loop import LoopSettings, TrainLoop
from specdecode.train.rollout import continue_rows


@dataclass
class HeadConfig:
    kind: str = "eagle"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.0
    medusa_heads: int = 3
    seed: int = 0
    threads: int = 0
    time_budget_s: float = 0.0
    checkpoint_every: int = 50
    eval_batches: int = 8
    tree_nodes: int = 32  # Medusa: paths kept in the static tree
    draft_vocab: int = 2048  # the most-used tokens listed for a reduced read-out (0: none)
    data: str = "corpus"  # or "target": corpus prompts continued by the target (self-distillation)
    prompt_len: int = 64  # data="target": corpus tokens before the target's continuation
    greedy_share: float = 0.5  # data="target": share of the rows continued greedily (others sampled)
    init_head: str = ""  # start from this saved head (same kind and target) instead of a fresh one
    loss_vocab: int = 0  # the distillation term over the N most used tokens only (0: all)
    medusa_tied: bool = False  # medusa: read out through the target's LM head (blocks only)


def most_used(data: np.ndarray, vocab_size: int, n: int) -> list[int]:
    """The ``n`` most frequent token ids of ``data`` (ties by id), those that occur at all."""
    counts = np.bincount(np.asarray(data, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))
    return [int(i) for i in order[:n] if counts[i] > 0]


DATA_KINDS = ("corpus", "target")


def batch_at(data: np.ndarray, step: int, cfg: HeadConfig, salt: int = 0,
             target=None) -> torch.Tensor:
    """Step ``step``'s windows of ``seq_len`` tokens: corpus text, or (``data="target"``)
    ``prompt_len`` corpus tokens continued by the target (the text the heads draft on at decoding
    time): the first ``greedy_share`` of the rows greedily, the rest sampled at temperature 1."""
    gen = np.random.default_rng([cfg.seed, step, salt])
    prompt = cfg.seq_len if cfg.data == "corpus" else min(cfg.prompt_len, cfg.seq_len - 1)
    starts = gen.integers(0, data.size - prompt - 1, size=cfg.batch_size)
    ids = torch.from_numpy(np.stack([data[s:s + prompt] for s in starts]).astype(np.int64))
    if cfg.data == "corpus":
        return ids
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7 + salt)
    greedy = torch.arange(cfg.batch_size) < round(cfg.batch_size * cfg.greedy_share)
    return continue_rows(target, ids, cfg.seq_len - prompt, greedy, generator)


@torch.no_grad()
def target_pass(target, ids: torch.Tensor, subset: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target's features [B, T, H] (in fp32, whatever the target's dtype) and
    log-probabilities [B, T, V], or over the token ids ``subset`` only (renormalised there; the
    LM head is then applied to those rows alone)."""
    if subset is None:
        out = target(input_ids=ids, output_hidden_states=True)
        return out.hidden_states[-1].float(), torch.log_softmax(out.logits.float(), -1)
    feats = target.get_decoder()(input_ids=ids).last_hidden_state.float()
    weight = target.get_output_embeddings().weight[subset].float()
    return feats, torch.log_softmax(nn.functional.linear(feats, weight), -1)


def new_head(kind: str, target, cfg: HeadConfig) -> nn.Module:
    config = target.config
    hidden = int(target.get_input_embeddings().weight.shape[1])
    if kind == "eagle":
        heads = int(getattr(config, "num_attention_heads", 0) or max(1, hidden // 64))
        inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
        theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        return EagleHead(hidden, heads, inter, theta)
    vocab = int(target.get_output_embeddings().weight.shape[0])
    head = MedusaHeads(hidden, vocab, cfg.medusa_heads, tied=cfg.medusa_tied)
    if cfg.medusa_tied:
        head.tie(target.get_output_embeddings())
    else:
        head.init_from(target.get_output_embeddings())
    return head


def soft_ce(logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the distribution exp(target_logp), per position."""
    return -(target_logp.exp() * torch.log_softmax(logits, -1)).sum(-1)


def eagle_loss(head: EagleHead, target, ids: torch.Tensor, feats: torch.Tensor,
               logp: torch.Tensor, noise: bool, subset: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, top-1 agreement with the target) over the pairs (F_t, token t+1); with ``subset``,
    the classification term and the agreement over those token ids only (as ``logp``)."""
    b, t = ids.shape
    inputs = feats[:, :-1]
    if noise:
        inputs = inputs + (torch.rand_like(inputs) - 0.5) * 0.2
    with torch.no_grad():
        embeds = target.get_input_embeddings()(ids[:, 1:]).float()
    positions = torch.arange(1, t)[None].expand(b, -1)
    causal = torch.ones(t - 1, t - 1, dtype=torch.bool).tril()[None].expand(b, -1, -1)
    pred, _ = head(embeds, inputs, positions, causal)
    weight = target.get_output_embeddings().weight
    weight = weight if subset is None else weight[subset]
    logits = nn.functional.linear(pred, weight.float())
    reg = nn.functional.smooth_l1_loss(pred, feats[:, 1:])
    cls = soft_ce(logits, logp[:, 1:]).mean()
    agree = (logits.argmax(-1) == logp[:, 1:].argmax(-1)).float().mean()
    return reg + 0.1 * cls, agree


def medusa_logits(heads: MedusaHeads, feats: torch.Tensor, subset: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """[K, B, T, V] (V: ``subset``'s size where given)."""
    if subset is None:
        return heads(feats)
    return heads(feats, [w[subset] for w in heads.readout_weights()])


def medusa_loss(heads: MedusaHeads, feats: torch.Tensor, logp: torch.Tensor,
                subset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, top-1 agreement of head 1 with the target); with ``subset``, over those token ids
    only (as ``logp``)."""
    all_logits = medusa_logits(heads, feats, subset)  # [K, B, T, V]
    loss, agree = feats.new_zeros(()), feats.new_zeros(())
    for d in range(1, all_logits.size(0) + 1):
        logits, target = all_logits[d - 1, :, :-d], logp[:, d:]
        loss = loss + 0.8 ** (d - 1) * soft_ce(logits, target).mean()
        if d == 1:
            agree = (logits.argmax(-1) == target.argmax(-1)).float().mean()
    return loss, agree


@torch.no_grad()
def evaluate(kind: str, head: nn.Module, target, data: np.ndarray, cfg: HeadConfig,
             topk: int = 4, subset: torch.Tensor | None = None) -> dict:
    """Held-out loss and agreement; Medusa also its top-k accuracy table (per depth, per rank: how
    often that rank's token is the target's argmax)."""
    head.eval()
    losses, agrees = [], []
    hits = np.zeros((cfg.medusa_heads, topk))
    count = np.zeros(cfg.medusa_heads)
    for i in range(cfg.eval_batches):
        ids = batch_at(data, i, cfg, salt=1, target=target)
        feats, logp = target_pass(target, ids, subset)
        if kind == "eagle":
            loss, agree = eagle_loss(head, target, ids, feats, logp, noise=False, subset=subset)
        else:
            loss, agree = medusa_loss(head, feats, logp, subset)
            all_logits = medusa_logits(head, feats, subset)
            for d in range(1, all_logits.size(0) + 1):
                ranked = all_logits[d - 1, :, :-d].topk(topk, -1).indices
                truth = logp[:, d:].argmax(-1, keepdim=True)
                hits[d - 1] += (ranked == truth).float().sum((0, 1)).numpy()
                count[d - 1] += truth.numel()
        losses.append(loss.item())
        agrees.append(agree.item())
    head.train()
    out = {"val_loss": round(float(np.mean(losses)), 4),
           "val_top1_agreement": round(float(np.mean(agrees)), 4)}
    if kind == "medusa":
        out["topk_accuracy"] = (hits / count[:, None]).round(4).tolist()
    return out


def _shaping(config: dict) -> dict:
    """The settings that shape the weights (not when to stop, where to log or how many threads)."""
    return {k: v for k, v in config.items()
            if k not in ("time_budget_s", "threads", "checkpoint_every", "eval_batches")}


def train_head(target, train_data: np.ndarray, val_data: np.ndarray, out_dir: Path,
               cfg: HeadConfig) -> dict:
    """Train (or resume) a head on ``target`` (frozen); saves it to ``out_dir/head`` and returns
    the summary."""
    from specdecode.drafters.medusa import static_tree

    if cfg.data not in DATA_KINDS:
        raise ValueError(f"data must be one of {', '.join(DATA_KINDS)}, not {cfg.data!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = target.eval()  # features in the target's own dtype: what the head reads when drafting
    for p in target.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    head = new_head(cfg.kind, target, cfg)
    if cfg.init_head:  # a second stage: start from a saved head of the same shape
        start_from, _ = load_head(cfg.init_head, cfg.kind, target)
        if start_from.config != head.config:
            raise ValueError(f"{cfg.init_head} holds a head of another shape ({start_from.config})")
        head.load_state_dict(start_from.state_dict())
    head.train()
    vocab_size = int(target.get_output_embeddings().weight.shape[0])
    subset = None
    if 0 < cfg.loss_vocab < vocab_size:
        subset = torch.tensor(sorted(most_used(train_data, vocab_size, cfg.loss_vocab)))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    loop = TrainLoop(LoopSettings.of(cfg), {"head": head}, opt, out_dir / "checkpoint.pt",
                     shaping=_shaping(asdict(cfg)))
    n_params = sum(p.numel() for p in head.parameters())
    tokens_per_step = cfg.batch_size * cfg.seq_len

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        ids = batch_at(train_data, step, cfg, target=target)
        feats, logp = target_pass(target, ids, subset)
        if cfg.kind == "eagle":
            loss, agree = eagle_loss(head, target, ids, feats, logp, noise=True, subset=subset)
        else:
            loss, agree = medusa_loss(head, feats, logp, subset)
        return loss, {"agreement": agree}

    loop.run(step_fn, f"train {cfg.kind} head ({n_params / 1e6:.2f}M)")
    step, elapsed, history = loop.step, loop.elapsed, loop.history
    result = evaluate(cfg.kind, head, target, val_data, cfg, subset=subset)
    extra = {"trained": {"steps": step, "tokens": step * tokens_per_step}}
    if 0 < cfg.draft_vocab < vocab_size:
        extra["draft_vocab"] = most_used(train_data, vocab_size, cfg.draft_vocab)
    if cfg.kind == "medusa":
        extra["tree"] = static_tree(result["topk_accuracy"], cfg.tree_nodes)
        extra["topk_accuracy"] = result["topk_accuracy"]
    save_head(head, out_dir / "head", target, extra)
    return {"kind": cfg.kind, "parameters": n_params, "steps": step,
            "tokens_seen": step * tokens_per_step, "wall_time_s": round(elapsed, 1),
            "finished": step >= cfg.steps, **result, "history": history, "config": asdict(cfg),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
