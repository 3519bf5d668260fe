"""The benchmark loop: per question, per turn, every method interleaved (vanilla first, so the oracle
can replay its output), medians of ``repeats`` timings, one Spec-Bench answer JSONL per method,
appended question by question so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from specdecode.bench.divergence import divergence
from specdecode.bench.methods import Outcome, Settings, run_method
from specdecode.bench.prompts import bench_prompt, first_turn
from specdecode.questions import Question


def method_file(out_dir: Path, spec: str) -> Path:
    return out_dir / "answers" / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec) + ".jsonl")


@dataclass
class Skipped:
    question_id: int
    category: str
    reason: str


def load_skipped(out_dir: Path) -> list[Skipped]:
    path = out_dir / "skipped.jsonl"
    if not path.exists():
        return []
    return [Skipped(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def done_questions(out_dir: Path, specs: list[str]) -> set[int]:
    """Questions already answered by every method, or skipped (earlier, interrupted run)."""
    done = None
    for spec in specs:
        path = method_file(out_dir, spec)
        ids = {json.loads(line)["question_id"] for line in path.read_text().splitlines()
               if line.strip()} if path.exists() else set()
        done = ids if done is None else done & ids
    return (done or set()) | {sk.question_id for sk in load_skipped(out_dir)}


def _timed(spec: str, s: Settings, prompt: list[int], reference, repeats: int) -> Outcome:
    runs = [run_method(spec, s, prompt, reference) for _ in range(repeats)]
    first = runs[0]
    first.wall_s = statistics.median(r.wall_s for r in runs)
    return first


def warm_up(specs: list[str], s: Settings, tokenizer) -> None:
    prompt = first_turn(tokenizer, "Hello! Say something.")
    short = Settings(**{**s.__dict__, "max_new_tokens": 8})
    reference = None
    for spec in specs:
        out = run_method(spec, short, prompt, reference)
        reference = reference or out.token_ids


def run_question(q: Question, specs: list[str], s: Settings, tokenizer, context: int | None,
                 repeats: int, model_id: str) -> dict[str, dict] | Skipped:
    """All methods on one question; returns {spec: answer record} or why it was skipped."""
    histories = {spec: [] for spec in specs}
    if q.schema is not None:  # the JSON workload: every method under this question's schema
        s = replace(s, constraint={"json": q.schema})
    records = {spec: {"turns": [], "decoding_steps": [], "new_tokens": [], "wall_time": [],
                      "accept_lengths": [], "token_ids": [], "drafted": [],
                      "drafted_per_step": [], "planned_per_step": []} for spec in specs}
    for t, turn in enumerate(q.turns):
        reference, vanilla_prompt = None, None
        for spec in specs:  # vanilla is first (the CLI orders it so)
            histories[spec].append({"role": "user", "content": turn})
            prompt = bench_prompt(tokenizer, histories[spec])  # bench/prompts.py
            if context is not None and len(prompt) + s.max_new_tokens > context:
                return Skipped(q.question_id, q.category,
                               f"prompt of {len(prompt)} tokens + {s.max_new_tokens} new tokens "
                               f"exceeds the context of {context}")
            out = _timed(spec, s, prompt, reference, repeats)
            rec = records[spec]
            if reference is None:
                reference, vanilla_prompt = out.token_ids, prompt
            elif prompt == vanilla_prompt and "divergence" not in rec:  # the first one only
                found = divergence(s.target, prompt, reference, out.token_ids)
                if found is not None:
                    rec["divergence"] = {"turn": t, **found}
            text = tokenizer.decode(out.token_ids, skip_special_tokens=True).strip()
            histories[spec].append({"role": "assistant", "content": text})
            rec["turns"].append(text)
            rec["new_tokens"].append(len(out.token_ids))
            rec["wall_time"].append(out.wall_s)
            rec["token_ids"].append(out.token_ids)
            rec["drafted"].append(out.drafted)
            if out.drafted_per_step is not None:
                rec["drafted_per_step"].append(out.drafted_per_step)
                rec["planned_per_step"].append(out.planned_per_step)
            if out.counters is not None:
                rec.setdefault("spec_counters", []).append(out.counters)
            if out.accept_lengths is not None:
                rec["decoding_steps"].append(len(out.accept_lengths))
                rec["accept_lengths"].extend(out.accept_lengths)
            else:
                rec["decoding_steps"].append(None)
    return {spec: {"question_id": q.question_id, "category": q.category, "model_id": model_id,
                   "method": spec, "choices": [dict(index=0, **records[spec])],
                   "tstamp": time.time()} for spec in specs}


def run_benchmark(questions: list[Question], specs: list[str], s: Settings, tokenizer,
                  out_dir: Path, context: int | None, repeats: int, model_id: str
                  ) -> list[Skipped]:
    (out_dir / "answers").mkdir(parents=True, exist_ok=True)
    done = done_questions(out_dir, specs)
    todo = [q for q in questions if q.question_id not in done]
    if done:
        tqdm.write(f"resuming: {len(done)} questions already answered, {len(todo)} to go")
    warm_up(specs, s, tokenizer)
    for q in tqdm(todo, desc="questions", unit="q"):
        result = run_question(q, specs, s, tokenizer, context, repeats, model_id)
        if isinstance(result, Skipped):
            with (out_dir / "skipped.jsonl").open("a") as f:
                f.write(json.dumps(result.__dict__) + "\n")
            tqdm.write(f"skipped question {q.question_id}: {result.reason}")
            continue
        for spec, record in result.items():
            with method_file(out_dir, spec).open("a") as f:
                f.write(json.dumps(record) + "\n")
    return load_skipped(out_dir)
