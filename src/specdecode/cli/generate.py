"""`specdecode generate`: one prompt, or many from a file through the continuous-batching
scheduler, with the step statistics (and, with --compare, vanilla's speed and output)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from specdecode.api import DEFAULT_POLICY
from specdecode.cli.shared import (
    POLICY_HELP,
    check_drafter,
    check_policy_name,
    encode_prompt,
    load_models,
    model_options,
    parse_options,
    quiet_transformers,
)
from specdecode.drafters.registry import DEFAULT_DRAFTER, Needs, needs_of
from specdecode.structured.cli import (
    ROW_HELP,
    constraint_kwargs,
    constraint_options,
    row_constraints,
)
from specdecode.types import DEFAULT_SAMPLING, SpecDecodeError
from specdecode.verify import SAMPLING_MODES


@click.command()
@model_options()
@click.option("--drafter", default=DEFAULT_DRAFTER, show_default=True, callback=check_drafter,
              help="Drafter name (`specdecode drafters` lists them with their options).")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Many prompts: a text file with one prompt per line, or JSONL "
                                 "with a \"prompt\" (or Spec-Bench \"turns\") field per line. "
                                 "They run through the continuous-batching scheduler. " + ROW_HELP)
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="With --prompts-file: requests in flight at once (each row's output is what it "
                   "would be alone).")
@click.option("--chat", is_flag=True, help="Wrap the prompt with the tokenizer's chat template.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--sampling", type=click.Choice(list(SAMPLING_MODES)), default=DEFAULT_SAMPLING,
              show_default=True, help="The exact rule for sampled drafts: traversal (block "
                                      "verification on chains), rejection (token-level), block, "
                                      "spectr; coupled: output bit-identical to vanilla with the "
                                      "same seed (docs/lossless.md).")
@click.option("--num-draft-tokens", "-k", type=int, default=None, help="Draft length per step.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Other drafter options, e.g. -o tree_width=2 -o num_layers=3.")
@click.option("--policy", default=None, callback=check_policy_name, help=POLICY_HELP)
@constraint_options()
@click.option("--compare", is_flag=True, help="Also run vanilla decoding; print the speedup.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model directory.")
def generate(target, draft_model, dtype, device, exact, compile_forward, drafter, prompt,
             prompts_file, batch_size, chat,
             max_new_tokens, temperature, top_k, top_p, seed, sampling, num_draft_tokens, options,
             policy, json_schema, regex, grammar_file, compare, as_json, threads,
             trust_remote_code) -> None:
    """Generate text with speculative decoding and print the step statistics (one --prompt, or
    many from --prompts-file, batched)."""
    import torch

    import specdecode as sd

    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give exactly one of --prompt and --prompts-file")
    if batch_size < 1:
        raise click.UsageError("--batch-size must be >= 1")
    try:
        sd.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, mode=sampling)
        opts = parse_options(options, drafter)
        if num_draft_tokens is not None:
            opts["num_draft_tokens"] = num_draft_tokens
        if policy is not None:
            opts["policy"] = policy
        need_draft = Needs.DRAFT_MODEL in needs_of(drafter, opts)
        model, draft, tokenizer = load_models(target, draft_model, need_draft, trust_remote_code,
                                              dtype, device, compile_forward)
        common = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, sampling=sampling, exact=exact,
                      **constraint_kwargs(json_schema, regex, grammar_file, tokenizer))
        if prompts_file is not None:
            prompts = [encode_prompt(tokenizer, p, chat) for p in read_prompts(prompts_file)]
            common["constraint"] = row_constraints(prompts_file, common.get("constraint"),
                                                   tokenizer)
            generate_many(model, tokenizer, prompts, batch_size, as_json, compare,
                          drafter=drafter, draft_model=draft, **common, **opts)
            return
        ids = encode_prompt(tokenizer, prompt, chat)
        sd.prepare(model, ids, drafter=drafter, draft_model=draft, **common, **opts)  # checks
        sd.generate(model, ids[:8], drafter="none", max_new_tokens=2, exact=exact)  # warm-up
        if compile_forward:  # every kind of forward compiled before the timed run
            from specdecode.models import warm_up

            warm_up(model, draft, exact=exact)
        start = time.perf_counter()
        result = sd.generate(model, ids, drafter=drafter, draft_model=draft, **common, **opts)
        wall = time.perf_counter() - start
        report = {"text": tokenizer.decode(result.token_ids, skip_special_tokens=False),
                  "drafter": drafter, "policy": policy or DEFAULT_POLICY, "new_tokens": len(result.token_ids),
                  "finish_reason": result.finish_reason, "wall_s": round(wall, 4),
                  "tokens_per_s": round(len(result.token_ids) / wall, 2), **{
                      k: v for k, v in result.stats.as_dict().items() if k != "tokens_per_s"}}
        if compare:
            start = time.perf_counter()
            base = sd.generate(model, ids, drafter="none", **common)
            base_wall = time.perf_counter() - start
            report["vanilla"] = {"new_tokens": len(base.token_ids), "wall_s": round(base_wall, 4),
                                 "tokens_per_s": round(len(base.token_ids) / base_wall, 2)}
            report["speedup"] = round(report["tokens_per_s"] / report["vanilla"]["tokens_per_s"], 3)
            report["identical_to_vanilla"] = base.token_ids == result.token_ids
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(report["text"])
    click.echo(f"\n[{drafter}] {report['new_tokens']} tokens in {report['steps']} steps, "
               f"MAT {report['mat']:.2f}, acceptance {report['acceptance_rate']:.2f}, "
               f"{report['tokens_per_s']:.1f} tokens/s", err=False)
    if compare:
        same = "identical" if report["identical_to_vanilla"] else "DIFFERENT"
        if sampling != "coupled" and temperature > 0:
            same += f" ({sampling} sampling matches in distribution, not token by token)"
        click.echo(f"[vanilla] {report['vanilla']['tokens_per_s']:.1f} tokens/s; speedup "
                   f"{report['speedup']:.2f}x; output {same}")


def generate_many(model, tokenizer, prompts: list[list[int]], batch_size: int, as_json: bool,
                  compare: bool, **options) -> None:
    """``generate --prompts-file``: every prompt through the scheduler, ``batch_size`` in flight;
    prints each output, then aggregate tokens/s and mean latency (and, with ``compare``, each
    prompt decoded alone by vanilla: the equality check and its tokens/s)."""
    from tqdm import tqdm

    import specdecode as sd

    per_row = options.get("constraint")
    per_row = per_row if isinstance(per_row, list) else [per_row] * len(prompts)
    sd.generate_batch(model, [p[:8] for p in prompts[:2]], batch_size=batch_size,
                      **{**options, "max_new_tokens": 2, "constraint": per_row[:2]})  # warm-up
    bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=as_json, leave=False)
    start = time.perf_counter()
    results = sd.generate_batch(model, prompts, batch_size=batch_size,
                                progress=lambda n: bar.update(n - bar.n), **options)
    wall = time.perf_counter() - start
    bar.close()
    tokens = sum(len(r.token_ids) for r in results)
    summary = {"requests": len(prompts), "batch_size": batch_size, "new_tokens": tokens,
               "wall_s": round(wall, 4), "tokens_per_s": round(tokens / wall, 2),
               "mean_latency_s": round(sum(r.stats.wall_s for r in results) / len(results), 4),
               "mat": round(tokens / max(1, sum(r.stats.steps for r in results)), 4)}
    if compare:
        common = {k: v for k, v in options.items() if k in (
            "max_new_tokens", "temperature", "top_k", "top_p", "seed", "sampling", "exact")}
        start = time.perf_counter()
        base = [sd.generate(model, p, drafter="none", constraint=c, **common)
                for p, c in zip(prompts, per_row)]
        base_wall = time.perf_counter() - start
        summary["vanilla_batch1_tokens_per_s"] = round(
            sum(len(b.token_ids) for b in base) / base_wall, 2)
        summary["speedup_vs_vanilla_batch1"] = round(
            summary["tokens_per_s"] / summary["vanilla_batch1_tokens_per_s"], 3)
        summary["rows_identical_to_vanilla"] = sum(
            b.token_ids == r.token_ids for b, r in zip(base, results))
    rows = [{"text": tokenizer.decode(r.token_ids, skip_special_tokens=False),
             "new_tokens": len(r.token_ids), "finish_reason": r.finish_reason,
             "steps": r.stats.steps, "mat": round(r.stats.mat, 4),
             "acceptance_rate": round(r.stats.acceptance_rate, 4),
             "latency_s": round(r.stats.wall_s, 4)} for r in results]
    if as_json:
        click.echo(json.dumps({**summary, "results": rows}))
        return
    for i, row in enumerate(rows):
        click.echo(f"--- [{i}] {row['new_tokens']} tokens, MAT {row['mat']:.2f}, "
                   f"{row['finish_reason']}\n{row['text']}")
    click.echo(f"\n[{options.get('drafter')}] {len(prompts)} requests, batch size {batch_size}: "
               f"{tokens} tokens in {wall:.2f} s, {summary['tokens_per_s']:.1f} tokens/s, "
               f"mean latency {summary['mean_latency_s']:.2f} s, MAT {summary['mat']:.2f}")
    if compare:
        click.echo(f"[vanilla, one at a time] {summary['vanilla_batch1_tokens_per_s']:.1f} "
                   f"tokens/s; speedup {summary['speedup_vs_vanilla_batch1']:.2f}x; "
                   f"{summary['rows_identical_to_vanilla']}/{len(prompts)} rows identical")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (text), or per JSONL line its "prompt" or first Spec-Bench turn."""
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                prompts.append(str(row["prompt"] if "prompt" in row else row["turns"][0]))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
                raise SpecDecodeError(f"{path}:{n}: expected a JSON object with \"prompt\" or "
                                      f"\"turns\" ({err})") from err
        else:
            prompts.append(line)
    if not prompts:
        raise SpecDecodeError(f"{path} holds no prompts")
    return prompts
