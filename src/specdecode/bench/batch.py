"""`specdecode bench --batch-size B[,B...]`: the questions' first turns streamed through the
continuous-batching scheduler with B requests in flight, for every method, interleaved per batch
size (vanilla first). Reports aggregate tokens/s, mean per-request latency (admission to finish),
MAT, and every row checked against that prompt decoded alone by vanilla (batch 1); a differing row
is counted as a near tie when vanilla's top-2 logit margin at the first differing token is below
``NEAR_TIE`` (floating-point reductions change with batch shapes), as a mismatch otherwise.
transformers' ``generate`` over left-padded static batches (vanilla) runs as the peer ``hf-batch``.

``constraints`` (the JSON workload): one per prompt; every method runs each row under its own
(``constrained=false`` methods without it, checked against unconstrained vanilla), and so do the
batch-1 references; ``hf-batch`` does not run (it has no grammar).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

import specdecode as sd
from specdecode.bench.divergence import first_divergence, top2_margin
from specdecode.bench.methods import HF_METHODS, Settings, method_options, parse_spec

NEAR_TIE = 1e-5
HF_PEER = "hf-batch"


def run_scheduler(spec: str, s: Settings, prompts: list[list[int]], references: list[list[int]],
                  batch_size: int, constraints: list | None = None
                  ) -> tuple[float, list[sd.GenerationResult | None]]:
    """(wall seconds, per-prompt (tokens, stats)) for one of our methods at ``batch_size``."""
    scheduler = sd.Scheduler(s.target, max_batch_size=batch_size, exact=s.exact)
    ids = []
    for i, (prompt, reference) in enumerate(zip(prompts, references)):
        row = s if constraints is None else replace(s, constraint=constraints[i])
        drafter, options = method_options(spec, row, reference)
        ids.append(scheduler.add_request(
            prompt, drafter=drafter, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
            top_k=s.top_k, top_p=s.top_p, seed=s.seed, **options))
    start = time.perf_counter()
    while scheduler.has_unfinished():
        scheduler.step()
    wall = time.perf_counter() - start
    results = []
    for rid in ids:
        tokens, stats, reason = scheduler.release(rid)
        results.append(sd.GenerationResult(tokens, [], stats, reason))
    return wall, results


@torch.inference_mode()
def run_hf_batch(s: Settings, prompts: list[list[int]], batch_size: int,
                 eos: frozenset[int]) -> tuple[float, list[list[int]]]:
    """transformers' greedy ``generate`` over static, left-padded batches (the attention mask
    marks the padding)."""
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        group = prompts[i:i + batch_size]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), s.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(group):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        out = s.target.generate(ids, attention_mask=mask, max_new_tokens=s.max_new_tokens,
                                do_sample=False, temperature=None, top_k=None, top_p=None,
                                pad_token_id=s.pad_token_id)
        for row in out[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            outputs.append(row[:cut])
    return time.perf_counter() - start, outputs


def compare_rows(model, prompts, references, outputs) -> dict:
    equal = near = mismatch = 0
    for prompt, ref, out in zip(prompts, references, outputs):
        if out == ref:
            equal += 1
            continue
        first = first_divergence(ref, out)
        if first < len(ref) and top2_margin(model, prompt, ref[:first]) < NEAR_TIE:
            near += 1
        else:
            mismatch += 1
    return {"rows_equal": equal, "near_ties": near, "mismatches": mismatch}


def vanilla_references(s: Settings, prompts: list[list[int]], constraints: list | None
                       ) -> list[list[int]]:
    """Every prompt decoded alone by vanilla (under its constraint, if any)."""
    rows = constraints or [None] * len(prompts)
    return [sd.generate(s.target, p, drafter="none", max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                        sampling=s.sampling, exact=s.exact, constraint=c,
                        tokenizer=s.tokenizer).token_ids
            for p, c in tqdm(list(zip(prompts, rows)), desc="batch-1 vanilla references",
                             leave=False)]


def run_batch_benchmark(prompts: list[list[int]], specs: list[str], sizes: list[int], s: Settings,
                        eos: frozenset[int], repeats: int = 1, hf_peer: bool = True,
                        constraints: list | None = None) -> list[dict]:
    """One row per (batch size, method); ``constraints``: one per prompt (module docstring)."""
    references = vanilla_references(s, prompts, constraints)
    plain = {spec: constraints is not None and parse_spec(spec)[1].get("constrained") is False
             for spec in specs}  # run (and checked) without the row's constraint
    free = vanilla_references(s, prompts, None) if any(plain.values()) else references
    warm = [p[:16] for p in prompts[:2]]
    for spec in specs:  # warm-up: every method once, briefly
        short = Settings(**{**s.__dict__, "max_new_tokens": 4})
        run_scheduler(spec, short, warm, [r[:4] for r in references[:2]], 2,
                      None if constraints is None else constraints[:2])
    ours = [m for m in specs if parse_spec(m)[0] not in HF_METHODS]
    methods = ours + ([HF_PEER] if hf_peer and s.temperature == 0 and constraints is None
                      else [])
    rows = []
    bar = tqdm(total=len(sizes) * len(methods) * repeats, desc="batch runs", leave=False)
    for size in sizes:
        walls: dict[str, list[float]] = {m: [] for m in methods}
        outs: dict[str, list] = {}
        for _ in range(repeats):
            for spec in methods:  # interleaved: drift hits every method alike
                if spec == HF_PEER:
                    wall, tokens = run_hf_batch(s, prompts, size, eos)
                    outs[spec] = (tokens, None)
                else:
                    wall, results = run_scheduler(spec, s, prompts, free if plain[spec]
                                                  else references, size, constraints)
                    outs[spec] = ([r.token_ids for r in results], results)
                walls[spec].append(wall)
                bar.update()
        for spec in methods:
            tokens, results = outs[spec]
            wall = statistics.median(walls[spec])
            new = sum(len(t) for t in tokens)
            row = {"method": spec, "batch_size": size, "requests": len(prompts),
                   "new_tokens": new, "wall_s": round(wall, 4),
                   "tokens_per_s": round(new / wall, 2)}
            if results is not None:
                steps = sum(r.stats.steps for r in results)
                row["mean_latency_s"] = round(statistics.mean(r.stats.wall_s for r in results), 4)
                row["mat"] = round(new / steps, 4) if steps else 0.0
                row["plain_steps"] = sum(r.stats.plain_steps for r in results)
            if s.temperature == 0 or s.sampling == "coupled":
                row.update(compare_rows(s.target, prompts, free if plain.get(spec) else
                                        references, tokens))
            rows.append(row)
    bar.close()
    vanilla = {r["batch_size"]: r["tokens_per_s"] for r in rows if r["method"] == "vanilla"}
    base = vanilla.get(1)
    for row in rows:
        row["speedup_vs_vanilla"] = round(row["tokens_per_s"] / vanilla[row["batch_size"]], 3)
        if base:
            row["vs_vanilla_batch1"] = round(row["tokens_per_s"] / base, 3)
    return rows


def batch_markdown(rows: list[dict], env: dict) -> str:
    lines = ["# Batched decoding: aggregate throughput", "",
             f"Target `{env.get('model_id')}`, draft `{env.get('draft_id')}`, {env.get('cpu')}, "
             f"{env.get('threads')} torch threads, {env.get('dtype')}, temperature "
             f"{env.get('temperature')}, {env.get('max_new_tokens')} new tokens per request, "
             f"{rows[0]['requests'] if rows else 0} requests (the questions' first turns).", "",
             f"Command: `{env.get('command')}`", "",
             *([f"Prompt format: {env['prompt_format']}.", ""] if env.get("prompt_format") else []),
             "| method | B | tokens/s | vs vanilla same B | vs vanilla B=1 | mean latency s | MAT "
             "| rows equal | near ties | mismatches |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs1 = f"{r['vs_vanilla_batch1']:.2f}x" if "vs_vanilla_batch1" in r else "-"
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | "
            f"{r['speedup_vs_vanilla']:.2f}x | "
            f"{vs1} | "
            f"{r.get('mean_latency_s', '-')} | {r.get('mat', '-')} | "
            f"{r.get('rows_equal', '-')}/{r['requests']} | {r.get('near_ties', '-')} | "
            f"{r.get('mismatches', '-')} |")
    lines += ["", "Latency: from a request's admission to its last token. Rows equal: identical "
              "to that prompt decoded alone by vanilla; near ties: differing first where "
              f"vanilla's top-2 margin is below {NEAR_TIE:g}. `hf-batch`: transformers "
              "`generate`, greedy, static left-padded batches.", ""]
    return "\n".join(lines)


def write_batch_report(out_dir: Path, rows: list[dict], env: dict) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "batch.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    md = batch_markdown(rows, env)
    (out_dir / "batch.md").write_text(md)
    return md
