"""Demo training: seeded and resumable (a few optimizer steps of a tiny model; seconds, not more)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specdecode.train.corpus import CHAT_TEMPLATE, iter_sharegpt, render_chat
from specdecode.train.demo import TrainConfig, train
from specdecode.train.prepare import train_tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    text = render_chat([{"role": "user", "content": "What is two plus two?"},
                        {"role": "assistant", "content": "Two plus two is four."}])
    tok = train_tokenizer([text] * 20 + ["def f(x):\n    return x + 1\n"] * 20, 300,
                          root / "tokenizer")
    ids = np.asarray(tok(text * 40)["input_ids"], dtype=np.uint16)
    np.save(root / "train.npy", ids)
    np.save(root / "val.npy", ids[:200])
    return root


def run(data_dir, out, steps, **kw):
    cfg = TrainConfig(size="tiny", steps=steps, batch_size=2, seq_len=16, warmup=2,
                      checkpoint_every=1, eval_batches=1, threads=1, **kw)
    summary = train(data_dir, out, cfg)
    from safetensors.torch import load_file

    return summary, load_file(out / "model" / "model.safetensors")


def test_same_seed_same_weights_and_resume_is_exact(data_dir, tmp_path):
    s1, w1 = run(data_dir, tmp_path / "a", 4)
    _, w2 = run(data_dir, tmp_path / "b", 4)
    assert s1["steps"] == 4 and s1["tokens_seen"] == 4 * 2 * 16
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # stop after 2 steps (a 2-step run writes the same checkpoint as an interrupted one), resume
    run(data_dir, tmp_path / "c", 2)
    cfg_path = tmp_path / "c" / "checkpoint.pt"
    state = torch.load(cfg_path, weights_only=False)
    assert state["step"] == 2
    _, w3 = run(data_dir, tmp_path / "c", 4)
    assert all(torch.allclose(w1[k], w3[k], atol=1e-6) for k in w1)
    _, w4 = run(data_dir, tmp_path / "d", 4, seed=1)
    assert not all(torch.equal(w1[k], w4[k]) for k in w1)


def test_chat_template_matches_training_markup(data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(messages, tokenize=False) == render_chat(messages)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(messages[:1]) + "<|assistant|>\n"
    ids = tok(render_chat(messages))["input_ids"]
    assert tok.decode(ids) == render_chat(messages)  # byte-level BPE round trip


def test_truncated_json_array_is_read_up_to_the_cut(tmp_path):
    items = [{"id": f"a{i}", "conversations": []} for i in range(3)]
    text = json.dumps(items, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('"a2"') + 2])  # cut inside the last item
    assert [item["id"] for item in iter_sharegpt(path)] == ["a0", "a1"]
