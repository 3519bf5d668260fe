"""Per-row constraints in batch: ``generate_batch`` with a constraint per prompt (rows equal their
batch-1 ``generate``), ``{"choice": [...]}`` (escaped: every string is accepted exactly, output is
one of them; bounds), ``specdecode generate --prompts-file`` lines with their own constraint, and
``specdecode bench --workload json --batch-size`` (every row equal to constrained batch-1
vanilla)."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from helpers import fixed_policy as sd
from helpers import tiny_model

from specdecode.cli import main
from specdecode.structured.bounds import MAX_CHOICE_CHARS, MAX_CHOICES
from specdecode.types import SpecDecodeError

pytest.importorskip("llguidance")
from specdecode import structured  # noqa: E402

VOCAB = 8192  # the demo tokenizer's
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
CHOICES = ["yes", "no", 'say "maybe"', "a|b (c)*+?.^$", "back\\slash\nnew line\t{1}",
           "ünïcode ✓ 🙂", "[x-y]", ""]
PROMPTS = [[5, 17, 300, 42, 17, 300, 42, 17], [1000, 2000, 3000, 4000, 999], [7, 8, 9, 7, 8, 9]]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from specdecode.demo import demo_dir
    return AutoTokenizer.from_pretrained(demo_dir() / "tokenizer")


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab=VOCAB, seed=0)


def test_generate_batch_constraint_per_prompt(target, tok):
    rows = [{"json": PERSON}, {"regex": r"[a-z]{3,8}"}, None, {"choice": CHOICES},
            {"grammar": 'start: NUM ("+" NUM){0,3}\nNUM: /[0-9]{1,3}/'}]
    prompts = [PROMPTS[i % 3] for i in range(len(rows))]
    for drafter in ("ngram", "grammar"):
        alone = [sd.generate(target, p, drafter=drafter, max_new_tokens=24, constraint=c,
                             tokenizer=tok, eos_token_id=[]).token_ids
                 for p, c in zip(prompts, rows)]
        batch = sd.generate_batch(target, prompts, batch_size=3, drafter=drafter,
                                  max_new_tokens=24, constraint=rows, tokenizer=tok,
                                  eos_token_id=[])
        assert [r.token_ids for r in batch] == alone
    one = sd.generate_batch(target, PROMPTS, batch_size=2, max_new_tokens=16,
                            constraint={"regex": r"[0-9]{2,6}"}, tokenizer=tok, eos_token_id=[])
    for r in one:
        assert re.fullmatch(r"[0-9]{2,6}", tok.decode(r.token_ids, skip_special_tokens=True))
    with pytest.raises(SpecDecodeError, match="one per prompt"):
        sd.generate_batch(target, PROMPTS, constraint=[None], tokenizer=tok)


def test_choice_is_escaped_exactly(target, tok):
    compiled = structured.compile_constraint({"choice": CHOICES}, tok)
    for choice in CHOICES:  # every string, whatever its characters, is accepted exactly
        state = compiled.start()
        ids = tok(choice, add_special_tokens=False)["input_ids"]
        assert state.matcher.consume_tokens(ids) and state.is_accepting(), choice
        bigger = compiled.start()
        assert not (bigger.matcher.consume_tokens(ids + tok("zz", add_special_tokens=False)
                                                  ["input_ids"]) and bigger.is_accepting())
    for prompt in PROMPTS:
        for kw in ({}, {"temperature": 1.0, "seed": 5, "sampling": "coupled"}):
            out = sd.generate(target, prompt, drafter="grammar", max_new_tokens=40,
                              constraint={"choice": CHOICES}, tokenizer=tok, eos_token_id=[],
                              **kw)
            assert out.finish_reason == "eos"
            assert tok.decode(out.token_ids, skip_special_tokens=True) in CHOICES


@pytest.mark.parametrize("value,needle", [
    ([], "non-empty list"), ("yes", "non-empty list"), (["a", None], "strings only"),
    (["x"] * (MAX_CHOICES + 1), f"at most {MAX_CHOICES} strings"),
    (["x" * (MAX_CHOICE_CHARS + 1)], f"at most {MAX_CHOICE_CHARS} characters"),
])
def test_choice_bounds(tok, value, needle):
    with pytest.raises(SpecDecodeError, match=re.escape(needle)):
        structured.compile_constraint({"choice": value}, tok)


def test_prompts_file_lines_carry_their_own_constraint(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    lines = [{"prompt": "My number:", "json_schema": schema},
             {"prompt": "Call me at", "regex": "[0-9]{3}-[0-9]{4}"},
             {"prompt": "Say a word:"},  # the command line's
             {"prompt": "Yes or no?", "choice": ["yes", "no"]}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = CliRunner().invoke(main, ["generate", "--prompts-file", str(path), "--batch-size", "2",
                                    "--regex", "[a-z]{2,6}", "--max-new-tokens", "24",
                                    "--drafter", "grammar", "--compare", "--json",
                                    "--threads", "1", "--policy", "fixed"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output.strip().splitlines()[-1])
    texts = [r["text"].replace("<|end|>", "") for r in report["results"]]
    assert set(json.loads(texts[0])) == {"n"}
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", texts[1]) and re.fullmatch("[a-z]{2,6}", texts[2])
    assert texts[3] in ("yes", "no") and report["rows_identical_to_vanilla"] == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({"prompt": "y",
                                                                    "regex": "(oops"}) + "\n")
    out = CliRunner().invoke(main, ["generate", "--prompts-file", str(bad)])
    assert out.exit_code == 1 and "bad.jsonl:2: invalid regex" in out.output
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps({"prompt": "x", "regex": "a", "choice": ["b"]}) + "\n")
    out = CliRunner().invoke(main, ["generate", "--prompts-file", str(two)])
    assert out.exit_code == 1 and "at most one of" in out.output
    help_text = CliRunner().invoke(main, ["generate", "--help"]).output
    assert "json_schema" in help_text and "choice" in help_text


def test_bench_json_workload_in_batch_mode(tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(main, [
        "bench", "--workload", "json", "--batch-size", "2", "--categories",
        "json-writing,json-math", "--limit-per-category", "1", "--max-new-tokens", "12",
        "--methods", "vanilla,grammar,vanilla:constrained=false", "--threads", "1",
        "--policy", "fixed", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.strip().splitlines()[-1])["batch"]
    assert {r["method"] for r in rows} == {"vanilla", "grammar", "vanilla:constrained=false"}
    for row in rows:  # every row equal to batch-1 vanilla (constrained, or not for =false)
        assert row["rows_equal"] == 2 and row["mismatches"] == 0, row
