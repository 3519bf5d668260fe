"""Measure the shipped demo pair and write its model card: `python -m specdecode.train.card`.

Numbers: validation loss/perplexity (from training), distinct-2 ratio of greedy outputs on 20
Spec-Bench prompts (first 128 tokens), MAT of our drafters on those prompts, five samples.
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
from specdecode.bench.questions import chat_prompt, load_questions
from specdecode.demo import demo_dir, load_demo


def distinct2(tokens: list[int]) -> float:
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def measure(num_prompts: int = 20, max_new_tokens: int = 128) -> dict:
    demo = load_demo()
    questions = load_questions()
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
        for name, kwargs in (("draft-model", {"draft_model": demo.draft}), ("ngram", {}),
                             ("layer-skip", {"num_layers": 3})):
            out = sd.generate(demo.target, ids, drafter=name, max_new_tokens=max_new_tokens,
                              num_draft_tokens=4, **kwargs)
            row[f"mat_{name}"] = out.stats.mat
        rows.append(row)
    summary = json.loads((demo_dir() / "training_summary.json").read_text())
    params = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("target", demo.target), ("draft", demo.draft))}
    return {"rows": rows, "training": summary, "parameters": params,
            "distinct2_mean": statistics.fmean(r["distinct2"] for r in rows),
            "distinct2_min": min(r["distinct2"] for r in rows),
            "distinct2_max": max(r["distinct2"] for r in rows),
            **{f"mat_{n}": statistics.fmean(r[f"mat_{n}"] for r in rows)
               for n in ("draft-model", "ngram", "layer-skip")},
            "torch": torch.__version__}


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
        f"draft-model {m['mat_draft-model']:.2f}, ngram {m['mat_ngram']:.2f}, "
        f"layer-skip (first 3 of the target's 6 layers) {m['mat_layer-skip']:.2f}.",
    ])
    return template.replace("{{NUMBERS}}", numbers).replace("{{SAMPLES}}", samples)


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
