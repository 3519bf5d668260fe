"""Heads shipped for a model load by default for that model only: keyed by its weights (a probe of
its embedding values), in any dtype, never for another model of the same shape."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import fixed_policy as sd
from helpers import tiny_model, vanilla

import specdecode.models.heads as heads
from specdecode.models.heads import EagleHead, probe_matches, save_head, weights_probe
from specdecode.types import SpecDecodeError


@pytest.fixture()
def shipped(tmp_path, monkeypatch):
    target = tiny_model("llama", seed=5, dtype=torch.float32)
    torch.manual_seed(0)
    save_head(EagleHead(32, 4, 64), tmp_path / "tiny-5" / "eagle", target)
    monkeypatch.setattr(heads, "SHIPPED_HEADS", tmp_path)
    return target, tmp_path / "tiny-5" / "eagle"


def test_the_shipped_head_loads_for_its_own_weights_in_any_dtype(shipped):
    target, directory = shipped
    assert heads.shipped_head_dir("eagle", target) == directory
    half = copy.deepcopy(target).to(torch.bfloat16)
    assert probe_matches(weights_probe(target), half)
    assert heads.shipped_head_dir("eagle", half) == directory
    assert heads.shipped_head_dir("medusa", target) is None  # no medusa head shipped
    prompt = [3, 4, 5, 6, 3, 4, 5]
    out = sd.generate(target, prompt, drafter="eagle", max_new_tokens=12)
    assert out.token_ids == vanilla(target, prompt, 12)


def test_never_for_another_model_of_the_same_shape(shipped):
    other = tiny_model("llama", seed=6, dtype=torch.float32)
    assert not probe_matches(weights_probe(shipped[0]), other)
    assert heads.shipped_head_dir("eagle", other) is None
    with pytest.raises(SpecDecodeError, match="needs a head trained for this target"):
        sd.generate(other, [1, 2, 3], drafter="eagle")
    slightly = copy.deepcopy(shipped[0])  # fine-tuned weights are another model
    with torch.no_grad():
        slightly.get_input_embeddings().weight.mul_(1.1)
    assert heads.shipped_head_dir("eagle", slightly) is None


def test_a_shipped_eagle3_head_is_preferred(shipped):
    """With an EAGLE-1 and an EAGLE-3 head shipped for one model, the eagle drafter takes the
    EAGLE-3 one (and stays token-identical to plain decoding); other models get neither."""
    from helpers.drafters import eagle3_head

    from specdecode.models.eagle3 import Eagle3Head

    target, directory = shipped
    save_head(eagle3_head(target), directory.parent / "eagle3", target)
    module, config = heads.resolve_head("eagle", None, target)
    assert isinstance(module, Eagle3Head) and config["kind"] == "eagle3"
    prompt = [3, 4, 5, 6, 3, 4, 5]
    out = sd.generate(target, prompt, drafter="eagle", max_new_tokens=12)
    assert out.token_ids == vanilla(target, prompt, 12) and out.stats.drafted > 0
    assert heads.shipped_head_dir("eagle3", tiny_model("llama", seed=6)) is None
