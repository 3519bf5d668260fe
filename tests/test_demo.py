"""The demo pair shipped in the package: loads offline, chat template round trip, and greedy
generation identical to transformers' own generate and to every drafter."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import fixed_policy as sd

from specdecode.cli import main
from specdecode.train.corpus import render_chat


@pytest.fixture(scope="module")
def demo():
    return sd.load_demo()


def test_demo_pair_loads_offline(demo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert demo.target.config.model_type == "llama" == demo.draft.config.model_type
    assert next(demo.target.parameters()).dtype == torch.float32
    n_target = sum(p.numel() for p in demo.target.parameters())
    n_draft = sum(p.numel() for p in demo.draft.parameters())
    assert 6 <= n_target / n_draft <= 12
    assert demo.target.config.max_position_embeddings >= 2048
    assert demo.target.config.vocab_size == demo.draft.config.vocab_size == len(demo.tokenizer)
    size = sum(f.stat().st_size for f in demo.path.rglob("*") if f.is_file())
    assert size < 100 * 2**20


def test_chat_template_round_trip(demo):
    messages = [{"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4."}]
    text = demo.tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == render_chat(messages)
    ids = demo.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert demo.tokenizer.decode(ids) == text
    assert demo.tokenizer.eos_token == "<|end|>"
    assert demo.tokenizer.convert_tokens_to_ids("<|end|>") == demo.target.generation_config.eos_token_id


def test_greedy_matches_transformers_generate(demo):
    ids = demo.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}],
        add_generation_prompt=True)["input_ids"]
    tensor = torch.tensor([ids])
    ref = demo.target.generate(tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                               max_new_tokens=24, pad_token_id=0)[0, len(ids):].tolist()
    assert sd.generate(demo.target, ids, drafter="none", max_new_tokens=24).token_ids == ref
    for drafter, options in (("draft-model", {"draft_model": demo.draft, "tree_width": 2}),
                             ("ngram", {}), ("layer-skip", {"num_layers": 3})):
        out = sd.generate(demo.target, ids, drafter=drafter, max_new_tokens=24, **options)
        assert out.token_ids == ref, drafter


def test_cli_generate_uses_the_demo_pair():
    result = CliRunner().invoke(main, ["generate", "--prompt", "Hello!", "--chat", "--json",
                                       "--drafter", "draft-model", "--max-new-tokens", "16",
                                       "--compare", "--policy", "fixed"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["identical_to_vanilla"] and report["new_tokens"] >= 1
