"""specdecode's engine beside vLLM, with and without speculation, on the demo target.

    python -m specdecode.integrations.vllm_bench --out docs/benchmarks/vllm-cpu

Run in an environment with the ``vllm`` extra. The quick benchmark's 26 Spec-Bench first turns
(chat template), greedy, ``--max-tokens`` new tokens, 5 draft tokens for every drafter; each
system at batch 1 (one request at a time) and with every request in flight. Rows: vLLM without
speculation, vLLM's own ngram, vLLM with specdecode's proposers
(``specdecode.integrations.vllm``), and specdecode's own engine with the same drafters. Every
output is compared with specdecode's vanilla. Each vLLM configuration gets a fresh engine (so
SuffixDecoding's cross-request tree starts empty in every cell, as our engine's does with a fresh
store); cells run one after another, not interleaved."""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

VLLM_ROWS = [("vllm", None), ("vllm-ngram", {"method": "ngram", "num_speculative_tokens": 5,
                                              "prompt_lookup_max": 3, "prompt_lookup_min": 1}),
             ("vllm + specdecode ngram", "NgramProposer"),
             ("vllm + specdecode suffix", "SuffixProposer"),
             ("vllm + specdecode sam", "SamProposer")]
OUR_ROWS = [("specdecode vanilla", "none"), ("specdecode ngram", "ngram"),
            ("specdecode suffix", "suffix"), ("specdecode sam", "sam")]


def _prompts() -> list[list[int]]:
    from specdecode.bench.questions import load_questions
    from specdecode.chat import chat_prompt
    from specdecode.demo import load_demo

    tokenizer = load_demo().tokenizer
    return [chat_prompt(tokenizer, [{"role": "user", "content": q.turns[0]}])
            for q in load_questions(limit_per_category=2)]


def _vllm_cell(spec, prompts: list[list[int]], max_tokens: int, all_in_flight: bool):
    import vllm

    from specdecode.demo import demo_dir

    if isinstance(spec, str):
        spec = {"method": "custom_class", "model": f"specdecode.integrations.vllm.{spec}",
                "num_speculative_tokens": 5}
    d = demo_dir()
    llm = vllm.LLM(model=str(d / "target"), tokenizer=str(d / "tokenizer"), dtype="float32",
                   enforce_eager=True, kv_cache_memory_bytes=1 << 30, max_model_len=2048,
                   max_num_seqs=max(32, len(prompts)), seed=0, speculative_config=spec)
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=False)
    inputs = [vllm.TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:2], vllm.SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    start = time.perf_counter()
    if all_in_flight:
        outs = llm.generate(inputs, params, use_tqdm=False)
    else:
        outs = [llm.generate([x], params, use_tqdm=False)[0] for x in inputs]
    wall = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    gc.collect()
    return tokens, wall


def _our_cell(drafter: str, prompts: list[list[int]], max_tokens: int, all_in_flight: bool):
    import specdecode as sd
    from specdecode.demo import load_demo
    from specdecode.drafters.suffix_tree import SuffixStore

    target = load_demo().target
    options = {} if drafter == "none" else {"num_draft_tokens": 5}
    if drafter == "suffix":
        options["store"] = SuffixStore()  # a fresh cross-request tree in every cell
    common = dict(drafter=drafter, max_new_tokens=max_tokens, **options)
    sd.generate(target, prompts[0][:8], drafter="none", max_new_tokens=4)  # warm-up
    start = time.perf_counter()
    if all_in_flight:
        results = sd.generate_batch(target, prompts, batch_size=len(prompts), **common)
    else:
        results = [sd.generate(target, p, **common) for p in prompts]
    return [r.token_ids for r in results], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    prompts = _prompts()
    reference, _ = _our_cell("none", prompts, args.max_tokens, False)
    rows = []
    for mode in (False, True):
        for name, drafter in OUR_ROWS:
            tokens, wall = _our_cell(drafter, prompts, args.max_tokens, mode)
            rows.append((name, mode, tokens, wall))
            print(name, mode, round(wall, 2), flush=True)
        for name, spec in VLLM_ROWS:
            tokens, wall = _vllm_cell(spec, prompts, args.max_tokens, mode)
            rows.append((name, mode, tokens, wall))
            print(name, mode, round(wall, 2), flush=True)
    table = _table(rows, reference, len(prompts), args.max_tokens, torch.get_num_threads())
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vllm.md").write_text(table)
        (args.out / "vllm.json").write_text(json.dumps([
            {"system": n, "all_in_flight": m, "wall_s": w, "tokens": sum(map(len, t)),
             "identical": sum(a == b for a, b in zip(t, reference))} for n, m, t, w in rows],
            indent=2))


def _table(rows, reference, n: int, max_tokens: int, threads: int) -> str:
    lines = [f"{n} quick-benchmark first turns, greedy, {max_tokens} new tokens, demo target fp32, "
             f"{threads} torch threads in the driver (`python -m specdecode.integrations."
             f"vllm_bench`)", "",
             "| system | batch | tokens/s | vs own vanilla | identical to specdecode vanilla |",
             "|---|---|---|---|---|"]
    base = {}
    for name, mode, tokens, wall in rows:
        rate = sum(map(len, tokens)) / wall
        system = "vllm" if name.startswith("vllm") else "specdecode"
        if name in ("vllm", "specdecode vanilla"):
            base[(system, mode)] = rate
        ratio = rate / base[(system, mode)] if (system, mode) in base else float("nan")
        same = sum(a == b for a, b in zip(tokens, reference))
        lines.append(f"| {name} | {'all in flight' if mode else '1'} | {rate:.0f} | "
                     f"{ratio:.2f}x | {same}/{len(tokens)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
