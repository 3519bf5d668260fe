"""Draft models cut from the target (``models/layer_draft.py``), distilled with a reduced read-out,
stored as their trained layers only, shipped per target; and the reduced read-out of the
draft-model drafter (``HFModel(vocab=...)``): lossless whatever the draft reads out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import corpus_target, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd

from specdecode.models import HFModel, layer_draft
from specdecode.models.layer_draft import cut_draft, load_cut_draft, parse_layers, save_cut_draft
from specdecode.types import SpecDecodeError


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_cut_of_every_layer_is_the_target_and_a_smaller_cut_is_not(arch):
    target = tiny_model(arch, seed=2, dtype=torch.float32)
    ids = torch.tensor([make_prompts(4)[3]])
    whole = cut_draft(target, [0, 1, 2])
    assert torch.equal(whole(input_ids=ids).logits, target(input_ids=ids).logits)
    small = cut_draft(target, [0, 2])
    assert small.config.num_hidden_layers == 2 and small.config.draft_layers == [0, 2]
    assert not torch.equal(small(input_ids=ids).logits, target(input_ids=ids).logits)
    frozen = {n for n, p in small.named_parameters() if not p.requires_grad}
    assert frozen == {"model.embed_tokens.weight", "lm_head.weight"}


def test_layer_lists_are_checked():
    assert parse_layers("0, 2,-1", 30) == [0, 2, 29]
    for bad, words in [("a,b", "comma-separated"), ("0,30", "layers 0..29"), ("", "layers 0..29"),
                       ("0,1,2", "every layer")]:
        with pytest.raises(SpecDecodeError, match=words):
            parse_layers(bad, 3 if bad == "0,1,2" else 30)


def _trained(target, layers, vocab):
    from specdecode.train.distill import DistillConfig, distill

    data = np.asarray(sum(make_prompts(40, seed=5), []) * 4, dtype=np.int32)
    cfg = DistillConfig(steps=30, batch_size=4, prompt_len=8, gen_len=8, lr=3e-3, warmup=2,
                        eval_batches=2, checkpoint_every=100, target_rows=2)
    draft = cut_draft(target, layers)
    draft.config.draft_vocab = vocab
    return draft, cfg, data, distill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.e2e
def test_distilling_a_cut_draft_with_a_reduced_read_out(tmp_path, dtype):
    target = tiny_model("llama", seed=2, dtype=dtype)
    vocab = list(range(0, 90))
    draft, cfg, data, distill = _trained(target, [0], vocab)
    embed = draft.model.embed_tokens.weight.detach().clone()
    layer0 = draft.model.layers[0].mlp.down_proj.weight.detach().clone()
    summary = distill(target, draft, data, data, tmp_path, cfg, vocab=torch.tensor(vocab))
    assert summary["after"]["val_divergence"] < summary["before"]["val_divergence"]
    assert torch.equal(draft.model.embed_tokens.weight, embed.float())  # frozen: the target's
    assert not torch.equal(draft.model.layers[0].mlp.down_proj.weight, layer0.float())
    with pytest.raises(ValueError, match="tvd loss only"):
        distill(target, draft, data, data, tmp_path / "kl",
                type(cfg)(**{**cfg.__dict__, "loss": "kl"}), vocab=torch.tensor(vocab))
    # stored: the trained layers only, rebuilt on the target, in its dtype
    save_cut_draft(draft, tmp_path / "head", target, vocab, {"steps": 30})
    stored = set(json.loads((tmp_path / "head" / "head.json").read_text()))
    assert {"kind", "layers", "target_probe", "draft_vocab"} <= stored
    loaded = load_cut_draft(tmp_path / "head", target)
    assert loaded.config.draft_vocab == vocab and next(loaded.parameters()).dtype == dtype
    ids = torch.tensor([make_prompts(4)[3]])
    expected = draft.to(dtype)(input_ids=ids).logits
    assert torch.allclose(loaded(input_ids=ids).logits.float(), expected.float(), atol=0.1)
    other = tiny_model("llama", seed=7, dtype=dtype)
    with pytest.raises(SpecDecodeError, match="cut from other weights"):
        load_cut_draft(tmp_path / "head", other)


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                        ("llama", torch.bfloat16)])
@pytest.mark.e2e
def test_a_reduced_read_out_drafts_only_its_tokens_and_stays_lossless(arch, dtype):
    target = tiny_model(arch, seed=2, dtype=dtype)
    draft = cut_draft(target, [0, 2])
    vocab = torch.arange(0, 96, 3)
    reduced, full = HFModel(draft, vocab), HFModel(draft)
    reduced.reset()
    full.reset()
    prompt = make_prompts(4)[3]
    small, big = reduced.extend(prompt), full.extend(prompt)
    assert small.shape == big.shape
    outside = torch.ones(96, dtype=torch.bool)
    outside[vocab] = False
    assert torch.isneginf(small[:, outside]).all()
    assert torch.allclose(small[:, vocab], big[:, vocab], atol=1e-2 if dtype == torch.bfloat16
                          else 1e-5)
    draft.config.draft_vocab = vocab.tolist()[::-1]  # most used first, as the trainer lists them
    for prompt in make_prompts(8, seed=3):
        for opts in ({}, {"tree": "dynamic", "max_nodes": 6}, {"draft_vocab": 0}):
            out = sd.generate(target, prompt, drafter="draft-model", draft_model=draft,
                              max_new_tokens=16, eos_token_id=[], **opts)
            assert out.token_ids == vanilla(target, prompt, 16), (prompt, opts)
        for mode in ("coupled", "rejection"):
            kw = dict(temperature=1.0, seed=4, sampling=mode, max_new_tokens=16, eos_token_id=[])
            out = sd.generate(target, prompt, drafter="draft-model", draft_model=draft, **kw)
            if mode == "coupled":  # the same keyed noise: the very tokens of plain sampling
                plain = sd.generate(target, prompt, drafter="none", **kw)
                assert out.token_ids == plain.token_ids


def test_drafted_tokens_come_from_the_reduced_vocabulary():
    from specdecode.drafters.base import DraftContext
    from specdecode.drafters.model_drafting import DraftModelDrafter
    from specdecode.types import SamplingParams

    target = tiny_model("llama", seed=2, dtype=torch.float32)
    vocab = torch.arange(1, 96, 5)
    drafter = DraftModelDrafter(HFModel(cut_draft(target, [0]), vocab), num_draft_tokens=4,
                                tree="dynamic", max_nodes=8)
    for prompt in make_prompts(6, seed=9):
        ctx = DraftContext(tokens=prompt, num_prompt=len(prompt), budget=8, max_depth=4,
                           params=SamplingParams(), seed=0)
        draft = drafter.propose(ctx)
        assert draft.tokens.numel() > 0 and bool(torch.isin(draft.tokens, vocab).all())
        drafter.model.reset()


def test_the_shipped_draft_loads_for_its_target_only(tmp_path, monkeypatch):
    target = tiny_model("llama", seed=2, dtype=torch.float32)
    draft = cut_draft(target, [1])
    save_cut_draft(draft, tmp_path / "heads" / "tiny" / "draft", target, [3, 1, 2], {})
    monkeypatch.setattr(layer_draft, "SHIPPED", tmp_path / "heads")
    found = layer_draft.shipped_draft(target)
    assert found is not None and found.config.draft_layers == [1]
    assert found.config.draft_vocab == [3, 1, 2]
    assert layer_draft.shipped_draft(tiny_model("llama", seed=7, dtype=torch.float32)) is None
    prompt = make_prompts(4)[2]
    out = sd.generate(target, prompt, drafter="draft-model", max_new_tokens=16, eos_token_id=[])
    assert out.token_ids == vanilla(target, prompt, 16) and out.stats.drafted > 0
    with pytest.raises(SpecDecodeError, match="none is shipped for this target"):
        sd.generate(tiny_model("llama", seed=7, dtype=torch.float32), prompt,
                    drafter="draft-model", max_new_tokens=4)


def test_train_drafter_cuts_distils_and_the_commands_then_use_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from specdecode.cli import main
    from specdecode.cli.shared import load_models

    tok, model = corpus_target(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = ["train-drafter", "--kind", "distill", "--target", str(tmp_path / "target"), "--out",
            str(out), "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--corpus-tokens", "4000", "--draft-layers", "0,2", "--draft-vocab", "40"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "head" / "head.json").read_text())
    assert config["layers"] == [0, 2] and len(config["draft_vocab"]) == 40
    assert json.loads((out / "model" / "config.json").read_text())["draft_vocab"] == \
        config["draft_vocab"]
    shutil.copytree(out / "head", tmp_path / "shipped" / "tiny" / "draft")  # as if shipped
    monkeypatch.setattr(layer_draft, "SHIPPED", tmp_path / "shipped")
    _, draft, _ = load_models(str(tmp_path / "target"), None, True, dtype="float32")
    assert draft is not None and draft.config.draft_layers == [0, 2]
    prompt = tok("the quick brown fox")["input_ids"]
    assert sd.generate(model, prompt, drafter="draft-model", draft_model=str(out / "model"),
                       max_new_tokens=12, eos_token_id=[]).token_ids == vanilla(model, prompt, 12)
    for extra, words in [(["--kind", "eagle"], "apply to --kind distill only"),
                         (["--draft-model", str(out / "model")], "not both"),
                         (["--draft-layers", "0,1,2"], "every layer")]:
        bad = CliRunner().invoke(main, args + extra)
        assert bad.exit_code != 0 and words in bad.output, bad.output
