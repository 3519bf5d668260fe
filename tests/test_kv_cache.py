"""After every step the target's cache holds exactly the committed tokens except the pending one:
compared, layer by layer, with a fresh prefill of the same tokens."""

from __future__ import annotations

import torch
from helpers import make_prompts, tiny_model, vanilla
from helpers.drafters import OraclePrefixTree

from specdecode import SamplingParams
from specdecode.engine import run
from specdecode.models import BatchTarget, HFModel


def test_cache_equals_fresh_prefill_after_every_step(arch):
    model = tiny_model(arch)
    for i, prompt in enumerate(make_prompts(4, seed=7)):
        reference = vanilla(model, prompt, 24)
        target = BatchTarget(model)
        drafter = OraclePrefixTree(reference, 96, seed=i)
        tokens = list(prompt)
        steps = 0
        for event in run(target, prompt, drafter, SamplingParams(), max_new_tokens=24):
            tokens.extend(event.tokens)
            if event.finished:
                break
            steps += 1
            fresh = HFModel(model)
            fresh.reset()
            fresh.extend(tokens[:-1])
            assert target.lengths == [len(tokens) - 1]
            for (k, v), (fk, fv) in zip(target.cached_kv(0), fresh.cached_kv()):
                assert k.shape == fk.shape
                torch.testing.assert_close(k, fk, rtol=0, atol=1e-9)
                torch.testing.assert_close(v, fv, rtol=0, atol=1e-9)
        assert tokens[len(prompt):] == reference and steps > 1


def test_tree_mask_lets_each_node_see_only_its_ancestors():
    from specdecode.models.masks import tree_mask

    parents = torch.tensor([-1, -1, 0, 2, 1])
    visible = tree_mask(parents, past=3, dtype=torch.float32)[0, 0] == 0
    assert visible[:, :3].all()  # the cache
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # pending token
        [1, 1, 0, 0, 0, 0],  # node 0
        [1, 0, 1, 0, 0, 0],  # node 1
        [1, 1, 0, 1, 0, 0],  # node 2 (child of 0)
        [1, 1, 0, 1, 1, 0],  # node 3 (child of 2)
        [1, 0, 1, 0, 0, 1],  # node 4 (child of 1)
    ], dtype=torch.bool)
    assert torch.equal(visible[:, 3:], expected)
