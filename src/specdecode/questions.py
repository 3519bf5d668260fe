"""Spec-Bench questions (package data, Apache-2.0; see data/spec_bench/SOURCE.md): the prompts of
the benchmark, the server's load test, the vLLM comparison and the trainers' model cards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from specdecode.types import SpecDecodeError


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]
    schema: dict | None = field(default=None, hash=False)  # the JSON workload's constraint


def default_questions_path() -> Path:
    return Path(str(resources.files("specdecode"))) / "data" / "spec_bench" / "question.jsonl"


def load_questions(path: Path | None = None, categories: list[str] | None = None,
                   limit_per_category: int | None = None) -> list[Question]:
    """Questions in file order, optionally filtered by category and capped per category."""
    path = path or default_questions_path()
    if not Path(path).exists():
        raise SpecDecodeError(f"questions file {str(path)!r} does not exist")
    questions, per_cat = [], {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q = Question(int(row["question_id"]), str(row["category"]), tuple(row["turns"]),
                         row.get("schema"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise SpecDecodeError(f"{path}:{n}: not a Spec-Bench question ({err})") from err
        if categories and q.category not in categories:
            continue
        if limit_per_category is not None and per_cat.get(q.category, 0) >= limit_per_category:
            continue
        per_cat[q.category] = per_cat.get(q.category, 0) + 1
        questions.append(q)
    if categories:
        unknown = sorted(set(categories) - set(per_cat))
        if unknown:
            raise SpecDecodeError(f"no questions in categories: {', '.join(unknown)}")
    return questions
