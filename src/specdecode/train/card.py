"""Measure the shipped demo pair and write its model card: `python -m specdecode.train.card`.

Numbers: validation loss/perplexity (from training), distinct-2 ratio of greedy outputs on 20
Spec-Bench prompts (first 128 tokens), MAT of our drafters on those prompts (the trained ones
included), the trained drafters' training summaries (the JSON files stored beside their weights),
five samples.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import specdecode as sd
from specdecode.chat import chat_prompt
from specdecode.demo import demo_dir, load_demo
from specdecode.questions import load_questions


def distinct2(tokens: list[int]) -> float:
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def measure(num_prompts: int = 20, max_new_tokens: int = 128) -> dict:
    demo = load_demo()
    questions = load_questions()
    drafters = {"draft-model": {"draft_model": demo.draft, "num_draft_tokens": 4},
                "ngram": {"num_draft_tokens": 4},
                "layer-skip": {"num_layers": 3, "num_draft_tokens": 4},
                "eagle": {}, "medusa": {}}  # the trained heads at their defaults
    step = len(questions) // num_prompts
    chosen = [questions[i * step] for i in range(num_prompts)]
    rows = []
    for q in tqdm(chosen, desc="card prompts"):
        ids = chat_prompt(demo.tokenizer, [{"role": "user", "content": q.turns[0]}])
        greedy = sd.generate(demo.target, ids, drafter="none", max_new_tokens=max_new_tokens,
                             eos_token_id=[])
        row = {"question_id": q.question_id, "category": q.category, "prompt": q.turns[0],
               "distinct2": distinct2(greedy.token_ids),
               "text": demo.tokenizer.decode(greedy.token_ids, skip_special_tokens=False)}
        for name, kwargs in drafters.items():
            out = sd.generate(demo.target, ids, drafter=name, max_new_tokens=max_new_tokens,
                              policy="fixed", **kwargs)
            row[f"mat_{name}"] = out.stats.mat
        rows.append(row)
    summary = json.loads((demo_dir() / "training_summary.json").read_text())
    params = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("target", demo.target), ("draft", demo.draft))}
    return {"rows": rows, "training": summary, "parameters": params,
            "distinct2_mean": statistics.fmean(r["distinct2"] for r in rows),
            "distinct2_min": min(r["distinct2"] for r in rows),
            "distinct2_max": max(r["distinct2"] for r in rows),
            **{f"mat_{n}": statistics.fmean(r[f"mat_{n}"] for r in rows) for n in drafters},
            "drafters": drafter_summaries(),
            "torch": torch.__version__}


def drafter_summaries() -> dict[str, list[dict]]:
    """The shipped trained drafters' training summaries, stage by stage (a later stage starts from
    the earlier one's weights): ``eagle``, ``medusa`` and ``distill`` (the shipped draft)."""
    root = demo_dir()
    out = {}
    for kind, path in (("eagle", root / "eagle" / "training_summary.json"),
                       ("medusa", root / "medusa" / "training_summary.json"),
                       ("distill", root / "draft" / "distill_summary.json")):
        stages = json.loads(path.read_text())
        out[kind] = stages if isinstance(stages, list) else [stages]
    return out


def data_text(s: dict) -> str:
    c = s["config"]
    if s["kind"] == "distill":
        target_rows = c.get("target_rows", 0)
        who = (f"{c['batch_size'] - target_rows} rows sampled by the draft, {target_rows} written "
               f"by the target (half greedy)" if target_rows else "all sampled by the draft")
        return f"{c['batch_size']} x ({c['prompt_len']} corpus + {c['gen_len']} generated: {who})"
    if c.get("data", "corpus") == "target":
        gen, share = c["seq_len"] - c["prompt_len"], c.get("greedy_share", 0.5)
        how = "all greedy" if share == 1 else f"{share:.0%} of rows greedy, the rest sampled"
        return f"{c['batch_size']} x ({c['prompt_len']} corpus + {gen} written by the target: {how})"
    return f"{c['batch_size']} x {c['seq_len']} corpus tokens"


def render_drafters(m: dict) -> str:
    d = m["drafters"]

    def row(name: str, s: dict, result: str, mat: str) -> str:
        return (f"| {name} | {data_text(s)} | {s['steps']} | {s['tokens_seen'] / 1e6:.2f}M | "
                f"{s['wall_time_s'] / 60:.1f} min ({s['threads']} threads) | {result} | {mat} |")

    def result(s: dict) -> str:
        if s["kind"] == "distill":
            b, a = s["before"], s["after"]
            return (f"expected acceptance {b['val_expected_acceptance']:.3f} -> "
                    f"{a['val_expected_acceptance']:.3f}, greedy agreement "
                    f"{b['val_greedy_agreement']:.3f} -> {a['val_greedy_agreement']:.3f}")
        if s["kind"] == "medusa":
            return "top-1 accuracy by head " + " / ".join(f"{a[0]:.3f}" for a in s["topk_accuracy"])
        return f"top-1 agreement with the target {s['val_top1_agreement']:.3f}"

    lines = ["| drafter | data per step (tokens) | steps | tokens | wall time | held-out result | "
             "MAT (20 prompts) |", "|---|---|---|---|---|---|---|"]
    names = {"eagle": "`eagle` head", "medusa": "`medusa` heads", "distill": "draft, distilled"}
    mats = {"eagle": m["mat_eagle"], "medusa": m["mat_medusa"], "distill": m["mat_draft-model"]}
    for kind, stages in d.items():
        for i, s in enumerate(stages):
            size = (f"{s['parameters'] / 1e6:.2f}M" if "parameters" in s
                    else f"{m['parameters']['draft'] / 1e6:.2f}M, {s['loss']}")
            stage = f", stage {i + 1}" if len(stages) > 1 else ""
            mat = f"{mats[kind]:.2f}" if i == len(stages) - 1 else ""
            lines.append(row(f"{names[kind]} ({size}{stage})", s, result(s), mat))
    return "\n".join(lines)


def render(m: dict, template: str) -> str:
    t, d = m["training"]["target"], m["training"]["draft"]

    def model_row(name: str, s: dict) -> str:
        return (f"| {name} | {m['parameters'][name] / 1e6:.2f}M | {s['steps']} | "
                f"{s['tokens_seen'] / 1e6:.1f}M | {s['wall_time_s'] / 60:.0f} min "
                f"({s['threads']} threads) | {s['val_loss']:.3f} | "
                f"{math.exp(s['val_loss']):.1f} |")

    samples = "\n\n".join(
        f"**{r['category']}** (question {r['question_id']}): {r['prompt'][:160]!r}\n\n"
        f"```text\n{r['text'][:600]}\n```" for r in m["rows"][:5])
    numbers = "\n".join([
        "| model | parameters | steps | tokens seen | wall time | val loss | val perplexity |",
        "|---|---|---|---|---|---|---|", model_row("target", t), model_row("draft", d), "",
        f"- Distinct-2 ratio of the target's greedy output (first 128 tokens, 20 Spec-Bench "
        f"prompts, EOS ignored): mean {m['distinct2_mean']:.3f} "
        f"(min {m['distinct2_min']:.3f}, max {m['distinct2_max']:.3f}).",
        f"- Mean accepted tokens per step (MAT, k = 4, greedy) on the same prompts: "
        f"draft-model (the distilled draft) {m['mat_draft-model']:.2f}, ngram "
        f"{m['mat_ngram']:.2f}, layer-skip (first 3 of the target's 6 layers) "
        f"{m['mat_layer-skip']:.2f}; the trained heads at their defaults: eagle (chain of 5) "
        f"{m['mat_eagle']:.2f}, medusa ({m['drafters']['medusa'][-1]['config']['medusa_heads']} "
        f"heads, 16-node tree) {m['mat_medusa']:.2f}.",
    ])
    return (template.replace("{{NUMBERS}}", numbers).replace("{{SAMPLES}}", samples)
            .replace("{{DRAFTERS}}", render_drafters(m)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--template", type=Path, default=Path("docs/MODEL_CARD.template.md"))
    parser.add_argument("--out", type=Path, default=demo_dir().parent / "MODEL_CARD.md")
    parser.add_argument("--json", type=Path, default=None, help="Also write raw numbers here.")
    args = parser.parse_args()
    numbers = measure()
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2))
    args.out.write_text(render(numbers, args.template.read_text()))
    print(json.dumps({k: v for k, v in numbers.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
