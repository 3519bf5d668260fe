"""The JSON-extraction workload: 40 questions, each with a schema that compiles; methods run under
it unless ``constrained=false``; a missing llguidance is one line naming the pip command."""

from __future__ import annotations

import sys

import pytest

from specdecode.bench.json_workload import workload_path
from specdecode.bench.methods import Settings, method_options
from specdecode.questions import load_questions
from specdecode.types import SpecDecodeError

pytest.importorskip("llguidance")


def test_workload_questions_compile():
    from transformers import AutoTokenizer

    from specdecode.demo import demo_dir
    from specdecode.structured import compile_constraint

    questions = load_questions(workload_path())
    assert 30 <= len(questions) <= 50 and all(q.schema for q in questions)
    tok = AutoTokenizer.from_pretrained(demo_dir() / "tokenizer")
    for q in questions:
        assert compile_constraint({"json": q.schema}, tok).kind == "json"


def test_constrained_method_option():
    s = Settings(target=None, draft=None, max_new_tokens=8, num_draft_tokens=4,
                 constraint={"json": {"type": "object"}}, tokenizer="tok")
    assert method_options("vanilla", s, None)[1]["constraint"] == {"json": {"type": "object"}}
    assert "constraint" not in method_options("vanilla:constrained=false", s, None)[1]
    assert method_options("grammar", s, None)[1]["tokenizer"] == "tok"


def test_missing_llguidance_is_one_line(monkeypatch):
    from specdecode import structured

    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(SpecDecodeError) as err:
        structured.compile_constraint({"regex": "a+"}, object())
    assert "pip install 'llguidance>=1.7,<2'" in str(err.value) and "\n" not in str(err.value)


def test_cli_generate_flags(tmp_path):
    import json
    import re

    from click.testing import CliRunner

    from specdecode.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["generate", "--prompt", "Call me at", "--regex", "[0-9]{3}-[0-9]{4}",
                               "--drafter", "grammar", "--max-new-tokens", "16", "--json",
                               "--threads", "1", "--policy", "fixed"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output.strip().splitlines()[-1])
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}(<\|end\|>)?", report["text"])
    schema = tmp_path / "s.json"
    number = {"type": "integer", "minimum": 0, "maximum": 99}
    schema.write_text(json.dumps({"type": "object", "properties": {"n": number},
                                  "required": ["n"], "additionalProperties": False}))
    out = runner.invoke(main, ["generate", "--prompt", "x", "--json-schema", str(schema),
                               "--max-new-tokens", "24", "--json", "--threads", "1",
                               "--policy", "fixed"])
    assert out.exit_code == 0, out.output
    assert set(json.loads(json.loads(out.output.strip().splitlines()[-1])["text"]
                          .replace("<|end|>", ""))) == {"n"}
    bad = runner.invoke(main, ["generate", "--prompt", "x", "--regex", "(oops"])
    assert bad.exit_code == 1 and "invalid regex" in bad.output
