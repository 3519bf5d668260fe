"""`specdecode train-drafter --kind eagle3 --data DIR[,DIR...]`: the command-line side of
``train/eagle3.py`` (defaults, checks, loading the target in its data's dtype, the summary)."""

from __future__ import annotations

import json
from pathlib import Path

import click

# train-drafter options that mean nothing to eagle3 (it reads a self-written data directory)
NOT_FOR_EAGLE3 = ("draft_model", "loss", "data_dir", "corpus_tokens", "medusa_heads",
                  "prompt_len", "greedy_share", "init_head", "draft_layers", "target_rows",
                  "loss_vocab", "tied_heads")


def _refuse_other_options() -> None:
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return
    for param in ctx.command.params:
        if param.name in NOT_FOR_EAGLE3 and \
                ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{param.opts[0]} does not apply to --kind eagle3")


def parse_layers(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"--feature-layers {text!r}: give comma-separated layer indices, "
                               "e.g. 2,15,27") from None


def run_eagle3(*, target, out_dir: Path, data, steps, batch_size, seq_len, lr, draft_vocab, seed,
               threads, time_budget, ttt_steps, feature_layers, intermediate_size, eval_every,
               eval_examples, cache_features) -> dict:
    from specdecode.cli.shared import load_models, model_id, quiet_transformers
    from specdecode.models.cpu import allow_amx
    from specdecode.train.eagle3 import Eagle3Config, train_eagle3
    from specdecode.train.eagle3_data import data_dirs
    from specdecode.train.selfdata_store import load_manifest
    from specdecode.types import SpecDecodeError

    _refuse_other_options()
    if not data:
        raise click.UsageError("--kind eagle3 needs --data DIR: a directory written by "
                               "`specdecode build-drafter-data --target ... --out DIR`")
    defaults = Eagle3Config()
    cfg = Eagle3Config(
        data_dir=str(data), steps=steps, warmup=min(defaults.warmup, max(1, steps // 10)),
        batch_size=defaults.batch_size if batch_size is None else batch_size,
        seq_len=defaults.seq_len if seq_len is None else seq_len,
        lr=defaults.lr if lr is None else lr,
        draft_vocab=defaults.draft_vocab if draft_vocab is None else draft_vocab,
        ttt_steps=ttt_steps or defaults.ttt_steps, feature_layers=parse_layers(feature_layers),
        intermediate_size=intermediate_size or 0, seed=seed, threads=threads,
        time_budget_s=time_budget * 60,
        eval_every=defaults.eval_every if eval_every is None else eval_every,
        eval_examples=eval_examples or defaults.eval_examples,
        cache_features=str(cache_features) if cache_features else "")
    if min(cfg.steps, cfg.batch_size, cfg.draft_vocab) < 1 or cfg.lr <= 0:
        raise click.UsageError("--steps, --batch-size, --draft-vocab and --lr must be positive")
    if cfg.seq_len < 3:
        raise click.UsageError(f"--seq-len {cfg.seq_len}: a window needs at least 3 tokens")
    if time_budget < 0:
        raise click.UsageError("--time-budget must be >= 0")
    quiet_transformers()
    # training needs no batch invariance: oneDNN may use AMX, and the head's step then runs under
    # bfloat16 autocast (without AMX, float32 was the faster of the two here)
    cfg.bf16_autocast = allow_amx()
    try:
        dirs = data_dirs(data)
        for each in dirs:
            if not each.is_dir():
                raise SpecDecodeError(f"no data directory {str(each)!r}: build one with "
                                      "`specdecode build-drafter-data --target ... --out DIR`")
        dtypes = {load_manifest(each).get("options", {}).get("dtype") for each in dirs}
        if len(dtypes) > 1:
            raise SpecDecodeError(f"--data {data}: the directories were built in different "
                                  f"dtypes ({', '.join(sorted(map(str, dtypes)))}); train on "
                                  "directories of one dtype")
        dtype = dtypes.pop()
        model, _, tokenizer = load_models(target, None, False, dtype=dtype)
        summary = train_eagle3(model, tokenizer, out_dir, cfg)
    except (SpecDecodeError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    summary["target"] = model_id(target, "specdecode-demo-target")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    click.echo(json.dumps({k: v for k, v in summary.items() if k not in ("history", "config")}))
    return summary
