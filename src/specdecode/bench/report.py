"""Benchmark report from the answer JSONL files (docs/DESIGN.md §5 definitions).

- speedup (Spec-Bench): mean over questions of new_tokens_q / wall_time_q (turns summed), method
  over vanilla, on the questions both answered.
- MAT: mean accept length over all steps (accepted draft tokens + the bonus token); vanilla = 1.
  Methods that report no steps (vLLM) give tokens / (tokens - accepted) from their counters.
- acceptance rate: accepted draft tokens / drafted tokens.
- identical: fraction of vanilla's questions whose every turn is token-identical to vanilla's (a
  question the method did not answer counts as different).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from specdecode.bench.divergence import NEAR_TIE, summarize
from specdecode.bench.runner import method_file

OVERALL = "overall"


def load_answers(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["question_id"]: row for row in rows}


def speed(row: dict) -> float:
    choice = row["choices"][0]
    wall = sum(choice["wall_time"])
    return sum(choice["new_tokens"]) / wall if wall > 0 else 0.0


def identical(base: dict, row: dict | None) -> bool:
    return row is not None and row["choices"][0]["token_ids"] == base["choices"][0]["token_ids"]


def metrics(base: dict[int, dict], answers: dict[int, dict], qids: list[int]) -> dict:
    """Metrics of one method over the questions ``qids`` of vanilla's answers."""
    common = [q for q in qids if q in answers]
    out = {"questions": len(common), "missing": len(qids) - len(common)}
    if not common:
        return {**out, "speedup": None, "tokens_per_s": None, "mat": None,
                "acceptance_rate": None, "identical": 0.0 if qids else None}
    method_speed = statistics.fmean(speed(answers[q]) for q in common)
    base_speed = statistics.fmean(speed(base[q]) for q in common)
    out["tokens_per_s"] = round(method_speed, 3)
    out["speedup"] = round(method_speed / base_speed, 4) if base_speed > 0 else None
    lengths = [a for q in common for a in answers[q]["choices"][0]["accept_lengths"]]
    steps = [s for q in common for s in answers[q]["choices"][0]["decoding_steps"]]
    drafted = [d for q in common for d in answers[q]["choices"][0].get("drafted", [])]
    if lengths and None not in steps:
        out["mat"] = round(statistics.fmean(lengths), 4)
        n_drafted = sum(d or 0 for d in drafted)
        accepted = sum(lengths) - len(lengths)
        out["acceptance_rate"] = round(accepted / n_drafted, 4) if n_drafted else None
    else:
        out["mat"], out["acceptance_rate"] = counter_metrics([answers[q] for q in common])
    out["identical"] = round(sum(identical(base[q], answers.get(q)) for q in qids) / len(qids), 4)
    out["divergence"] = summarize([answers[q]["choices"][0]["divergence"] for q in common
                                   if "divergence" in answers[q]["choices"][0]])
    return out


def counter_metrics(rows: list[dict]) -> tuple[float | None, float | None]:
    """(MAT, acceptance rate) from per-answer counters where a method reports no per-step accept
    lengths (vLLM). Every step emits its accepted draft tokens + 1, so an answer of N tokens with A
    accepted took N - A steps (at least one per draft plus the prefill's: vLLM counts accepted
    tokens a final step cut at max_tokens): MAT = tokens / steps, as for our methods (steps
    without a draft count, vanilla = 1). Acceptance = accepted / draft tokens."""
    counts, tokens = [], []
    for row in rows:
        choice = row["choices"][0]
        counts += choice.get("spec_counters", [])
        tokens += choice["new_tokens"]
    if not rows or len(counts) != len(tokens):
        return None, None
    accepted = sum(c.get("num_accepted_tokens", 0) for c in counts)
    draft_tokens = sum(c.get("num_draft_tokens", 0) for c in counts)
    steps = sum(max(n - c.get("num_accepted_tokens", 0), c.get("num_drafts", 0) + 1, 1)
                for n, c in zip(tokens, counts))
    return (round(sum(tokens) / steps, 4),
            round(accepted / draft_tokens, 4) if draft_tokens else None)


def build_report(out_dir: Path, specs: list[str], lossless: dict[str, bool], oracle: str | None,
                 allow_lossy: bool = False) -> dict:
    answers = {spec: load_answers(method_file(out_dir, spec)) for spec in specs}
    base = answers["vanilla"]
    categories = sorted({row["category"] for row in base.values()})
    groups = {OVERALL: sorted(base)} | {
        c: sorted(q for q, row in base.items() if row["category"] == c) for c in categories}
    table = {spec: {g: metrics(base, answers[spec], qids) for g, qids in groups.items()}
             for spec in specs}
    for spec in specs:
        for g in groups:
            cell, bound = table[spec][g], table[oracle][g] if oracle else None
            cell["pct_of_oracle"] = (round(100 * cell["speedup"] / bound["speedup"], 1)
                                     if bound and cell["speedup"] and bound["speedup"] else None)
    flagged = [s for s in specs if table[s][OVERALL]["identical"] != 1.0]
    rankable = [s for s in specs if s != "vanilla" and table[s][OVERALL]["speedup"] is not None
                and (allow_lossy or s not in flagged)]
    ranking = sorted(rankable, key=lambda s: -table[s][OVERALL]["speedup"])
    return {"methods": specs, "categories": categories, "table": table, "flagged": flagged,
            "ranking": ranking, "lossless_by_design": lossless, "oracle": oracle,
            "allow_lossy": allow_lossy, "questions": len(base)}


def _fmt(value, suffix: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(report: dict, environment: dict) -> str:
    table, flagged = report["table"], set(report["flagged"])
    lines = ["# specdecode benchmark", "",
             f"Model: `{environment['model_id']}` · draft: `{environment.get('draft_id')}` · "
             f"{environment['cpu']}"
             + (f" ({environment['cpu_path']})" if environment.get("cpu_path") else "")
             + f" · torch threads {environment['threads']} · "
             f"dtype {environment['dtype']} "
             f"({'exact forward' if environment.get('exact') else 'batched forward'}"
             f"{', compiled' if environment.get('compiled') else ''}) · "
             f"device {environment.get('device', 'cpu')} · temperature {environment['temperature']} · "
             f"seed {environment['seed']}", "",
             f"Command: `{environment['command']}`", "",
             *([f"Prompt format: {environment['prompt_format']}.", ""]
               if environment.get("prompt_format") else []),
             f"Questions: {report['questions']} answered by vanilla; skipped "
             f"(do not fit the context): {environment.get('skipped', 0)}."
             + (f" The forward was compiled first ({environment['compile_s']} s, not timed)."
                if environment.get("compiled") else ""), "",
             "## Overall", "",
             "| method | speedup | MAT | acceptance | tokens/s | % of oracle | identical to vanilla |",
             "|---|---|---|---|---|---|---|"]
    for spec in report["methods"]:
        c = table[spec][OVERALL]
        flag = " ⚠ differs from vanilla" if spec in flagged else ""
        speedup = _fmt(c["speedup"], "x")
        if spec in flagged and not report["allow_lossy"]:
            speedup += " (not ranked)"
        lines.append(f"| {spec}{flag} | {speedup} | {_fmt(c['mat'])} | "
                     f"{_fmt(c['acceptance_rate'])} | {_fmt(c['tokens_per_s'], digits=1)} | "
                     f"{_fmt(c['pct_of_oracle'], '%', 0)} | {_fmt(100 * c['identical'], '%', 0)} |")
    lines += ["", "Ranking (lossless only unless --allow-lossy): " +
              (" > ".join(f"{s} ({table[s][OVERALL]['speedup']:.2f}x)" for s in report["ranking"])
               or "none"), ""]
    diverged = [(s, table[s][OVERALL].get("divergence")) for s in report["methods"]]
    diverged = [(s, d) for s, d in diverged if d]
    if diverged:
        lines += ["## Where outputs leave vanilla's", "",
                  "First differing token per question (vanilla's prefix; one plain forward gives "
                  f"the target's top-2 logit margin there; near-tie: margin < {NEAR_TIE}).", "",
                  "| method | questions that differ | first divergence (median token) | "
                  "top-2 margin (median) | near-ties |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {d['count']} | {d['position_median']:g} | {d['margin_median']:.3f} | "
                  f"{d['near_ties']} of {d['count']} |" for s, d in diverged]
        lines.append("")
    for key, title in (("speedup", "Speedup per category"), ("mat", "MAT per category")):
        lines += [f"## {title}", "", "| category | " + " | ".join(report["methods"]) + " |",
                  "|---" * (len(report["methods"]) + 1) + "|"]
        for cat in report["categories"]:
            cells = [_fmt(table[s][cat][key]) for s in report["methods"]]
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        lines.append("")
    curve = environment.get("cost_curve_ms")
    if curve:
        chain, tree = curve["chain"], curve["tree"]
        lines += ["## Verification cost c(n)", "",
                  "One target forward over the pending token and n draft nodes (128 tokens of "
                  "context), as the `adaptive` policy sees it on this machine before its online "
                  "rescaling; see cost_curve.png.", "",
                  "| n | chain ms | chain c(n)/c(0) | tree ms | tree c(n)/c(0) |",
                  "|---|---|---|---|---|"]
        for n in sorted(chain, key=int):
            lines.append(f"| {n} | {chain[n]:.2f} | {chain[n] / chain['0']:.2f} | "
                         f"{tree[n]:.2f} | {tree[n] / tree['0']:.2f} |")
        lines.append("")
    return "\n".join(lines)
