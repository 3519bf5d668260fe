"""Hand-made benchmark answer files (test_bench.py, test_divergence.py): one answer row in the
runner's format, and a method's rows written where the report reads them."""

from __future__ import annotations

import json

from specdecode.bench.runner import method_file


def answer(qid, cat, tokens_per_turn, walls, accept_lengths=None, drafted=None):
    return {"question_id": qid, "category": cat, "model_id": "m", "tstamp": 0.0,
            "choices": [{"index": 0, "turns": ["x"] * len(tokens_per_turn),
                         "new_tokens": [len(t) for t in tokens_per_turn], "wall_time": walls,
                         "token_ids": tokens_per_turn,
                         "decoding_steps": [None] * len(walls) if accept_lengths is None else
                         [len(accept_lengths)] + [0] * (len(walls) - 1),
                         "accept_lengths": accept_lengths or [], "drafted": drafted or []}]}


def write(out, spec, rows):
    path = method_file(out, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
