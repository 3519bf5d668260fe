"""``mix``: the trie merge against a brute-force reference, verdict translation, and losslessness."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import fixed_policy as sd
from helpers import make_prompts, tiny_model, vanilla

from specdecode.drafters.mix import merge_drafts
from specdecode.types import Draft, TargetFeedback, Verdict


def random_tree(rng: random.Random, n: int, vocab: int) -> Draft:
    parents = [-1 if i == 0 or rng.random() < 0.3 else rng.randrange(i) for i in range(n)]
    tokens = [rng.randrange(vocab) for _ in range(n)]
    seen, keep = set(), []
    for i in range(n):  # drop duplicate siblings (a drafter never proposes them)
        key = (parents[i], tokens[i])
        keep.append(key not in seen and (parents[i] < 0 or keep[parents[i]]))
        seen.add(key)
    index, new_parents, new_tokens = {}, [], []
    for i in range(n):
        if keep[i]:
            index[i] = len(new_tokens)
            new_parents.append(-1 if parents[i] < 0 else index[parents[i]])
            new_tokens.append(tokens[i])
    return Draft(torch.tensor(new_tokens, dtype=torch.long), torch.tensor(new_parents, dtype=torch.long))


def root_paths(draft: Draft) -> list[tuple[int, ...]]:
    toks, pars = draft.tokens.tolist(), draft.parents.tolist()
    out = []
    for i in range(len(toks)):
        path, node = [], i
        while node >= 0:
            path.append(toks[node])
            node = pars[node]
        out.append(tuple(path[::-1]))
    return out


def test_merge_equals_brute_force_union_under_budget():
    rng = random.Random(0)
    for _ in range(300):
        parts = [(f"s{j}", random_tree(rng, rng.randint(0, 9), 4)) for j in range(rng.randint(1, 3))]
        budget = rng.randint(0, 20)
        merged = merge_drafts(parts, budget)
        # brute force: paths in order of first appearance, a path kept iff its parent path is kept
        # and there is room
        expected: list[tuple[int, ...]] = []
        origin = {}
        for name, d in parts:
            for path in root_paths(d):
                if path in origin or (len(path) > 1 and path[:-1] not in origin):
                    continue
                if len(expected) < budget:
                    expected.append(path)
                    origin[path] = name
        assert root_paths(merged.draft) == expected
        assert merged.draft.sources == [origin[p] for p in expected]
        merged.draft.validate(4)
        for (_, d), node_map in zip(parts, merged.node_maps):  # maps point at the same root paths
            own, mine = root_paths(d), root_paths(merged.draft)
            for i, m in enumerate(node_map):
                assert m == -1 and own[i] not in origin or mine[m] == own[i]


def test_translated_verdict_gives_each_source_its_own_indices_and_rows():
    a = Draft(torch.tensor([5, 6, 7]), torch.tensor([-1, 0, 1]))
    b = Draft(torch.tensor([5, 9]), torch.tensor([-1, 0]))
    merged = merge_drafts([("a", a), ("b", b)], budget=10)
    assert merged.draft.tokens.tolist() == [5, 6, 7, 9]
    topk = torch.arange(5 * 3).reshape(5, 3)
    fb = TargetFeedback([1, 5, 6, 7, 9], topk)
    verdict = Verdict(path=[0, 3], tokens=[5, 9, 2], num_drafted=4, feedback=fb)
    va = verdict.translated(merged.node_maps[0], 3, topk=2)
    vb = verdict.translated(merged.node_maps[1], 2, topk=3)
    assert va.path == [0] and vb.path == [0, 1]
    assert va.feedback.row_tokens == [1, 5, 6, 7] and va.feedback.topk_ids.tolist() == \
        topk[[0, 1, 2, 3], :2].tolist()
    assert vb.feedback.row_tokens == [1, 5, 9] and vb.feedback.topk_ids.tolist() == \
        topk[[0, 1, 4]].tolist()
    assert verdict.translated(merged.node_maps[0], 3, topk=0).feedback is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.e2e
def test_mix_of_lookup_and_model_is_lossless(arch):
    target, other = tiny_model(arch, seed=0), tiny_model(arch, seed=1, layers=1)
    rng = random.Random(2)
    accepted = 0
    for prompt in make_prompts(12):
        max_new = rng.randint(1, 20)
        reference = vanilla(target, prompt, max_new)
        for sources in ("ngram+draft-model", "draft-model+ngram"):
            out = sd.generate(target, prompt, drafter="mix", sources=sources, draft_model=other,
                              max_nodes=8, max_new_tokens=max_new, eos_token_id=[])
            assert out.token_ids == reference, (sources, prompt)
            accepted += out.stats.accepted
    assert accepted > 0


def test_mix_bad_options():
    model = tiny_model("llama")
    with pytest.raises(sd.SpecDecodeError, match="not a registered"):
        sd.generate(model, [1, 2], drafter="mix", sources="ngram+nope")
    with pytest.raises(sd.SpecDecodeError, match="cannot be its own source"):
        sd.generate(model, [1, 2], drafter="mix", sources="mix+ngram")
    with pytest.raises(sd.SpecDecodeError, match="no source takes"):
        sd.generate(model, [1, 2], drafter="mix", sources="ngram", bogus=3)


def test_mix_with_feature_heads_gives_each_its_own_features(caplog):
    """A mix of lookup, an EAGLE-3 head (its layers' outputs) and an EAGLE-1-style head (the
    final-normed states): the target is asked for every source's features once and each head gets
    its own columns, so every source drafts (none fails over) and the output equals plain decoding.
    Before, the EAGLE-3 head got the final-normed states and failed at every step."""
    import logging

    from helpers.drafters import eagle3_head, trained_heads

    from specdecode.drafters.mix import MixDrafter

    target = tiny_model("llama", seed=0)
    head3 = eagle3_head(target)
    head1 = trained_heads(target, steps=5)[0]
    caplog.set_level(logging.WARNING, logger="specdecode")
    for sources, head in (("suffix+eagle", head3), ("eagle+suffix", head1)):
        for prompt in make_prompts(4, seed=5):
            out = sd.generate(target, prompt, drafter="mix", sources=sources, head=head,
                              max_nodes=8, max_new_tokens=16, eos_token_id=[])
            assert out.token_ids == vanilla(target, prompt, 16), (sources, prompt)
    assert "failed" not in caplog.text
    both = MixDrafter([("a", type("A", (), {"feedback_hidden": True, "feature_layers": (2, 5)})()),
                       ("b", type("B", (), {"feedback_hidden": True})()),
                       ("c", type("C", (), {})())], 8, 4)
    assert both.feature_layers == (2, 5, -1) and both.columns == [[0, 1], [2], None]
    hidden = torch.arange(6.0).view(1, 6)  # three features of width 2
    assert both._hidden(hidden, 0).tolist() == [[0, 1, 2, 3]]
    assert both._hidden(hidden, 1).tolist() == [[4, 5]]
    assert both._hidden(hidden, 2) is hidden
