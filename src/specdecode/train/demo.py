"""Train the demo target/draft pair: seeded, resumable, step-scheduled, with a wall-clock budget.

The learning-rate schedule depends only on the step count, and batch ``i`` is drawn from a generator
seeded by ``(seed, i)``, so a run resumed from a checkpoint continues exactly where it stopped and
the same command with the same data reproduces the same weights (same torch build and thread count).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from specdecode.train.loop import LoopSettings, TrainLoop

# name -> (hidden, layers, heads, kv_heads, intermediate)
SIZES = {
    "target": (288, 6, 6, 6, 768),
    "draft": (96, 2, 2, 2, 256),
    "tiny": (32, 1, 2, 2, 64),  # for tests only
}


@dataclass
class TrainConfig:
    size: str = "target"
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 0  # 0 = torch default
    time_budget_s: float = 0.0  # 0 = no budget; a checkpoint is written when it runs out
    checkpoint_every: int = 100
    eval_batches: int = 20


def build_model(size: str, vocab_size: int, max_positions: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, inter = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter,
        max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=4, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def get_batch(data: np.ndarray, step: int, cfg: TrainConfig, salt: int = 0) -> torch.Tensor:
    gen = np.random.default_rng([cfg.seed, step, salt])
    starts = gen.integers(0, data.size - cfg.seq_len - 1, size=cfg.batch_size)
    rows = np.stack([data[s:s + cfg.seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows)


@torch.no_grad()
def evaluate(model, data: np.ndarray, cfg: TrainConfig) -> float:
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        losses.append(_loss(model, get_batch(data, i, cfg, salt=1)).item())
    model.train()
    return float(np.mean(losses))


def _loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                             batch[:, 1:].reshape(-1))


def train(data_dir: Path, out_dir: Path, cfg: TrainConfig) -> dict:
    """Train (or resume) one model; returns the summary written to ``out_dir/summary.json``."""
    from transformers import AutoTokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    train_data = np.load(data_dir / "train.npy", mmap_mode="r")
    val_data = np.load(data_dir / "val.npy", mmap_mode="r")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.size, len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    loop = TrainLoop(LoopSettings.of(cfg), {"model": model}, opt, out_dir / "checkpoint.pt",
                     log=print)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.batch_size * cfg.seq_len
    model.train()
    loop.run(lambda step: (_loss(model, get_batch(train_data, step, cfg)), {}),
             f"train {cfg.size} ({n_params / 1e6:.1f}M)")
    step, elapsed = loop.step, loop.elapsed
    val_loss = evaluate(model, val_data, cfg)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    summary = {"size": cfg.size, "parameters": n_params, "steps": step,
               "tokens_seen": step * tokens_per_step, "wall_time_s": round(elapsed, 1),
               "val_loss": round(val_loss, 4), "val_perplexity": round(math.exp(val_loss), 2),
               "finished": step >= cfg.steps, "config": asdict(cfg),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
