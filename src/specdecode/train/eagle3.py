"""Train an EAGLE-3 head (``models/eagle3.py``) on a frozen target from the target's own answers
(a ``build-drafter-data`` directory): ``specdecode train-drafter --kind eagle3 --data DIR``.

The objective, training-time test, is ``train/eagle3_ttt.py``; the data (windows, draft
vocabulary, batches, feature cache) ``train/eagle3_data.py``; the held-out evaluation
``train/eagle3_eval.py``. Here: the head's shape, the loop (``train/loop.py``'s: cosine schedule,
checkpoints, a time budget counted over every run, resume; batches from (seed, step), so a resumed
run continues exactly), the target pass or its cached copy, and the summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from specdecode.models.eagle3 import Eagle3Head, default_layers
from specdecode.models.heads import save_head
from specdecode.train import eagle3_data as data
from specdecode.train.eagle3_eval import EvalLog, evaluate
from specdecode.train.eagle3_ttt import soft_labels, target_states, ttt_hidden, ttt_loss
from specdecode.train.loop import LoopSettings, TrainLoop
from specdecode.types import SpecDecodeError

SUMMARY, EVAL_LOG = "summary.json", "eval.log"


@dataclass
class Eagle3Config:
    data_dir: str = ""
    steps: int = 600
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 5e-4
    warmup: int = 30
    weight_decay: float = 0.0
    ttt_steps: int = 5  # training-time test depth
    draft_vocab: int = 8192
    feature_layers: list[int] = field(default_factory=list)  # empty: default_layers(L)
    intermediate_size: int = 0  # 0: the target's
    seed: int = 0
    threads: int = 0
    time_budget_s: float = 0.0
    checkpoint_every: int = 50
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end)
    eval_examples: int = 128  # held-out examples evaluated (the first ones, by prompt hash)
    eval_depth: int = 5  # greedy chain depths 1..eval_depth
    cache_features: str = ""  # a directory: the target's features of the training set kept there
    bf16_autocast: bool = False  # the head's forward and backward under bfloat16 autocast


NOT_SHAPING = ("threads", "time_budget_s", "checkpoint_every", "eval_every", "eval_examples",
               "eval_depth", "cache_features", "bf16_autocast")


def target_layers(target, layers: list[int]) -> list[int]:
    """``layers`` (default ``default_layers``), each a decoder layer whose output is not yet the
    final-normed state: 0..L-2."""
    count = int(target.config.num_hidden_layers)
    layers = list(layers) or default_layers(count)
    bad = [i for i in layers if not 0 <= i <= count - 2]
    if bad or len(set(layers)) != len(layers):
        raise SpecDecodeError(f"feature layers {layers} are out of range: this target has {count} "
                              f"decoder layers; give distinct layers in 0..{count - 2} (the last "
                              "layer's output is the final-normed state, not a feature)")
    return sorted(layers)


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def new_head(target, layers: list[int], vocab: list[int], intermediate: int = 0) -> Eagle3Head:
    """An EAGLE-3 head the size of ``target``'s layers (hidden size, heads, MLP width)."""
    config = target.config
    hidden = int(target.get_input_embeddings().weight.shape[1])
    heads = int(getattr(config, "num_attention_heads", 0) or max(1, hidden // 64))
    inter = intermediate or int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    eps = float(getattr(config, "rms_norm_eps", 1e-6) or 1e-6)
    return Eagle3Head(hidden, heads, inter, layers, vocab, rope_theta(config), eps)


class Features:
    """The target pass of a batch, or its cached copy (``--cache-features``)."""

    def __init__(self, target, layers: list[int], cache: data.FeatureCache | None,
                 counts: dict) -> None:
        self.target, self.layers, self.cache = target, layers, cache
        self.counts = counts  # target_s / target_tokens, cache_s / cache_tokens (kept on resume)
        self.computed, self.read = 0, 0  # batches, this run

    def __call__(self, batch: data.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        cached = self.cache.get(batch.rows) if self.cache is not None else None
        if cached is None:
            feats, final = target_states(self.target, batch, self.layers)
            self.computed += 1
            if self.cache is not None:  # what a later read returns: bfloat16
                feats, final = feats.to(torch.bfloat16), final.to(torch.bfloat16)
                self.cache.put(batch.rows, batch.lengths.tolist(), torch.cat([feats, final], -1))
            kind = "target"
        else:
            width = batch.ids.shape[1]
            both = torch.stack([nn.functional.pad(x, (0, 0, 0, width - len(x))) for x in cached])
            split = both.shape[-1] - final_width(self.target)
            feats, final = both[..., :split], both[..., split:]
            self.read += 1
            kind = "cache"
        self.counts[f"{kind}_s"] += time.perf_counter() - start
        self.counts[f"{kind}_tokens"] += int(batch.lengths.sum())
        return feats, final


def final_width(target) -> int:
    return int(target.get_input_embeddings().weight.shape[1])


def train_eagle3(target, tokenizer, out_dir: Path, cfg: Eagle3Config, log=None) -> dict:
    """Train (or resume) an EAGLE-3 head for ``target`` (frozen) on ``cfg.data_dir``; saves it
    to ``out_dir/head`` (``load_head(dir, "eagle", target)`` loads it) and returns the summary."""
    if min(cfg.steps, cfg.batch_size, cfg.ttt_steps, cfg.draft_vocab, cfg.eval_depth) < 1:
        raise SpecDecodeError("steps, batch size, TTT steps, draft vocabulary and eval depth must "
                              "be positive")
    if cfg.seq_len < 3:
        raise SpecDecodeError(f"--seq-len {cfg.seq_len}: a window needs at least 3 tokens")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dirs, out_dir = data.data_dirs(cfg.data_dir), Path(out_dir)
    manifests = [data.check_data(d, target, tokenizer) for d in dirs]
    named = ",".join(map(str, dirs))
    layers = target_layers(target, cfg.feature_layers)
    target = target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = data.pin_data(dirs, out_dir, manifests)
    train, held, answers = data.read_windows(list(zip(dirs, shards)), cfg.seq_len)
    if not train or not held:
        raise SpecDecodeError(f"{named!r} holds {len(train)} training and {len(held)} "
                              "held-out examples in the shards read; both are needed (build more "
                              "data, or a larger --heldout)")
    vocab_size = int(target.get_output_embeddings().weight.shape[0])
    pin = out_dir / data.PIN_FILE
    if pin.exists():
        pinned = json.loads(pin.read_text())
        if (pinned.get("draft_vocab", cfg.draft_vocab), pinned.get("seq_len", cfg.seq_len)) != (
                cfg.draft_vocab, cfg.seq_len):
            raise SpecDecodeError(f"{pin} was written with other settings; use another --out")
    else:
        vocab = data.draft_vocabulary(answers, vocab_size, cfg.draft_vocab)
        held_answers = np.concatenate([w.ids[w.start:] for w in held])
        pinned = {"data": named, "dirs": [str(d) for d in dirs], "shards": shards, "vocab": vocab,
                  "draft_vocab": cfg.draft_vocab, "seq_len": cfg.seq_len,
                  "train_examples": len(train), "heldout_examples": len(held),
                  "train_answer_tokens": int(answers.size),
                  "coverage_train": round(data.coverage(answers, vocab), 4),
                  "coverage_heldout": round(data.coverage(held_answers, vocab), 4)}
        pin.write_text(json.dumps(pinned))
    vocab = pinned["vocab"]
    held = held[:cfg.eval_examples]
    torch.manual_seed(cfg.seed)
    head = new_head(target, layers, vocab, cfg.intermediate_size).train()
    weight = target.get_output_embeddings().weight[torch.tensor(vocab)].float()
    embed = target.get_input_embeddings()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    shaping = {k: v for k, v in asdict(cfg).items() if k not in NOT_SHAPING}
    shaping["feature_layers"] = layers
    loop_args = {"log": log} if log is not None else {}
    loop = TrainLoop(LoopSettings.of(cfg), {"head": head}, opt, out_dir / "checkpoint.pt",
                     shaping=shaping, **loop_args)
    counts = {"tokens": 0, "loss_positions": 0, "target_s": 0.0, "target_tokens": 0,
              "cache_s": 0.0, "cache_tokens": 0, "eval_s": 0.0, **loop.extra.get("counts", {})}
    loop.extra["counts"] = counts
    cache = None
    if cfg.cache_features:
        cache = data.FeatureCache(Path(cfg.cache_features), {
            "data": [str(d.resolve()) for d in dirs], "shards": shards, "seq_len": cfg.seq_len,
            "layers": layers,
            "weights": manifests[0]["target"]["weights"]})
    features = Features(target, layers, cache, counts)
    evals = EvalLog(out_dir / EVAL_LOG)

    def run_eval(step: int) -> dict:
        start = time.perf_counter()
        result = evaluate(head, target, held, layers, weight, cfg)
        counts["eval_s"] += time.perf_counter() - start
        evals.write(step, result, counts)
        return result

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        if cfg.eval_every and step % cfg.eval_every == 0 and not evals.has(step):
            run_eval(step)
        batch = data.collate(train, data.batch_rows(cfg.seed, step, cfg.batch_size, len(train)))
        feats, final = features(batch)
        mask = batch.loss_mask()
        with torch.no_grad():
            label_logp = soft_labels(final, mask, weight)
            embeds = embed(batch.ids[:, 1:]).float()
        with torch.autocast(feats.device.type, torch.bfloat16, enabled=cfg.bf16_autocast):
            outs = ttt_hidden(head, feats[:, :-1].float(), embeds, cfg.ttt_steps)
            loss, per_step, agree = ttt_loss(head, outs, mask, label_logp)
        counts["tokens"] += int(batch.lengths.sum())
        counts["loss_positions"] += int(mask.sum())
        return loss, {"agree": agree, **{f"l{k}": v for k, v in enumerate(per_step, 1)}}

    n_params = sum(p.numel() for p in head.parameters())
    loop.run(step_fn, f"train eagle3 head ({n_params / 1e6:.2f}M)")
    result = evals.results[loop.step] if evals.has(loop.step) else run_eval(loop.step)
    wall = loop.elapsed

    def rate(tokens: float, seconds: float) -> float | None:
        return round(tokens / seconds, 1) if seconds > 0 and tokens else None

    head_s = wall - counts["target_s"] - counts["cache_s"] - counts["eval_s"]
    speed = {"tokens_per_s": rate(counts["tokens"], wall - counts["eval_s"]),
             "target_pass_tokens_per_s": rate(counts["target_tokens"], counts["target_s"]),
             "cache_read_tokens_per_s": rate(counts["cache_tokens"], counts["cache_s"]),
             "head_training_tokens_per_s": rate(counts["tokens"], head_s),
             **{k: round(counts[k], 1) for k in ("target_s", "cache_s", "eval_s")},
             "head_s": round(head_s, 1)}
    summary = {"kind": "eagle3", "parameters": n_params, "steps": loop.step,
               "finished": loop.finished, "tokens_seen": counts["tokens"],
               "loss_positions_seen": counts["loss_positions"], "wall_time_s": round(wall, 1),
               "speed": speed, "target_passes": {"computed": features.computed,
                                                 "cached": features.read},
               "feature_layers": layers, "draft_vocab_size": len(vocab),
               "data": {k: v for k, v in pinned.items() if k != "vocab"},
               "heldout": result, "history": loop.history, "config": asdict(cfg),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    save_head(head, out_dir / "head", target, extra={"trained": {
        k: summary[k] for k in ("steps", "tokens_seen", "feature_layers", "draft_vocab_size",
                                "heldout")} | {"data": summary["data"], "config": asdict(cfg)}})
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary
