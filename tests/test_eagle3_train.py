"""The EAGLE-3 trainer (train/eagle3*.py, `train-drafter --kind eagle3`): multi-layer features,
training-time-test masks and chains, the loss falling, the draft vocabulary, exact resume (also
while the data set grows), the feature cache and the clear errors; on a tiny llama target with its
own tokenizer and a tiny self-written data directory (build-drafter-data's own functions)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_model, vanilla

import specdecode as sd
from specdecode.models.eagle3 import Eagle3Head
from specdecode.models.heads import load_head
from specdecode.train import eagle3_data as data
from specdecode.train.eagle3 import Eagle3Config, train_eagle3
from specdecode.train.eagle3_ttt import target_states, ttt_hidden, ttt_visible
from specdecode.train.selfdata import BuildConfig, build, gather_prompts
from specdecode.train.selfdata_store import iter_examples, load_manifest
from specdecode.types import SamplingParams, SpecDecodeError

TEXTS = [f"Tell me about fox number {i} and the lazy dog {i * 7 % 5}" + ", please" * (i % 4)
         for i in range(24)]


def write_data(model, tok, out, texts=TEXTS, **kw):
    prompts = gather_prompts({"fake": ((str(i), t) for i, t in enumerate(texts))}, [])[0]
    cfg = BuildConfig(**{"max_new_tokens": 24, "max_prompt_tokens": 96, "batch_size": 4,
                         "shard_size": 6, "heldout": 0.25, **kw})
    build(model, tok, prompts, out, cfg, target_name="tiny", progress=False)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(target directory, model, tokenizer, data directory)."""
    from specdecode.train.prepare import train_tokenizer

    root = tmp_path_factory.mktemp("eagle3")
    docs = [f"Document {i}: the quick brown fox {i % 7} jumps over the lazy dog. " * 4
            for i in range(40)]
    tok = train_tokenizer(docs, 120, root / "target")
    model = tiny_model("llama", vocab=len(tok), seed=2, dtype=torch.float32)
    model.save_pretrained(root / "target")
    return root / "target", model, tok, write_data(model, tok, root / "data")


def config(tiny, **kw) -> Eagle3Config:
    base = dict(data_dir=str(tiny[3]), steps=30, batch_size=4, seq_len=48, lr=3e-3, warmup=3,
                draft_vocab=48, checkpoint_every=5, eval_every=0, eval_examples=16, ttt_steps=3,
                eval_depth=4, intermediate_size=48)
    return Eagle3Config(**{**base, **kw})


def train(tiny, out, **kw) -> dict:
    return train_eagle3(tiny[1], tiny[2], out, config(tiny, **kw), log=lambda _: None)


def test_multi_layer_features_are_the_layer_outputs(tiny):
    """[B, T, k*H]: hidden_states[i + 1] of each layer, concatenated, for padded rows too."""
    _, model, tok, data_dir = tiny
    shards = [s["file"] for s in load_manifest(data_dir)["shards"]]
    train_w, _, _ = data.read_windows([(data_dir, shards)], 200)
    batch = data.collate(train_w, [0, 1, 2])
    assert len(set(batch.lengths.tolist())) > 1  # right padding is exercised
    feats, final = target_states(model, batch, [0, 1])
    b, t = batch.ids.shape
    assert feats.shape == (b, t, 2 * 32) and final.shape == (b, t, 32)
    for row in range(b):
        n = int(batch.lengths[row])
        alone = model(batch.ids[row:row + 1, :n], output_hidden_states=True).hidden_states
        want = torch.cat([alone[1][0], alone[2][0]], -1)
        torch.testing.assert_close(feats[row, :n], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[row, :n], alone[-1][0], rtol=1e-5, atol=1e-5)


def test_ttt_masks_follow_the_rule():
    n = 7
    torch.testing.assert_close(ttt_visible(n, 1), torch.ones(n, n, dtype=torch.bool).tril())
    for k in range(1, 5):
        mask = ttt_visible(n, k)
        assert mask.shape == (n, k * n)
        for t in range(n):
            want = {(1, s) for s in range(n) if s <= t - k + 1}
            want |= {(j, t - (k - j)) for j in range(2, k + 1) if t - (k - j) >= 0}
            got = {(c // n + 1, c % n) for c in mask[t].nonzero().flatten().tolist()}
            assert got == want, (k, t)
    mask = ttt_visible(6, 3)  # a few entries by hand: query 4 at step 3
    assert mask[4, :6].tolist() == [True, True, True, False, False, False]
    assert mask[4, 6:12].tolist() == [False, False, False, True, False, False]
    assert mask[4, 12:].tolist() == [False, False, False, False, True, False]


def test_ttt_step_k_is_the_depth_k_draft():
    """Step k at pair t equals what a chain drafted after the committed pairs 0..t-k+1 computes at
    depth k (its ancestors and the committed keys only, its position t + 1)."""
    torch.manual_seed(0)
    hidden, vocab = 32, list(range(0, 90, 3))
    head = Eagle3Head(hidden, 4, 48, [0, 1], vocab).eval()
    n, steps = 9, 4
    feats, embeds = torch.randn(1, n, 2 * hidden), torch.randn(1, n, hidden)
    with torch.no_grad():
        outs = ttt_hidden(head, feats, embeds, steps)
        for k in range(1, steps + 1):
            for t in range(k - 1, n):
                s = t - k + 1  # committed pairs 0..s
                pos = torch.arange(1, s + 2)[None]
                causal = torch.ones(s + 1, s + 1, dtype=torch.bool).tril()[None]
                h, past = head(embeds[:, :s + 1], head.lift(feats[:, :s + 1]), pos, causal)
                x = h[:, -1:]
                for depth in range(2, k + 1):
                    i = s + depth - 1
                    seen = torch.ones(1, 1, past[0].shape[2] + 1, dtype=torch.bool)
                    x, new = head(embeds[:, i:i + 1], x, torch.tensor([[i + 1]]), seen, past)
                    past = (torch.cat([past[0], new[0]], 2), torch.cat([past[1], new[1]], 2))
                torch.testing.assert_close(outs[k - 1][0, t], x[0, -1], rtol=1e-4, atol=1e-5)


def test_ttt_loss_falls_and_evaluation_is_consistent(tiny, tmp_path):
    before = train(tiny, tmp_path / "zero", steps=1)["heldout"]
    summary = train(tiny, tmp_path / "full")
    after = summary["heldout"]
    assert after["loss"] < before["loss"] - 0.3
    assert all(a < b for a, b in zip(after["step_loss"], before["step_loss"]))
    first, last = summary["history"][0], summary["history"][-1]
    assert last["loss"] < first["loss"] and last["l3"] < first["l3"]
    for result in (before, after):
        lengths = result["accept_length"]
        assert len(lengths) == 4 and len(result["top1"]) == 4
        assert all(a <= b for a, b in zip(lengths, lengths[1:])) and lengths[0] >= 1
        assert lengths[0] - 1 == pytest.approx(result["chain_accept"][0], abs=1e-3)
        assert 0 < result["greedy_positions"] <= result["positions"]
    assert after["top1"][0] > before["top1"][0]
    log = [json.loads(x) for x in (tmp_path / "full" / "eval.log").read_text().splitlines()]
    assert log[-1]["step"] == 30 and log[-1]["heldout"] == after
    assert summary["speed"]["tokens_per_s"] > 0 and summary["tokens_seen"] > 0


def test_draft_vocabulary_maps_and_survives_save_and_load(tiny, tmp_path):
    _, model, tok, data_dir = tiny
    summary = train(tiny, tmp_path, steps=2)
    pinned = json.loads((tmp_path / "data.json").read_text())
    counts = Counter(t for e in iter_examples(data_dir, "train") for t in e.answer)
    ranked = sorted(counts, key=lambda i: (-counts[i], i))[:48]
    assert pinned["vocab"] == sorted(ranked) and summary["draft_vocab_size"] == len(ranked)
    covered = sum(counts[i] for i in ranked) / sum(counts.values())
    assert pinned["coverage_train"] == pytest.approx(covered, abs=1e-4)
    head, cfg = load_head(tmp_path / "head", "eagle", model)
    assert isinstance(head, Eagle3Head) and cfg["kind"] == "eagle3"
    assert cfg["vocab"] == pinned["vocab"] and head.vocab.tolist() == pinned["vocab"]
    assert cfg["trained"]["steps"] == 2 and cfg["feature_layers"] == [0, 1]
    ids = torch.tensor(pinned["vocab"])
    for d in (0, 5, len(ids) - 1):  # draft index -> target id -> draft index
        target_id = int(head.vocab[d])
        assert int(torch.searchsorted(head.vocab, torch.tensor(target_id))) == d
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["head"]
    for name, value in head.state_dict().items():
        torch.testing.assert_close(value, trained[name].half().float())
    readout = head.readout(model)
    x = torch.randn(3, 32)
    probs = readout.probs(x, SamplingParams())
    outside = torch.ones(probs.shape[1], dtype=torch.bool)
    outside[ids] = False
    assert probs[:, outside].abs().sum() == 0
    assert torch.equal(probs[:, ids].argmax(-1), head.logits(x).argmax(-1))


def test_resume_equals_an_uninterrupted_run_even_as_the_data_grows(tiny, tmp_path):
    _, model, tok, data_dir = tiny
    whole = train(tiny, tmp_path / "whole", steps=8, checkpoint_every=2)
    grown = tmp_path / "grown"
    shutil.copytree(data_dir, grown)
    parts = tmp_path / "parts"
    stopped = train(tiny, parts, steps=8, checkpoint_every=2, time_budget_s=1e-9,
                    data_dir=str(grown))
    assert not stopped["finished"] and stopped["steps"] == 1
    write_data(model, tok, grown, TEXTS + [f"Another question {i}?" for i in range(12)])
    resumed = train(tiny, parts, steps=8, checkpoint_every=2, data_dir=str(grown))
    assert resumed["finished"] and resumed["steps"] == 8
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["head"]
    b = torch.load(parts / "checkpoint.pt", weights_only=False)["head"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["heldout"] == whole["heldout"]
    with pytest.raises(ValueError, match="other settings"):
        train(tiny, parts, steps=8, lr=1e-3, data_dir=str(grown))


def test_several_data_directories_train_as_one_set(tiny, tmp_path):
    """--data A,B reads both directories' examples in order, pins each one's shards, and refuses
    to resume on other directories, a directory named twice or directories of two dtypes."""
    _, model, tok, data_dir = tiny
    more = write_data(model, tok, tmp_path / "more", [f"Another question {i}?" for i in range(12)])
    one = [(data_dir, [s["file"] for s in load_manifest(data_dir)["shards"]])]
    two = one + [(more, [s["file"] for s in load_manifest(more)["shards"]])]
    a_train, a_held, _ = data.read_windows(one, 48)
    b_train, b_held, _ = data.read_windows(two, 48)
    assert len(b_train) > len(a_train) and len(b_held) >= len(a_held)
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a_train, b_train))
    out = tmp_path / "out"
    summary = train(tiny, out, steps=4, data_dir=f"{data_dir},{more}")
    assert summary["data"]["train_examples"] == len(b_train)
    assert summary["data"]["dirs"] == [str(data_dir), str(more)]
    again = train(tiny, out, steps=4, data_dir=f"{data_dir},{more}")
    assert again["steps"] == 4
    with pytest.raises(SpecDecodeError, match="was written for --data"):
        train(tiny, out, steps=4)
    with pytest.raises(SpecDecodeError, match="names a directory twice"):
        train(tiny, tmp_path / "twice", steps=4, data_dir=f"{data_dir},{data_dir}")
    manifest = json.loads((more / "manifest.json").read_text())
    manifest["options"]["dtype"] = "float16"
    (more / "manifest.json").write_text(json.dumps(manifest))
    root = tiny[0]
    clean_error(cli("--target", root, "--data", f"{data_dir},{more}", "--out", tmp_path / "x",
                    "--steps", "2"), "different dtypes")


def test_feature_cache_is_read_back_and_trains_the_same(tiny, tmp_path):
    cache = tmp_path / "cache"
    first = train(tiny, tmp_path / "a", steps=12, cache_features=str(cache))
    assert first["target_passes"]["cached"] > 0  # 12 steps of 4 cover the ~18 examples twice
    assert len(list(cache.glob("ex-*.npy"))) == first["data"]["train_examples"]
    second = train(tiny, tmp_path / "b", steps=12, cache_features=str(cache))
    assert second["target_passes"] == {"computed": 0, "cached": 12}
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["head"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["head"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SpecDecodeError, match="another data set"):
        train(tiny, tmp_path / "c", steps=2, seq_len=40, cache_features=str(cache))


def test_batches_are_a_function_of_seed_and_step():
    rows = [data.batch_rows(3, s, 4, 10) for s in range(5)]
    assert sorted(sum(rows[:2], []) + rows[2][:2]) == list(range(10))  # one epoch, each once
    assert rows == [data.batch_rows(3, s, 4, 10) for s in range(5)]
    assert rows != [data.batch_rows(4, s, 4, 10) for s in range(5)]
    w = data.cut_window(list(range(100, 110)), [1, 2, 3, 4], 8, False)
    assert w.ids.tolist() == [106, 107, 108, 109, 1, 2, 3, 4] and w.start == 4
    w = data.cut_window([7, 8], list(range(20)), 8, True)
    assert w.ids.tolist() == [8, 0, 1, 2, 3, 4, 5, 6] and w.start == 1


def cli(*args):
    from specdecode.cli import main

    return CliRunner().invoke(main, ["train-drafter", "--kind", "eagle3", *map(str, args)])


def clean_error(result, *words):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert all(w in result.output for w in words), result.output


def test_cli_trains_and_resumes(tiny, tmp_path):
    root, model, tok, data_dir = tiny

    def args(steps):
        return ["--target", root, "--data", data_dir, "--out", tmp_path / "out", "--steps", steps,
                "--batch-size", "2", "--seq-len", "32", "--draft-vocab", "40", "--ttt-steps", "2",
                "--eval-examples", "4"]

    result = cli(*args(3))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["finished"] and summary["draft_vocab_size"] == 40
    assert summary["heldout"]["examples"] == 4 and summary["target"] == root.name
    assert load_head(tmp_path / "out" / "head", "eagle", model)[1]["kind"] == "eagle3"
    log = [json.loads(x)["step"] for x in (tmp_path / "out" / "eval.log").read_text().splitlines()]
    assert log == [0, 3]  # before training (--eval-every 100), and at the end
    prompt = tok("the quick brown fox")["input_ids"]
    out = sd.generate(model, prompt, drafter="eagle", head=str(tmp_path / "out" / "head"),
                      max_new_tokens=16, eos_token_id=[])
    assert out.token_ids == vanilla(model, prompt, 16) and out.stats.drafted > 0
    again = cli(*args(3))
    assert again.exit_code == 0 and "resumed from step 3" in again.output
    clean_error(cli(*args(4)), "other settings")
    from specdecode.cli import main

    help_text = CliRunner().invoke(main, ["train-drafter", "--help"]).output
    assert "eagle3" in help_text and "--ttt-steps" in help_text


def test_cli_errors(tiny, tmp_path):
    root, model, tok, data_dir = tiny
    out = ["--out", tmp_path / "out", "--target", root, "--steps", "2"]
    clean_error(cli(*out), "--kind eagle3 needs --data DIR")
    clean_error(cli(*out, "--data", tmp_path / "missing"), "no data directory")
    (tmp_path / "empty").mkdir()
    clean_error(cli(*out, "--data", tmp_path / "empty"), "no manifest.json")
    none_yet = write_data(model, tok, tmp_path / "none-yet", TEXTS[:1], heldout=0.0)
    manifest = json.loads((none_yet / "manifest.json").read_text())
    manifest["shards"], manifest["totals"]["examples"] = [], 0
    (none_yet / "manifest.json").write_text(json.dumps(manifest))
    clean_error(cli(*out, "--data", none_yet), "holds no training examples")
    other = tmp_path / "other"
    tok.save_pretrained(other)
    tiny_model("llama", vocab=len(tok), seed=3, dtype=torch.float32).save_pretrained(other)
    clean_error(cli("--out", tmp_path / "out", "--target", other, "--data", data_dir),
                "another target", "train with --target tiny")
    clean_error(cli(*out, "--data", data_dir, "--feature-layers", "0,2"),
                "feature layers [0, 2] are out of range", "3 decoder layers")
    clean_error(cli(*out, "--data", data_dir, "--feature-layers", "a"), "comma-separated")
    clean_error(cli(*out, "--data", data_dir, "--tied-heads"),
                "--tied-heads does not apply to --kind eagle3")
    from specdecode.cli import main

    bad = CliRunner().invoke(main, ["train-drafter", "--kind", "eagle", "--data", str(data_dir),
                                    "--out", str(tmp_path / "x")])
    clean_error(bad, "takes corpus or target")
    bad = CliRunner().invoke(main, ["train-drafter", "--kind", "medusa", "--ttt-steps", "3",
                                    "--out", str(tmp_path / "x")])
    clean_error(bad, "--ttt-steps applies to --kind eagle3 only")
    no_heldout = write_data(model, tok, tmp_path / "no-heldout", TEXTS[:6], heldout=0.0)
    clean_error(cli(*out, "--data", no_heldout), "0 held-out examples")
