"""Bad input fails early with a clear message; loading works from a save_pretrained directory."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, vanilla
from helpers.drafters import Exploding

import specdecode as sd
from specdecode import SpecDecodeError


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", context=64)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(drafter="no-such-drafter"), "unknown drafter 'no-such-drafter'"),
    (dict(drafter="ngram", bogus=3), "no option(s) bogus"),
    (dict(drafter="draft-model"), "needs a draft model"),
    (dict(sampling="nucleus"), "sampling must be"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(draft_model="/nonexistent/dir", drafter="draft-model"), "not a local model directory"),
])
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(SpecDecodeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sd.generate(model, [1, 2, 3], **kwargs)


def test_bad_prompts(model):
    with pytest.raises(SpecDecodeError, match="context is 64"):
        sd.generate(model, list(range(64)))
    with pytest.raises(SpecDecodeError, match="empty"):
        sd.generate(model, [])
    with pytest.raises(SpecDecodeError, match="outside the model's vocabulary"):
        sd.generate(model, [1, 500])
    with pytest.raises(SpecDecodeError, match="1-D"):
        sd.generate(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(SpecDecodeError, match="target model .*is not a local model directory"):
        sd.generate("/nonexistent/model", [1])


def test_draft_vocabulary_mismatch(model):
    other = tiny_model("llama", vocab=50)
    with pytest.raises(SpecDecodeError, match="vocabulary"):
        sd.generate(model, [1, 2], drafter="draft-model", draft_model=other)


def test_layer_skip_layer_count_checked(model):
    with pytest.raises(SpecDecodeError, match="num_layers"):
        sd.generate(model, [1, 2], drafter="layer-skip", num_layers=3)


def test_failing_drafter_falls_back_to_plain_steps(model):
    out = sd.generate(model, [1, 2, 3], drafter=Exploding(), max_new_tokens=12, eos_token_id=[])
    assert out.token_ids == vanilla(model, [1, 2, 3], 12)
    # every step falls back; the last one (room for the bonus token only) asks no draft at all
    assert out.stats.steps == 12 and out.stats.fallbacks == 11


def test_load_from_save_pretrained_directory(tmp_path, model):
    model.save_pretrained(tmp_path / "target")
    draft = tiny_model("llama", seed=9, layers=1, context=64)
    draft.save_pretrained(tmp_path / "draft")
    assert (tmp_path / "target" / "model.safetensors").exists()
    reference = vanilla(model, [5, 6, 7], 10)
    out = sd.generate(str(tmp_path / "target"), [5, 6, 7], drafter="draft-model",
                      draft_model=tmp_path / "draft", max_new_tokens=10, eos_token_id=[])
    assert out.token_ids == reference


def test_stream_yields_steps_that_add_up(model):
    events = list(sd.stream(model, [1, 2, 3, 1, 2, 3], drafter="ngram", max_new_tokens=15,
                            eos_token_id=[]))
    tokens = [t for e in events for t in e.tokens]
    assert tokens == vanilla(model, [1, 2, 3, 1, 2, 3], 15)
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert all(e.stats.emitted == len(e.tokens) for e in events)
