"""`specdecode train-drafter`: train a drafter for a target (EAGLE head, Medusa heads), and the
corpus it trains on, tokenized with the target's own tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
import numpy as np


def corpus_arrays(tokenizer, data_dir: Path, train_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token arrays of the demo corpus (ShareGPT + Python's standard library,
    see ``train/corpus.py``) in ``tokenizer``'s ids: the first ``train_tokens`` training tokens in
    corpus order, validation split by document hash. Cached in ``data_dir`` per tokenizer."""
    from tqdm import tqdm

    from specdecode.train.corpus import all_documents, is_validation

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = hashlib.sha256(vocab.encode()).hexdigest()[:16]
    meta_file = data_dir / "corpus.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("tokenizer") == key and meta.get("train_tokens", 0) >= train_tokens:
            return (np.load(data_dir / "train.npy", mmap_mode="r"),
                    np.load(data_dir / "val.npy", mmap_mode="r"))
    eot = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    batch: list[tuple[str, str]] = []
    bar = tqdm(total=train_tokens, desc="tokenizing corpus", unit="tok", unit_scale=True)

    def flush() -> None:
        ids = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
        for (doc_id, _), row in zip(batch, ids):
            split = "val" if is_validation(doc_id) else "train"
            parts[split].append(np.asarray(row + [eot], dtype=np.int32))
            counts[split] += len(row) + 1
            if split == "train":
                bar.update(len(row) + 1)
        batch.clear()

    for doc in all_documents():
        batch.append(doc)
        if len(batch) == 256:
            flush()
            if counts["train"] >= train_tokens:
                break
    if batch:
        flush()
    bar.close()
    if not parts["train"]:
        raise click.ClickException("the corpus yielded no documents")
    if not parts["val"]:  # a small corpus without a hashed-out document: hold out its last ones
        take = max(1, len(parts["train"]) // 50) if len(parts["train"]) > 1 else 0
        parts["val"] = parts["train"][len(parts["train"]) - take:] or parts["train"][-1:]
        parts["train"] = parts["train"][:len(parts["train"]) - take] or parts["train"]
    data_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    for split, arr in arrays.items():
        np.save(data_dir / f"{split}.npy", arr)
    meta_file.write_text(json.dumps({"tokenizer": key, "train_tokens": counts["train"],
                                     "val_tokens": counts["val"]}))
    return arrays["train"], arrays["val"]


@click.command("train-drafter")
@click.option("--kind", type=click.Choice(["distill", "eagle", "eagle3", "medusa"]), required=True,
              help="distill: DistillSpec on-policy distillation of a draft model; eagle: an "
                   "EAGLE-1 feature head (one decoder layer); eagle3: an EAGLE-3 head (a low, a "
                   "middle and a high layer of the target fused, training-time test, its own "
                   "read-out over a reduced draft vocabulary) trained on the target's own answers "
                   "(--data DIR, from `specdecode build-drafter-data`); medusa: Medusa-1 heads.")
@click.option("--target", default=None, help="Target model: a directory, a .gguf file, the preset "
              "smollm2-135m / gemma3-270m or a Hub id (default: the demo target).")
@click.option("--draft-model", default=None,
              help="distill: the draft model to start from (default: the demo draft).")
@click.option("--loss", type=click.Choice(["tvd", "kl"]), default="tvd", show_default=True,
              help="distill: total variation distance or forward KL to the target.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output directory: checkpoint.pt, summary.json and head/ (the eagle / medusa "
                   "drafters' head=... option) or model/ (distill: a draft model directory); "
                   "eagle3 also eval.log (a JSON line per held-out evaluation) and data.json (the "
                   "shards and draft vocabulary it trains on). Rerun the same command to resume.")
@click.option("--corpus-cache", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Where the tokenized corpus is cached (default: OUT/data).")
@click.option("--corpus-tokens", type=int, default=8_000_000, show_default=True,
              help="Training tokens to tokenize from the corpus.")
@click.option("--steps", type=int, default=600, show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="Sequences per step (default: 16; eagle3: 8).")
@click.option("--seq-len", type=int, default=None,
              help="Window length (default: 256; eagle3: 512, the prompt's tail and the answer; "
                   "distill: half corpus prompt, half generated continuation).")
@click.option("--lr", type=float, default=None,
              help="Peak learning rate (default: 1e-3 for eagle / medusa, 5e-4 for eagle3, 3e-4 "
                   "for distill).")
@click.option("--medusa-heads", type=int, default=3, show_default=True,
              help="Medusa: number of heads (draft depth).")
@click.option("--data", "data_kind", default=None, metavar="corpus|target|DIR",
              help="eagle / medusa: train on corpus windows (corpus, the default), or on short "
                   "corpus prompts continued by the target itself (target: greedily or sampled at "
                   "temperature 1, see --greedy-share: the text the heads meet when drafting; "
                   "slower per step). eagle3 (required): a directory written by `specdecode "
                   "build-drafter-data` for this target, or several separated by commas (their "
                   "weights and tokenizer are checked; the target runs in the data's dtype).")
@click.option("--prompt-len", type=int, default=64, show_default=True,
              help="--data target: corpus tokens before the target's continuation.")
@click.option("--greedy-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="--data target: share of the rows the target continues greedily (the others "
                   "sampled at temperature 1).")
@click.option("--init-head", type=click.Path(exists=True, file_okay=False), default=None,
              help="eagle / medusa: start from this saved head (a second training stage) instead "
                   "of a fresh one.")
@click.option("--draft-layers", default=None,
              help="distill: cut the draft from the target itself instead of --draft-model: these "
                   "of its decoder layers (comma-separated indices, e.g. 0,1,2,3: on SmolLM2 its "
                   "first layers were the best start) on its embedding and LM head, which stay "
                   "frozen. Also saves OUT/head (the trained layers only, tied to the target's "
                   "weights; copied to heads/<model>/draft it loads by default for that target).")
@click.option("--draft-vocab", type=click.IntRange(0), default=None,
              help="distill: the draft reads out only the N most used corpus tokens (its loss, "
                   "and the draft-model drafter's read-out by default; default 0: all). eagle3: "
                   "the head's vocabulary, the N most frequent tokens of the training answers "
                   "(default 8192; the summary reports the share of answer tokens it covers).")
@click.option("--target-rows", type=int, default=0, show_default=True,
              help="distill: rows of each batch the target continues (half greedy, half sampled) "
                   "instead of the draft.")
@click.option("--loss-vocab", type=click.IntRange(0), default=0, show_default=True,
              help="eagle / medusa: the heads' classification loss over the N most frequent "
                   "corpus tokens only (a large vocabulary's LM head dominates the step "
                   "otherwise). 0: all.")
@click.option("--tied-heads", is_flag=True,
              help="medusa: every head reads out through the target's own LM head (frozen, not "
                   "saved): only the residual blocks train; a few MB instead of one "
                   "vocabulary-sized matrix per head.")
@click.option("--ttt-steps", type=click.IntRange(1), default=None,
              help="eagle3: training-time test depth, the steps the head runs on its own outputs "
                   "(default 5).")
@click.option("--feature-layers", default=None,
              help="eagle3: the target's decoder layers whose outputs the head fuses (comma-"
                   "separated, each below the last layer; default: EAGLE-3's low, middle and high "
                   "layer, 2,15,27 on a 30-layer target).")
@click.option("--intermediate-size", type=click.IntRange(1), default=None,
              help="eagle3: the head's MLP width (default: the target's).")
@click.option("--eval-every", type=click.IntRange(0), default=None,
              help="eagle3: steps between held-out evaluations (the first before training), "
                   "each a line in OUT/eval.log (default 100; 0: at the end only).")
@click.option("--eval-examples", type=click.IntRange(1), default=None,
              help="eagle3: held-out examples evaluated (default 128).")
@click.option("--cache-features", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="eagle3: keep the target's features of the training set in this directory "
                   "(bfloat16 .npy files, about 4 * hidden size * 2 bytes a token): the first "
                   "epoch writes them, later epochs and resumed runs read them instead of running "
                   "the target (on SmolLM2 a target pass costs 1.2-1.6x the head's training step "
                   "on the same tokens).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, help="torch threads (0: torch's default).")
@click.option("--time-budget", type=float, default=0.0,
              help="Stop after this many minutes with a checkpoint; rerun to resume (the budget "
                   "counts every run's time). 0: none.")
def train_drafter(kind, target, draft_model, loss, out_dir, data_dir, corpus_tokens, steps,
                  batch_size, seq_len, lr, medusa_heads, data_kind, prompt_len, greedy_share,
                  init_head, draft_layers, draft_vocab, target_rows, loss_vocab, tied_heads,
                  ttt_steps, feature_layers, intermediate_size, eval_every, eval_examples,
                  cache_features, seed, threads, time_budget) -> None:
    """Train a drafter on a frozen target: seeded, step-scheduled, resumable, with a progress bar
    and OUT/summary.json. The target never changes, so decoding with the result stays lossless.

    \b
    eagle3 example (then eagle:head=OUT/head, or copy OUT/head to heads/<model>/eagle3):
      specdecode build-drafter-data --target smollm2-135m --out work/selfdata
      specdecode train-drafter --kind eagle3 --target smollm2-135m --data work/selfdata \\
          --out work/eagle3 --time-budget 60 --threads 2"""
    import torch

    from specdecode.cli.shared import load_models
    from specdecode.train.distill import DistillConfig, distill
    from specdecode.train.heads import HeadConfig, most_used, train_head
    from specdecode.types import SpecDecodeError

    eagle3_only = {"ttt_steps": ttt_steps, "feature_layers": feature_layers,
                   "intermediate_size": intermediate_size, "eval_every": eval_every,
                   "eval_examples": eval_examples, "cache_features": cache_features}
    if kind == "eagle3":
        from specdecode.train.eagle3_cli import run_eagle3

        run_eagle3(target=target, out_dir=out_dir, data=data_kind, steps=steps,
                   batch_size=batch_size, seq_len=seq_len, lr=lr, draft_vocab=draft_vocab,
                   seed=seed, threads=threads, time_budget=time_budget, **eagle3_only)
        return
    given = [name for name, value in eagle3_only.items() if value is not None]
    if given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} applies to --kind eagle3 only")
    data_kind = data_kind or "corpus"
    if data_kind not in ("corpus", "target"):
        raise click.UsageError(f"--data {data_kind!r}: --kind {kind} takes corpus or target (a "
                               "data directory is for --kind eagle3)")
    batch_size = 16 if batch_size is None else batch_size
    seq_len = 256 if seq_len is None else seq_len
    draft_vocab = draft_vocab or 0
    lr = lr if lr is not None else (3e-4 if kind == "distill" else 1e-3)
    if min(steps, batch_size, seq_len, medusa_heads, prompt_len) < 1 or lr <= 0:
        raise click.UsageError("--steps, --batch-size, --seq-len, --medusa-heads, --prompt-len and "
                               "--lr must be positive")
    if data_kind == "target" and prompt_len >= seq_len:
        raise click.UsageError(f"--prompt-len {prompt_len} leaves nothing for the target to write "
                               f"in --seq-len {seq_len}")
    if not 0 <= target_rows <= batch_size:
        raise click.UsageError(f"--target-rows must be between 0 and --batch-size ({batch_size})")
    if tied_heads and kind != "medusa":
        raise click.UsageError("--tied-heads applies to --kind medusa only")
    if (draft_layers is not None or draft_vocab) and kind != "distill":
        raise click.UsageError("--draft-layers and --draft-vocab apply to --kind distill only")
    if draft_layers is not None and draft_model is not None:
        raise click.UsageError("give --draft-layers (cut the draft from the target) or "
                               "--draft-model, not both")
    try:
        model, draft, tokenizer = load_models(target, draft_model,
                                              kind == "distill" and draft_layers is None)
        if draft_layers is not None:
            from specdecode.models.layer_draft import cut_draft, parse_layers

            draft = cut_draft(model, parse_layers(draft_layers, model.config.num_hidden_layers))
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    train_data, val_data = corpus_arrays(tokenizer, data_dir or out_dir / "data", corpus_tokens)
    if min(train_data.size, val_data.size) <= seq_len + 1:
        raise click.ClickException(f"the corpus is shorter than --seq-len {seq_len}")
    try:
        if kind == "distill":
            if draft is None:
                raise click.ClickException("distill needs a draft model (--draft-model DIR)")
            if draft.get_output_embeddings().weight.shape[0] != \
                    model.get_output_embeddings().weight.shape[0]:
                raise click.ClickException("the draft's vocabulary differs from the target's")
            half = max(1, seq_len // 2)
            dcfg = DistillConfig(loss=loss, steps=steps, batch_size=batch_size, prompt_len=half,
                                 gen_len=seq_len - half, lr=lr, seed=seed, threads=threads,
                                 time_budget_s=time_budget * 60, target_rows=target_rows)
            vocab = most_used(train_data, model.config.vocab_size, draft_vocab) \
                if 0 < draft_vocab < model.config.vocab_size else None
            draft.config.draft_vocab = vocab
            summary = distill(model, draft, train_data, val_data, out_dir, dcfg, tokenizer,
                              None if vocab is None else torch.tensor(sorted(vocab)))
            summary["draft"] = (f"cut from the target: layers {draft_layers}" if draft_layers
                                else draft_model or "specdecode-demo-draft")
            if draft_layers is not None:
                from specdecode.models.layer_draft import save_cut_draft

                save_cut_draft(draft, out_dir / "head", model, vocab,
                               {"steps": summary["steps"], "after": summary["after"]})
        else:
            cfg = HeadConfig(kind=kind, steps=steps, batch_size=batch_size, seq_len=seq_len,
                             lr=lr, medusa_heads=medusa_heads, seed=seed, threads=threads,
                             time_budget_s=time_budget * 60, data=data_kind,
                             prompt_len=prompt_len, greedy_share=greedy_share,
                             init_head=init_head or "", loss_vocab=loss_vocab,
                             medusa_tied=tied_heads)
            summary = train_head(model, train_data, val_data, out_dir, cfg)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    summary["target"] = target or "specdecode-demo-target"
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}))
