"""Prepacked bfloat16 linears (models/packed.py): row-invariant like the plain kernel from
MIN_ROWS rows up, on SmolLM2-135M's own shapes, and refreshed when the weights change."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import specdecode as sd
from specdecode.models.exact import MIN_ROWS
from specdecode.models.packed import PackedLinears, can_pack, packed_linears

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in)


def _packable() -> bool:
    return can_pack(tiny_model("llama", dtype=torch.bfloat16))


pytestmark = pytest.mark.skipif(not _packable(), reason="no oneDNN bfloat16 packing on this CPU")


@pytest.mark.parametrize("shape", SMOLLM2_SHAPES)
def test_packed_rows_do_not_depend_on_the_row_count(shape):
    torch.manual_seed(sum(shape))
    out_f, in_f = shape
    layer = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    mode = PackedLinears(layer)
    x = torch.randn(40, in_f).bfloat16()
    filler = torch.randn(MIN_ROWS - 1, in_f).bfloat16()
    with torch.no_grad(), mode:
        alone = torch.stack([layer(torch.cat([x[r:r + 1], filler]))[0] for r in range(40)])
        for rows in (MIN_ROWS, 5, 7, 8, 15, 16, 17, 31, 40):
            assert torch.equal(layer(x[:rows].clone()), alone[:rows]), rows
        assert mode.packed  # the packed kernel ran, not the stock one


def test_packs_are_kept_and_refreshed():
    model = tiny_model("llama", seed=2, dtype=torch.bfloat16)
    first = packed_linears(model)  # (BatchTarget uses models/lean.py's own packs for a llama)
    assert first is not None and packed_linears(model) is first  # made once per model
    twin = copy.deepcopy(model)  # a copy packs its own weights
    assert packed_linears(twin) is not first
    prompt = [5, 6, 7, 5, 6, 7, 5]
    before = sd.generate(model, prompt, drafter="none", max_new_tokens=1, eos_token_id=[])
    top = before.token_ids[0]
    other = (top + 1) % model.config.vocab_size
    with torch.no_grad():  # changed in place so that another token wins: packed again
        model.lm_head.weight[other] = model.lm_head.weight[top] * 3
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    assert logits.argmax().item() == other  # (the top logit was positive)
    assert packed_linears(model) is not first
    after = sd.generate(model, prompt, drafter="none", max_new_tokens=1, eos_token_id=[])
    assert after.token_ids == [other]  # a stale pack would still say ``top``
    assert packed_linears(tiny_model("llama", dtype=torch.float32)) is None  # fp32: never
