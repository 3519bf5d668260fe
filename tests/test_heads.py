"""Feature-level drafters: the target-feature channel, EAGLE / Medusa heads and their trainer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import corpus_target, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd

from specdecode.drafters.medusa import prior_tree, static_tree
from specdecode.models.heads import EagleHead, MedusaHeads, load_head, save_head
from specdecode.policies.fixed import FixedPolicy
from specdecode.scheduler import Scheduler
from specdecode.train.heads import HeadConfig, train_head
from specdecode.types import Draft, SpecDecodeError


class FeatureRecorder:
    """Checks each proposal's features against a fresh forward over the committed tokens."""

    feedback_hidden = True

    def __init__(self, target) -> None:
        self.target, self.seen, self.checked = target, 0, 0

    def propose(self, ctx):
        if ctx.hidden is not None:
            with torch.no_grad():
                out = self.target(input_ids=torch.tensor([ctx.tokens]), output_hidden_states=True)
            fresh = out.hidden_states[-1][0]
            m = len(ctx.hidden)
            assert self.seen + m == len(ctx.tokens) - 1, "features skipped or repeated"
            torch.testing.assert_close(ctx.hidden, fresh[self.seen:self.seen + m])
            self.seen += m
            self.checked += m
        depth = min(3, ctx.max_depth)  # a wrong-ish chain, so paths of every length are accepted
        return Draft.chain([(ctx.tokens[-1] + i) % 96 for i in range(depth)])

    def observe(self, verdict) -> None:
        pass


class EveryOther(FixedPolicy):
    """Plain steps every other step: their features must come with the next proposal."""

    def __init__(self) -> None:
        self.n = 0

    def plan(self, max_nodes, max_depth):
        self.n += 1
        budget = super().plan(max_nodes, max_depth)
        return budget if self.n % 2 else type(budget)(0, 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_features_are_the_targets_own_for_every_committed_token(arch):
    target = tiny_model(arch, seed=2)
    prompts = make_prompts(6)
    for plain_steps in (False, True):  # a plain step's features come with the next proposal
        scheduler = Scheduler(target, max_batch_size=3)
        recorders = [FeatureRecorder(target) for _ in prompts]
        ids = [scheduler.add_request(p, drafter=r, max_new_tokens=12, eos_token_id=[],
                                     policy=EveryOther() if plain_steps else "fixed")
               for p, r in zip(prompts, recorders)]
        while scheduler.has_unfinished():
            scheduler.step()
        for prompt, rid in zip(prompts, ids):
            assert scheduler.release(rid)[0] == vanilla(target, prompt, 12)
        assert all(r.checked > 0 for r in recorders)


def _data(target, n: int = 24, length: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = [sd.generate(target, [int(rng.integers(96))], drafter="none", max_new_tokens=length - 1,
                        temperature=1.0, seed=i, eos_token_id=[]).token_ids for i in range(n)]
    return np.asarray([t for row in rows for t in row], dtype=np.int64)


@pytest.mark.parametrize("kind,source", [("eagle", "corpus"), ("medusa", "corpus"),
                                         ("medusa", "target")])
@pytest.mark.e2e
def test_training_lowers_the_loss_and_resumes_exactly(tmp_path, kind, source):
    target = tiny_model("llama", seed=2)
    data = _data(target)
    cfg = HeadConfig(kind=kind, steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup=4,
                     eval_batches=2, checkpoint_every=10, data=source, prompt_len=8)
    untrained = train_head(copy.deepcopy(target), data, data, tmp_path / "zero",
                           HeadConfig(**{**cfg.__dict__, "steps": 1}))
    full = train_head(copy.deepcopy(target), data, data, tmp_path / "full", cfg)
    assert full["val_loss"] < untrained["val_loss"] - 0.05
    if source == "corpus":  # (on a random target's own near-uniform samples top-1 is noise)
        assert full["val_top1_agreement"] > untrained["val_top1_agreement"]
    # stopped by the time budget after a checkpoint, then resumed: the same weights
    parts = tmp_path / "parts"
    stopped = train_head(copy.deepcopy(target), data, data, parts,
                         HeadConfig(**{**cfg.__dict__, "time_budget_s": 1e-9}))
    assert not stopped["finished"] and stopped["steps"] == 1
    resumed = train_head(copy.deepcopy(target), data, data, parts, cfg)
    assert resumed["finished"] and resumed["steps"] == 40
    a = load_head(tmp_path / "full" / "head", kind, target)[0].state_dict()
    b = load_head(parts / "head", kind, target)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((parts / "head" / "head.json").read_text())
    assert config["trained"]["steps"] == 40
    if kind == "medusa":  # the tree comes from the measured accuracies, best paths first
        assert config["tree"] == static_tree(config["topk_accuracy"], cfg.tree_nodes)
    with pytest.raises(ValueError, match="other settings"):
        train_head(copy.deepcopy(target), data, data, parts, HeadConfig(**{**cfg.__dict__,
                                                                          "lr": 1e-3}))


def test_target_continuations_are_its_greedy_output_or_seeded_samples():
    from specdecode.train.heads import batch_at

    target = tiny_model("qwen2", seed=4)
    data = _data(target)
    cfg = HeadConfig(batch_size=4, seq_len=20, data="target", prompt_len=6)
    ids = batch_at(data, 3, cfg, target=target)
    assert ids.shape == (4, 20)
    for row in ids[:2].tolist():  # the first half: the target's greedy continuation
        assert row[6:] == vanilla(target, row[:6], 14)
    assert any(row[6:] != vanilla(target, row[:6], 14) for row in ids[2:].tolist())  # sampled
    assert torch.equal(ids, batch_at(data, 3, cfg, target=target))  # a function of the step
    assert not torch.equal(ids, batch_at(data, 4, cfg, target=target))
    corpus = batch_at(data, 3, HeadConfig(batch_size=4, seq_len=20))
    windows = {tuple(data[i:i + 20].tolist()) for i in range(data.size - 19)}
    assert corpus.shape == (4, 20) and all(tuple(row) in windows for row in corpus.tolist())
    every = batch_at(data, 3, HeadConfig(batch_size=4, seq_len=20, data="target", prompt_len=6,
                                         greedy_share=1.0), target=target)
    assert all(row[6:] == vanilla(target, row[:6], 14) for row in every.tolist())
    with pytest.raises(ValueError, match="data must be one of"):
        train_head(target, data, data, Path("unused"), HeadConfig(data="mine"))


def test_a_second_stage_starts_from_the_saved_head(tmp_path):
    target = tiny_model("llama", seed=2)
    data = _data(target)
    cfg = HeadConfig(kind="medusa", steps=5, batch_size=4, seq_len=16, lr=3e-3, warmup=1,
                     eval_batches=1)
    train_head(copy.deepcopy(target), data, data, tmp_path / "one", cfg)
    first = load_head(tmp_path / "one" / "head", "medusa", target)[0].state_dict()
    still = HeadConfig(**{**cfg.__dict__, "steps": 1, "lr": 1e-30,
                          "init_head": str(tmp_path / "one" / "head")})
    train_head(copy.deepcopy(target), data, data, tmp_path / "two", still)
    second = load_head(tmp_path / "two" / "head", "medusa", target)[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # started there, barely moved
    with pytest.raises(SpecDecodeError, match="holds a 'medusa' head"):
        train_head(copy.deepcopy(target), data, data, tmp_path / "three",
                   HeadConfig(**{**still.__dict__, "kind": "eagle"}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.e2e
def test_tied_medusa_heads_train_blocks_only_and_draft_losslessly(tmp_path, dtype):
    """``--tied-heads``: the heads read out through the target's LM head (over the loss
    vocabulary while training); only the blocks are trained and saved; loaded against the target
    they are tied to it again and draft losslessly."""
    target = tiny_model("llama", seed=2, dtype=dtype)
    data = _data(target)
    cfg = HeadConfig(kind="medusa", steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup=2,
                     eval_batches=2, medusa_tied=True, loss_vocab=64, draft_vocab=48)
    untrained = train_head(copy.deepcopy(target), data, data, tmp_path / "zero",
                           HeadConfig(**{**cfg.__dict__, "steps": 1}))
    full = train_head(copy.deepcopy(target), data, data, tmp_path / "full", cfg)
    assert full["val_loss"] < untrained["val_loss"] - 0.05
    assert full["parameters"] == 3 * (32 * 32 + 32)  # the blocks alone
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "full" / "head" / "head.safetensors"))
    assert sorted(saved) == sorted(f"blocks.{i}.{n}" for i in range(3) for n in ("weight", "bias"))
    head, config = load_head(tmp_path / "full" / "head", "medusa", target)
    assert config["tied"] and head.shared is not None
    assert head.shared.data_ptr() == target.get_output_embeddings().weight.data_ptr()
    for i, prompt in enumerate(make_prompts(4, seed=3)):
        out = sd.generate(target, prompt, drafter="medusa", head=str(tmp_path / "full" / "head"),
                          max_new_tokens=20, eos_token_id=[])
        assert out.token_ids == vanilla(target, prompt, 20), i
    with pytest.raises(SpecDecodeError, match="need the target's LM head"):
        MedusaHeads(32, 96, 2, tied=True).readout_weights()


def test_static_tree_is_best_first_and_closed_under_prefixes():
    accuracy = [[0.5, 0.2, 0.1], [0.4, 0.1, 0.05], [0.3, 0.1, 0.0]]
    tree = static_tree(accuracy, 12)
    assert len(tree) == 12 and len({tuple(p) for p in tree}) == 12
    def score(path):
        return float(np.prod([accuracy[d][i] for d, i in enumerate(path)]))
    for n, path in enumerate(tree):
        assert len(path) == 1 or path[:-1] in tree[:n]  # any leading slice is a tree
    left_out = [[i] for i in range(3)] + [p + [i] for p in tree if len(p) < 3 for i in range(3)]
    best_left = max(score(p) for p in left_out if p not in tree)
    assert min(score(p) for p in tree) >= best_left  # nothing better was left out
    assert all(len(p) <= 2 for p in prior_tree(2, 10))


def test_heads_refuse_a_target_they_were_not_trained_for(tmp_path):
    target = tiny_model("llama", seed=2)
    head = MedusaHeads(32, 96, 2)
    save_head(head, tmp_path / "m", target)
    other = tiny_model("llama", vocab=80, seed=2)
    with pytest.raises(SpecDecodeError, match="trained for a target"):
        sd.generate(other, [1, 2, 3], drafter="medusa", head=str(tmp_path / "m"))
    with pytest.raises(SpecDecodeError, match="holds a 'medusa' head"):
        sd.generate(target, [1, 2, 3], drafter="eagle", head=str(tmp_path / "m"))
    with pytest.raises(SpecDecodeError, match="no eagle head"):
        sd.generate(target, [1, 2, 3], drafter="eagle", head=str(tmp_path / "nothing"))
    with pytest.raises(SpecDecodeError, match="needs a head trained for this target"):
        sd.generate(target, [1, 2, 3], drafter="eagle")


def test_saved_heads_round_trip_in_fp16(tmp_path):
    target = tiny_model("llama", seed=2)
    head = EagleHead(32, 4, 64)
    save_head(head, tmp_path / "e", target)
    loaded, config = load_head(tmp_path / "e", "eagle", target)
    assert config["target"] == {"hidden_size": 32, "vocab_size": 96}
    for name, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float())


def test_train_drafter_cli_trains_a_head_the_drafter_then_uses(tmp_path, monkeypatch):
    """`specdecode train-drafter` on a saved tiny target with its tokenizer (the corpus replaced
    by a few documents): summary, head, resumable; the head then drafts losslessly."""
    from click.testing import CliRunner

    from specdecode.cli import main

    tok, model = corpus_target(tmp_path, monkeypatch)
    args = ["train-drafter", "--kind", "eagle", "--target", str(tmp_path / "target"), "--out",
            str(tmp_path / "out"), "--steps", "6", "--batch-size", "2", "--seq-len", "16",
            "--corpus-tokens", "4000"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["finished"] and summary["tokens_seen"] == 6 * 2 * 16
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "resumed from step 6" in again.output
    prompt = tok("the quick brown fox")["input_ids"]
    out = sd.generate(model, prompt, drafter="eagle", head=str(tmp_path / "out" / "head"),
                      max_new_tokens=16, eos_token_id=[])
    assert out.token_ids == vanilla(model, prompt, 16) and out.stats.drafted > 0
    bad = CliRunner().invoke(main, args[:-2] + ["--corpus-tokens", "4000", "--steps", "0"])
    assert bad.exit_code != 0 and "must be positive" in bad.output
    bad = CliRunner().invoke(main, args + ["--data", "target", "--prompt-len", "16"])
    assert bad.exit_code != 0 and "leaves nothing for the target" in bad.output
    bad = CliRunner().invoke(main, args + ["--target-rows", "3"])
    assert bad.exit_code != 0 and "--target-rows must be between 0 and --batch-size" in bad.output
    bad = CliRunner().invoke(main, args + ["--tied-heads"])
    assert bad.exit_code != 0 and "--tied-heads applies to --kind medusa only" in bad.output


@pytest.mark.parametrize("loss,target_rows", [("tvd", 0), ("kl", 0), ("tvd", 4)])
@pytest.mark.e2e
def test_distillation_brings_the_draft_closer_and_resumes_exactly(tmp_path, loss, target_rows):
    from specdecode.train.distill import DistillConfig, distill

    target = tiny_model("llama", seed=2, dtype=torch.float32)
    draft = tiny_model("llama", seed=3, layers=1, dtype=torch.float32)
    data = _data(target)
    cfg = DistillConfig(loss=loss, steps=30, batch_size=8, prompt_len=8, gen_len=16, lr=3e-3,
                        warmup=3, eval_batches=2, checkpoint_every=10, target_rows=target_rows)
    if target_rows:  # the target writes the first rows: half greedily, half sampled
        from specdecode.train.distill import on_policy, prompts_at

        seqs = on_policy(target, draft, prompts_at(data, 0, cfg), cfg, 0)
        assert all(r[8:] == vanilla(target, r[:8], 16) for r in seqs[:2].tolist())
        assert torch.equal(seqs, on_policy(target, draft, prompts_at(data, 0, cfg), cfg, 0))
    full = distill(target, copy.deepcopy(draft), data, data, tmp_path / "full", cfg)
    assert full["after"]["val_divergence"] < full["before"]["val_divergence"] - 0.02
    assert full["after"]["val_expected_acceptance"] > full["before"]["val_expected_acceptance"]
    parts = tmp_path / "parts"
    stopped = distill(target, copy.deepcopy(draft), data, data, parts,
                      DistillConfig(**{**cfg.__dict__, "time_budget_s": 1e-9}))
    assert stopped["steps"] == 1 and not stopped["finished"]
    resumed = distill(target, copy.deepcopy(draft), data, data, parts, cfg)
    assert resumed["after"] == full["after"] and resumed["before"] == full["before"]
    # the distilled draft is a plain draft model: lossless as ever
    from specdecode.models import load_causal_lm

    model = load_causal_lm(str(parts / "model"))
    prompt = make_prompts(4)[3]
    out = sd.generate(target, prompt, drafter="draft-model", draft_model=model,
                      max_new_tokens=16, eos_token_id=[])
    assert out.token_ids == vanilla(target, prompt, 16)
