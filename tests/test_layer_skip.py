"""layer-skip chooses its exit layer from measured agreement with the target (SWIFT / DEL style):
the choice function, the shadow agreement against an independent computation, the labels taken
from the target feedback, a model whose deep layers are identities (exit layer 1, every draft
accepted), and losslessness (greedy and coupled sampling equal vanilla) with auto and fixed layers."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import ARCHS, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd

from specdecode.drafters import layer_skip as ls
from specdecode.drafters.base import BuildContext
from specdecode.drafters.registry import make_drafter
from specdecode.models import HFModel
from specdecode.types import SpecDecodeError


def drafter(model, **options):
    return make_drafter("layer-skip", BuildContext(target=HFModel(model)), **options)


def identity_beyond_first(model):
    """Layers >= 1 add nothing to the residual stream (attention output and MLP down projections
    zeroed): every exit layer then gives exactly the target's logits."""
    path, layers = ls._layer_list(model, model.config.num_hidden_layers)
    with torch.no_grad():
        for layer in list(layers)[1:]:
            if hasattr(layer, "self_attn"):
                outs = [layer.self_attn.o_proj, layer.mlp.down_proj]
            else:
                outs = [layer.attn.c_proj, layer.mlp.c_proj]
            for module in outs:
                for param in module.parameters():
                    param.zero_()
    return model


def test_choice_function():
    def value(a, k, layer, total=6):  # E / cost, written out independently
        expected = sum(a ** i for i in range(k + 1))
        return expected / (1 + k * layer / total)

    assert ls.step_value(0.6, 3, 2, 6) == pytest.approx(value(0.6, 3, 2))
    assert ls.step_value(1.0, 4, 1, 6) == pytest.approx(value(1.0, 4, 1))  # no division by zero
    # high agreement from a shallow layer on: that layer (deeper ones cost more for no gain)
    layer, k, best = ls.choose_layer([0.1, 0.9, 0.9, 0.92, 0.95], 6, 4)
    assert layer == 2
    brute = max((value(a, kk, ll), -ll) for ll, a in enumerate([0.1, 0.9, 0.9, 0.92, 0.95], 1)
                for kk in range(1, 5))
    assert best == pytest.approx(brute[0]) and -brute[1] == layer
    assert best == pytest.approx(value(0.9, k, 2))
    # agreement rising with depth: a deeper layer when its gain outweighs its cost
    assert ls.choose_layer([0.05, 0.1, 0.2, 0.95, 0.97], 6, 4)[0] == 4
    # nothing agrees: the cheapest layer, one token (the policy decides whether to draft at all)
    assert ls.choose_layer([0.0] * 5, 6, 4)[:2] == (1, 1)
    # equal agreement everywhere: ties go to the smaller (cheaper) layer
    assert ls.choose_layer([0.5] * 5, 6, 4)[0] == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_shadow_agreement_matches_hidden_states(arch):
    model = tiny_model(arch, layers=4, seed=2, scale=1.5)
    exit_ = ls.ExitHead.find(model)
    expected_norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
    assert exit_ is not None and exit_.norm is expected_norm
    ids = make_prompts(4, seed=5)[2]
    labels = torch.tensor([ids[p + 1] if p % 3 else -1 for p in range(len(ids) - 1)] + [-1])
    hits, count = exit_.agreement(ls.shallow_view(model, 3), ids, 0, labels)
    assert count == int((labels >= 0).sum())
    with torch.no_grad():  # independently: HF hidden states (raw for layers < N), norm, head
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        known = labels >= 0
        for layer in (1, 2, 3):
            guess = model.get_output_embeddings()(expected_norm(states[layer][0])).argmax(-1)
            assert hits[layer - 1] == float((guess[known] == labels[known]).sum())
        # the last layer through norm and head is the model itself (the structure check)
        assert exit_.checked


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_layers_pick_layer_one_and_drafts_are_accepted(arch):
    model = identity_beyond_first(tiny_model(arch, layers=4, seed=3))
    for prompt in make_prompts(5, seed=1)[2:4] + [[7]]:
        ls_drafter = drafter(model, num_draft_tokens=3)
        assert ls_drafter.num_layers == 2  # before any measurement: half the layers
        out = sd.generate(model, prompt, drafter=ls_drafter, max_new_tokens=30, eos_token_id=[],
                          policy="fixed")
        assert out.token_ids == vanilla(model, prompt, 30)
        assert ls_drafter.num_layers == 1 and ls_drafter.switches[-1][1] == 1
        if len(prompt) > 4:  # measured on the prompt, before the first draft
            assert ls_drafter.switches[-1][0] == 0
        else:  # a 1-token prompt: measured once enough tokens were committed
            assert ls_drafter.switches[-1][0] > 0
        assert out.stats.drafted > 0 and out.stats.mat > 3.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.e2e
def test_greedy_auto_equals_vanilla(arch):
    model = tiny_model(arch, layers=4, seed=4, scale=2.0)
    prompts = make_prompts(5, seed=7)
    assert len(prompts[0]) == 1
    for prompt in prompts:
        for options in ({}, {"tree_width": 2}, {"tree": "dynamic", "topk": 2, "max_nodes": 5}):
            out = sd.generate(model, prompt, drafter="layer-skip", max_new_tokens=40,
                              eos_token_id=[], **options)
            assert out.token_ids == vanilla(model, prompt, 40), (prompt, options)


def test_coupled_sampling_auto_equals_vanilla():
    model = tiny_model("qwen2", layers=4, seed=5)
    for seed, prompt in enumerate(make_prompts(4, seed=2)):
        common = dict(max_new_tokens=30, seed=seed, sampling="coupled", temperature=0.9,
                      eos_token_id=[])
        reference = sd.generate(model, prompt, drafter="none", **common).token_ids
        out = sd.generate(model, prompt, drafter="layer-skip", **common)
        assert out.token_ids == reference


def test_labels_are_the_targets_argmax_under_sampling(monkeypatch):
    """The positions scored between measurements carry the target's argmax after the committed
    context (from the prefill and the feedback rows), not the sampled next token."""
    model = tiny_model("llama", layers=4, seed=6, scale=1.0)
    seen = []
    original = ls.ExitHead.agreement

    def spy(self, view, ids, start, labels):
        seen.append((start, labels.clone()))
        return original(self, view, ids, start, labels)

    monkeypatch.setattr(ls.ExitHead, "agreement", spy)
    monkeypatch.setattr(ls, "REMEASURE_STEPS", 3)
    for prompt in make_prompts(3, seed=4)[:2]:
        seen.clear()
        d = drafter(model, num_draft_tokens=2)
        out = sd.generate(model, prompt, drafter=d, max_new_tokens=40, temperature=1.0, seed=3,
                          eos_token_id=[], policy="fixed")
        tokens = prompt + out.token_ids
        assert len(seen) >= 2 and out.stats.accepted > 0
        checked = 0
        with torch.no_grad():
            argmax = model(input_ids=torch.tensor([tokens])).logits[0].argmax(-1)
        for start, labels in seen:
            for offset, label in enumerate(labels.tolist()):
                if label >= 0:
                    assert label == int(argmax[start + offset])
                    checked += 1
        assert checked >= 10
        assert tokens[1:] != argmax[:-1].tolist()  # sampling: the labels are not the tokens


def test_switch_keeps_the_draft_random_stream(monkeypatch):
    """A new drafter after a switch goes on with the old one's random stream (restarting it from
    the seed would replay draws the committed tokens already depend on)."""
    model = tiny_model("gpt2", layers=4, seed=7)
    choices = iter([(3, 1, 2.0), (1, 1, 9.0)])  # measured: first on the prompt, then re-measured
    monkeypatch.setattr(ls, "choose_layer", lambda *args: next(choices))
    monkeypatch.setattr(ls, "REMEASURE_STEPS", 2)
    created = []
    make = ls.LayerSkipDrafter._drafter

    def spy(self, layers):
        created.append(make(self, layers))
        return created[-1]

    monkeypatch.setattr(ls.LayerSkipDrafter, "_drafter", spy)
    d = drafter(model)
    out = sd.generate(model, make_prompts(3)[2], drafter=d, max_new_tokens=12, temperature=1.0,
                      seed=1, eos_token_id=[], policy="fixed")
    assert [layer for _, layer in d.switches] == [2, 3, 1] and d.switches[2][0] >= 2
    assert len(created) == 3 and d.inner is created[2] and out.stats.drafted > 0
    assert created[1].rng is not None and created[2].rng is created[1].rng


def test_unrecognised_final_norm_falls_back_to_half(monkeypatch, caplog):
    model = tiny_model("llama", layers=4, seed=8)
    found = ls.ExitHead.find

    def wrong_norm(target):
        exit_ = found(target)
        return ls.ExitHead(exit_.body, torch.nn.Identity(), exit_.head, exit_.layers_name)

    monkeypatch.setattr(ls.ExitHead, "find", staticmethod(wrong_norm))
    prompt = make_prompts(3)[2]
    d = drafter(model)
    with caplog.at_level(logging.INFO, logger=ls.__name__):
        out = sd.generate(model, prompt, drafter=d, max_new_tokens=20, eos_token_id=[])
    assert out.token_ids == vanilla(model, prompt, 20)
    assert not d.auto and d.feedback_topk == 0 and d.num_layers == 2
    assert "not recognised" in caplog.text
    monkeypatch.setattr(ls.ExitHead, "find", staticmethod(lambda target: None))
    assert drafter(model).feedback_topk == 0


def test_failed_measurement_keeps_drafting(monkeypatch):
    def broken(*args):
        raise RuntimeError("no")

    monkeypatch.setattr(ls.ExitHead, "agreement", broken)
    model = tiny_model("qwen2", layers=4, seed=8)
    prompt = make_prompts(3)[2]
    d = drafter(model)
    out = sd.generate(model, prompt, drafter=d, max_new_tokens=20, eos_token_id=[],
                      policy="fixed")
    assert out.token_ids == vanilla(model, prompt, 20)
    assert not d.auto and out.stats.fallbacks == 0 and out.stats.drafted > 0


def test_fixed_layers_and_errors():
    model = tiny_model("llama", layers=4, seed=9)
    prompt = make_prompts(3)[2]
    for layers in (1, 3):
        d = drafter(model, num_layers=layers, num_draft_tokens=3)
        out = sd.generate(model, prompt, drafter=d, max_new_tokens=20, eos_token_id=[])
        assert out.token_ids == vanilla(model, prompt, 20)
        assert d.num_layers == layers and d.feedback_topk == 0 and d.switches == [(0, layers)]
    for bad in (0, 4, -1, 2.5, "2", True):
        with pytest.raises(SpecDecodeError):
            sd.generate(model, prompt, drafter="layer-skip", num_layers=bad, max_new_tokens=4)
    with pytest.raises(SpecDecodeError, match="no option"):
        sd.generate(model, prompt, drafter="layer-skip", bogus=1, max_new_tokens=4)
    with pytest.raises(SpecDecodeError):
        sd.generate(model, prompt, drafter="layer-skip", num_draft_tokens=0, max_new_tokens=4)
    with pytest.raises(SpecDecodeError):  # one layer: nothing to skip, automatic or not
        sd.generate(tiny_model("llama", layers=1), prompt, drafter="layer-skip", max_new_tokens=4)
