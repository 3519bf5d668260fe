"""DATA_CARD.md of a self-written drafter data set, rendered from its manifest alone (rewritten with
every shard, so a killed run's card is current too)."""

from __future__ import annotations


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def _share(part: int, whole: int) -> str:
    return f"{part:,} ({part / whole:.1%})" if whole else f"{part:,}"


def render_card(m: dict) -> str:
    t, k, o, tot = m["target"], m["tokenizer"], m["options"], m["totals"]
    prompts = m.get("prompts", {})
    sources = m.get("sources", {})
    lines = [
        f"# Drafter training data: {t['name']}",
        "",
        "Written by `specdecode build-drafter-data` (docs/training-data.md in the specdecode "
        "repository): chat prompts answered by the target itself, stored as token ids. This card "
        "is rewritten from `manifest.json` with every shard.",
        "",
        "## What went in",
        "",
        "| prompt set | package | licence | read | not mostly ASCII | repeats | "
        "Spec-Bench overlaps dropped | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in prompts.get("sources", {}).items():
        s = sources.get(name, {})
        pkg = f"`{s.get('package', '?')}` {s.get('version', '')}".strip()
        lines.append(f"| {name}: {s.get('description', '')} | {pkg} | {s.get('licence', '?')} | "
                     f"{_n(c['read'])} | {_n(c['not_ascii'])} | {_n(c['repeats'])} | "
                     f"{_n(c['benchmark_overlap'])} | {_n(c['kept'])} |")
    lines += [
        "",
        f"- Spec-Bench: {_n(prompts.get('benchmark_turns', '?'))} question turns (every turn of "
        "every question the package ships) checked; "
        f"**{_n(prompts.get('benchmark_dropped', '?'))} corpus prompts dropped** because they equal "
        "or contain one of them (whitespace and case normalized). No benchmark question is "
        "answered here.",
        f"- Prompts longer than {_n(o['max_prompt_tokens'])} tokens in the prompt format, skipped: "
        f"{_n(tot['too_long'])}.",
        "- Order: by a hash of the prompt text (sets interleaved, no corpus order); a budget takes "
        "the first prompts of that order.",
        "",
        "## Target and answers",
        "",
        f"- Target: {t['name']} ({t.get('model_type')}, {_n(t.get('parameters'))} parameters, "
        f"vocabulary {_n(t.get('vocab_size'))}), {o['dtype']}, exact forward "
        f"{'on' if o['exact'] else 'off'}; weights hash `{t['weights']}`, tokenizer hash "
        f"`{k['hash']}`.",
        f"- Each prompt is the first user turn alone, in the prompt format "
        f"{m.get('prompt_format', 'chat template')!r} (the benchmark's for this tokenizer); "
        f"the answer runs to EOS or {_n(o['max_new_tokens'])} new tokens.",
        f"- Greedy share {o['greedy_share']}: greedy {_share(tot['greedy'], tot['examples'])}, "
        f"sampled at temperature {o['temperature']} {_share(tot['sampled'], tot['examples'])} "
        f"(coupled sampling, seed {o['seed']} hashed with the prompt: each row is reproducible "
        "alone).",
        f"- Held out by a hash of the prompt ({o['heldout']:.1%}): "
        f"{_share(tot['heldout'], tot['examples'])} examples, "
        f"{_n(tot['heldout_answer_tokens'])} answer tokens.",
        f"- In all: {_n(tot['examples'])} examples in {_n(tot['shards'])} shards, "
        f"{_n(tot['prompt_tokens'])} prompt tokens, {_n(tot['answer_tokens'])} answer tokens; "
        f"{_share(tot['eos'], tot['examples'])} answers end with EOS, the rest at the length cap.",
        "",
        "## Runs (throughput measured by the run itself)",
        "",
        "| started (UTC) | examples | answer tokens | wall | answer tokens/hour | threads | "
        "batch | drafter | load average at start / end | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in m.get("runs", []):
        load = " / ".join("-".join(f"{x:g}" for x in r.get(key, [])[:1]) or "?"
                          for key in ("load_start", "load_end"))
        lines.append(f"| {r['started']} | {_n(r['examples'])} | {_n(r['answer_tokens'])} | "
                     f"{r.get('wall_s', 0) / 60:.1f} min | {_n(r.get('tokens_per_hour', '?'))} | "
                     f"{r.get('threads')} | {r.get('batch_size')} | {r.get('drafter')} | {load} | "
                     f"{r.get('cpu')} ({r.get('cores')} cores) |")
    lines += [
        "",
        "Answer tokens per hour count the tokens the target wrote over the run's generation time "
        "(model loading and prompt reading excluded). The load average (1 minute) shows how busy "
        "the machine was: other processes sharing its cores lower the figure.",
        "",
        "## Reading it",
        "",
        "`specdecode.train.selfdata_store.iter_examples(DIR, split=\"train\" | \"heldout\")` "
        "yields each example's prompt ids and answer ids; the shard layout is in that module's "
        "docstring.",
        "",
    ]
    return "\n".join(lines)
