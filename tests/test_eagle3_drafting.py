"""EAGLE-3 heads in the ``eagle`` drafter (issue 38 part 2): the target hands the drafter the
outputs of several of its layers (lean forward and the model's own alike), the head reads them,
drafts only tokens of its reduced vocabulary, and every output equals plain decoding: chains,
dynamic trees, batch rows, on three tiny architectures."""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHS, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd
from helpers.drafters import eagle3_head

from specdecode.models import BatchTarget
from specdecode.models.heads import load_head, save_head
from specdecode.types import Draft

PROMPTS = make_prompts(6, seed=3)


eagle3 = eagle3_head


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_features_are_the_models_hidden_states(arch):
    """``hidden=(layers)``: the outputs of those layers, as transformers' output_hidden_states
    gives them (lean forward or the model's own), concatenated; -1 the final-normed states."""
    model = tiny_model(arch)
    target = BatchTarget(model)
    row = target.add_row(64)
    ids = PROMPTS[1][:12]
    target.prefill(row, ids, hidden=(0, 1, -1))
    got = target.hidden
    states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = torch.cat([states[1][0], states[2][0], states[-1][0]], -1)
    assert got.shape == (len(ids), 3 * model.config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    logits = target.step([3], [Draft.chain(torch.tensor([4, 5]))], hidden=(1,))
    assert len(logits) == 1 and target.hidden[0].shape == (3, model.config.hidden_size)


@pytest.mark.parametrize("arch", [a if a == "llama" else pytest.param(a, marks=pytest.mark.e2e)
                                  for a in ARCHS])  # one architecture in the unit tier
def test_eagle3_equals_plain_decoding(arch):
    model = tiny_model(arch)
    head = eagle3(model)
    for prompt in PROMPTS:
        plain = vanilla(model, prompt, 24)
        for options in ({}, {"topk": 3, "max_nodes": 8}, {"num_draft_tokens": 7, "topk": 2}):
            out = sd.generate(model, prompt, drafter="eagle", head=head, max_new_tokens=24,
                              eos_token_id=[], **options)
            assert out.token_ids == plain, (options, prompt)


def test_batch_rows_with_mixed_feature_drafters():
    """EAGLE-3 (layer features), EAGLE-1-style (final-normed) and model-free rows in one batch:
    each row equals its batch-1 output."""
    model = tiny_model("llama")
    head = eagle3(model)
    alone = [vanilla(model, p, 20) for p in PROMPTS]
    outs = sd.generate_batch(model, PROMPTS, batch_size=len(PROMPTS), drafter="eagle", head=head,
                             max_new_tokens=20, eos_token_id=[])
    assert [o.token_ids for o in outs] == alone


def test_drafts_stay_in_the_head_vocabulary(monkeypatch):
    from specdecode.drafters import eagle as eagle_module

    model = tiny_model("llama")
    vocab = list(range(10, 60))
    seen: list[int] = []
    original = eagle_module.EagleDrafter.propose

    def spy(self, ctx):
        draft = original(self, ctx)
        seen.extend(draft.tokens.tolist())
        return draft

    monkeypatch.setattr(eagle_module.EagleDrafter, "propose", spy)
    sd.generate(model, PROMPTS[2], drafter="eagle", head=eagle3(model, vocab=vocab), topk=4,
                max_nodes=12, max_new_tokens=24, eos_token_id=[])
    assert seen and set(seen) <= set(vocab)


def test_save_and_load_keep_layers_and_vocabulary(tmp_path):
    model = tiny_model("llama")
    head = eagle3(model, vocab=[5, 1, 9, 40])
    assert head.vocab.tolist() == [1, 5, 9, 40]  # draft id d reads out target id vocab[d]
    save_head(head, tmp_path, model)
    loaded, config = load_head(tmp_path, "eagle", model)
    assert config["kind"] == "eagle3" and loaded.feature_layers == head.feature_layers
    assert loaded.vocab.tolist() == [1, 5, 9, 40]
    x = torch.randn(3, model.config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(loaded.double().logits(x), head.double().logits(x).to(torch.float16)
                               .double(), rtol=2e-2, atol=2e-2)
