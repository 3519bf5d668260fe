"""The JSON-extraction workload (``specdecode bench --workload json``): Spec-Bench questions turned
into "reply with a JSON object under this schema" requests, each question with its own schema;
every method runs constrained by it (``vanilla:constrained=false`` runs without it: the grammar's
own cost).

The shipped file (``data/json_extraction/questions.jsonl``, Spec-Bench's license) is written by
``python -m specdecode.bench.json_workload``: deterministic, from the first questions of each
Spec-Bench category in turn, five schema shapes in rotation.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
              "humanities", "translation", "summarization", "qa", "math_reasoning", "rag"]
SHORT = {"type": "string", "maxLength": 60}
SCHEMAS = [
    {"type": "object", "properties": {
        "topic": SHORT, "category": {"enum": CATEGORIES},
        "difficulty": {"enum": ["easy", "medium", "hard"]}, "needs_code": {"type": "boolean"}},
     "required": ["topic", "category", "difficulty", "needs_code"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": SHORT, "keywords": {"type": "array", "items": {"type": "string", "maxLength": 24},
                                     "minItems": 1, "maxItems": 5},
        "language": {"enum": ["english", "german", "french", "chinese", "other"]}},
     "required": ["title", "keywords", "language"], "additionalProperties": False},
    {"type": "object", "properties": {
        "entities": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {
                "name": {"type": "string", "maxLength": 40},
                "type": {"enum": ["person", "place", "organization", "object", "concept",
                                  "other"]}},
            "required": ["name", "type"], "additionalProperties": False}}},
     "required": ["entities"], "additionalProperties": False},
    {"type": "object", "properties": {
        "question_type": {"enum": ["how", "what", "why", "write", "solve", "other"]},
        "answer_words": {"type": "integer", "minimum": 1, "maximum": 2000},
        "summary": {"type": "string", "maxLength": 100}},
     "required": ["question_type", "answer_words", "summary"], "additionalProperties": False},
    {"type": "object", "properties": {
        "task": SHORT, "steps": {"type": "array", "items": {"type": "string", "maxLength": 60},
                                 "minItems": 1, "maxItems": 4}},
     "required": ["task", "steps"], "additionalProperties": False},
]
COUNT = 40


def workload_path() -> Path:
    return Path(str(resources.files("specdecode"))) / "data" / "json_extraction" / \
        "questions.jsonl"


def prompt_text(question: str, schema: dict) -> str:
    return ("Read the request below and reply with only a JSON object that matches this JSON "
            f"schema.\nSchema: {json.dumps(schema)}\nRequest: {question}")


def build(count: int = COUNT) -> list[dict]:
    """The workload's rows (Spec-Bench question shape plus ``schema``)."""
    from specdecode.questions import load_questions

    by_cat: dict[str, list] = {}
    for q in load_questions():
        by_cat.setdefault(q.category, []).append(q)
    cats = sorted(by_cat)
    rows = []
    i = 0
    while len(rows) < count:
        q = by_cat[cats[i % len(cats)]][i // len(cats)]
        schema = SCHEMAS[len(rows) % len(SCHEMAS)]
        rows.append({"question_id": 10000 + q.question_id, "category": f"json-{q.category}",
                     "turns": [prompt_text(q.turns[0][:600], schema)], "schema": schema})
        i += 1
    return rows


if __name__ == "__main__":
    out = workload_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in build()))
    print(f"wrote {out}")
