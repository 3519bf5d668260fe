"""Token Recycling (Luo et al., 2024): the adjacency table against a brute-force replay of the
feedback, the tree template's shape and prefix property, drafts against a brute-force expansion,
hot vs cold tables, greedy losslessness on three architectures, and edge cases."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import fixed_policy as sd
from helpers import make_prompts, tiny_model, vanilla

import specdecode.drafters.token_recycling as tr
from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.registry import make_drafter
from specdecode.host import HostState, host_of
from specdecode.types import SamplingParams, SpecDecodeError, TargetFeedback, Verdict

PROMPTS = make_prompts(20)
NAME = "token-recycling"


def ctx_of(tokens: list[int], budget: int = 64, max_depth: int = 64, prefill=None) -> DraftContext:
    return DraftContext(tokens, len(tokens), budget, max_depth, SamplingParams(), 0, prefill)


def build(vocab: int = 96, host: HostState | None = None, **options) -> tr.TokenRecyclingDrafter:
    return make_drafter(NAME, BuildContext(target=SimpleNamespace(vocab_size=vocab),
                                           host=host or HostState()), **options)


# ---------------------------------------------------------------- template


def test_template_has_the_published_shape_and_every_priority_prefix_is_a_tree():
    tpl = tr.build_template()
    assert len(tpl) == 80
    widths = [end - start for start, end in tpl.levels]
    assert widths == [8, 21, 25, 15, 8, 3] and Counter(tpl.depth.tolist()) == dict(
        zip(range(1, 7), widths))
    parent, rank, depth = tpl.parent.tolist(), tpl.rank.tolist(), tpl.depth.tolist()
    children: dict[int, list[int]] = {}
    for i, (p, r, d) in enumerate(zip(parent, rank, depth)):
        assert p < i and d == (1 if p < 0 else depth[p] + 1)  # BFS: parents first
        assert 0 <= r < tr.TEMPLATE_RANKS
        children.setdefault(p, []).append(r)
    for ranks in children.values():  # a node's children are its best ranks, in order
        assert ranks == list(range(len(ranks)))
    # the first rank gets more children than worse ranks at the same depth
    for start, end in tpl.levels[:-1]:
        counts = [len(children.get(i, [])) for i in range(start, end)]
        by_rank: dict[int, list[int]] = {}
        for i, c in zip(range(start, end), counts):
            by_rank.setdefault(rank[i], []).append(c)
        best = [max(by_rank[r]) for r in sorted(by_rank)]
        assert best == sorted(best, reverse=True)
    order = tpl.priority.tolist()
    assert sorted(order) == list(range(80))
    seen: set[int] = {-1}
    for node in order:  # every prefix of the priority order is a tree
        assert parent[node] in seen
        seen.add(node)
    assert depth[order[0]] == 1 and rank[order[0]] == 0


def test_template_with_fewer_ranks_uses_only_those_ranks():
    for ranks in (1, 2, 3):
        tpl = tr.build_template(ranks)
        assert tpl.rank.max() < ranks and len(tpl) <= 80
        assert len(set(zip(tpl.parent.tolist(), tpl.rank.tolist()))) == len(tpl)


# ---------------------------------------------------------------- table updates


def random_tree(rng: random.Random, vocab: int, n: int) -> tuple[list[int], list[int]]:
    tokens, parents = [], []
    for i in range(n):
        parents.append(rng.randrange(-1, i))
        tokens.append(rng.randrange(vocab))
    return tokens, parents


def random_path(rng: random.Random, parents: list[int]) -> list[int]:
    """A root-to-node path in the tree (possibly empty)."""
    if not parents or rng.random() < 0.2:
        return []
    node, path = rng.randrange(len(parents)), []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("vocab,k", [(7, 3), (30, 4), (96, 8)])
def test_table_update_equals_a_replay_of_the_feedback_rows(vocab, k):
    rng = random.Random(vocab)
    drafter = build(vocab, topk=k)
    assert drafter.feedback_topk == k
    pattern = [rng.randrange(vocab) for _ in range(3)]
    prompt = (pattern * 6)[:15] + [rng.randrange(vocab) for _ in range(5)]
    reference = {}
    context = list(prompt)
    for step in range(12):
        prefill = None
        if step == 0:
            prefill = torch.tensor([rng.sample(range(vocab), k) for _ in prompt[:-1]])
            for j, tok in enumerate(prompt[:-1]):  # prefill: the latest occurrence wins
                reference[tok] = prefill[j].tolist()
        drafter.propose(ctx_of(context, prefill=prefill))
        draft_tokens, parents = random_tree(rng, vocab if step % 2 else 3, rng.randint(0, 12))
        rows = [context[-1]] + draft_tokens
        topk = torch.tensor([rng.sample(range(vocab), k) for _ in rows])
        path = random_path(rng, parents)
        on_path = [0] + [p + 1 for p in path]
        for r in [r for r in range(len(rows)) if r not in on_path] + on_path:
            reference[rows[r]] = topk[r].tolist()  # off-path rows, then the accepted path
        verdict = Verdict(path, [draft_tokens[p] for p in path] + [rng.randrange(vocab)],
                          len(draft_tokens), TargetFeedback(rows, topk))
        drafter.observe(verdict)
        context = context + verdict.tokens
        expected = np.full((vocab + 1, k), -1)
        for tok, ids in reference.items():
            expected[tok] = ids
        assert np.array_equal(drafter.table, expected), f"step {step}"


def test_observe_without_feedback_changes_nothing():
    drafter = build(96)
    drafter.propose(ctx_of([1, 2, 3]))
    drafter.observe(Verdict([], [4], 0, None))
    assert (drafter.table == -1).all()


# ---------------------------------------------------------------- drafting


def brute_force_draft(table: np.ndarray, root: int, ranks: int, depth: int, budget: int):
    """Expand the template node by node with dicts, then keep the first ``budget`` surviving
    nodes of depth <= ``depth`` in priority order."""
    tpl = tr.build_template(ranks)
    token: dict[int, int] = {-1: root}
    taken: dict[int, set[int]] = {}
    for i in range(len(tpl)):
        p, r, d = int(tpl.parent[i]), int(tpl.rank[i]), int(tpl.depth[i])
        if d > depth or p not in token:
            continue
        t = int(table[token[p], r])
        if t < 0 or t in taken.setdefault(p, set()):
            continue
        taken[p].add(t)
        token[i] = t
    chosen = [i for i in tpl.priority.tolist() if i in token][:budget]
    index = {-1: -1} | {node: j for j, node in enumerate(chosen)}
    return [token[i] for i in chosen], [index[int(tpl.parent[i])] for i in chosen]


@pytest.mark.parametrize("k", [2, 5, 8])
def test_draft_equals_a_brute_force_expansion_of_the_template(k):
    rng = random.Random(k)
    vocab = 40
    for _ in range(40):
        drafter = build(vocab, topk=k, num_draft_tokens=rng.randint(1, 7),
                        max_nodes=rng.randint(1, 90))
        for tok in range(vocab):
            if rng.random() < 0.7:  # some rows missing, some with holes or repeated ids
                row = rng.sample(range(vocab), k)
                if rng.random() < 0.3:
                    row[rng.randrange(k)] = rng.choice([-1, row[0]])
                drafter.table[tok] = row
        root = rng.randrange(vocab)
        budget, max_depth = rng.randint(0, 90), rng.randint(0, 7)
        draft = drafter.propose(ctx_of([root], budget, max_depth))
        want_tokens, want_parents = brute_force_draft(
            drafter.table, root, min(k, 8), min(drafter.depth, max_depth),
            min(drafter.max_nodes, budget))
        assert draft.tokens.tolist() == want_tokens and draft.parents.tolist() == want_parents
        draft.validate(vocab)
        pairs = list(zip(draft.parents.tolist(), draft.tokens.tolist()))
        assert len(set(pairs)) == len(pairs)  # no duplicate siblings
        assert len(draft) <= min(drafter.max_nodes, budget)
        if len(draft):
            assert int(draft.depths().max()) <= min(drafter.depth, max_depth)


def test_unknown_root_gives_an_empty_draft():
    drafter = build(96)
    assert len(drafter.propose(ctx_of([5, 6, 7]))) == 0


# ---------------------------------------------------------------- hot and cold


def first_step_drafted(model, prompt, **options) -> int:
    events = sd.stream(model, prompt, drafter=NAME, max_new_tokens=4, eos_token_id=[], **options)
    return next(iter(events)).stats.drafted


def test_hot_table_carries_over_to_the_next_request_and_cold_does_not():
    model = tiny_model("llama")
    prompt = list(range(10, 22))  # the last token is new: the prefill teaches nothing about it
    assert first_step_drafted(model, prompt, hot=True) == 0  # nothing learned yet
    assert first_step_drafted(model, prompt, hot=False) == 0
    sd.generate(model, prompt, drafter=NAME, hot=True, max_new_tokens=12, eos_token_id=[])
    table = host_of(model).get(tr.HOST_KEY, tr.RecyclingStore).table(96, 8)
    assert (table[prompt[-1]] >= 0).all()
    assert first_step_drafted(model, prompt, hot=True) > 0  # learned rows survive
    assert first_step_drafted(model, prompt, hot=False) == 0  # a cold table starts empty
    host = host_of(model)
    assert build(96, host, hot=True).table is table and build(96, host, hot=False).table is not table
    assert build(96, HostState(), hot=True).table is not table  # another host, another table


def test_prefill_seeds_the_table_before_the_first_draft():
    model = tiny_model("llama")
    prompt = PROMPTS[3]  # a repeated pattern: the last token occurred earlier in the prompt
    assert prompt[-1] in prompt[:-1]
    assert first_step_drafted(model, prompt, hot=False) > 0


def test_store_is_bounded():
    store = tr.RecyclingStore(max_tables=2)
    a = store.table(10, 2)
    store.table(11, 2)
    assert store.table(10, 2) is a  # used again: now the most recent
    store.table(12, 2)
    assert set(store.tables) == {(10, 2), (12, 2)}
    with pytest.raises(SpecDecodeError):
        tr.RecyclingStore(max_tables=0)


# ---------------------------------------------------------------- losslessness


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.e2e
def test_greedy_matches_vanilla_hot_and_cold(arch):
    model = tiny_model(arch)
    rng = random.Random(7)
    accepted = {False: 0, True: 0}
    for prompt in PROMPTS:
        max_new = rng.randint(1, 24)
        reference = vanilla(model, prompt, max_new)
        for hot in (False, True):
            out = sd.generate(model, prompt, drafter=NAME, hot=hot, max_new_tokens=max_new,
                              eos_token_id=[])
            assert out.token_ids == reference, (prompt, hot)
            assert sum(out.accept_lengths) == len(out.token_ids)
            accepted[hot] += out.stats.accepted
    assert accepted[False] > 0 and accepted[True] > 0


@pytest.mark.e2e
def test_eos_inside_an_accepted_draft():
    model = tiny_model("llama")
    inside = 0
    for prompt in PROMPTS[1:12]:
        full = vanilla(model, prompt, 30)
        for cut in range(2, 30):
            if full[cut] in full[:cut]:
                continue
            eos = full[cut]
            expected = vanilla(model, prompt, 30, eos_token_id=eos)
            assert expected == full[:cut + 1]
            events = list(sd.stream(model, prompt, drafter=NAME, max_new_tokens=30,
                                    eos_token_id=eos))
            assert [t for e in events for t in e.tokens] == expected
            assert events[-1].finish_reason == "eos"
            last = events[-1]
            inside += last.tokens.index(eos) < last.stats.accepted  # EOS was a draft token
    assert inside > 0


def test_coupled_sampling_matches_vanilla_bitwise():
    model = tiny_model("qwen2")
    for prompt in PROMPTS[:6]:
        kw = dict(temperature=1.0, sampling="coupled", seed=11, max_new_tokens=16,
                  eos_token_id=[])
        reference = sd.generate(model, prompt, drafter="none", **kw).token_ids
        assert sd.generate(model, prompt, drafter=NAME, **kw).token_ids == reference


# ---------------------------------------------------------------- edge cases


def test_edge_cases():
    model = tiny_model("gpt2")
    one = [PROMPTS[0][0]]
    assert sd.generate(model, one, drafter=NAME, max_new_tokens=20,
                       eos_token_id=[]).token_ids == vanilla(model, one, 20)
    for prompt in PROMPTS[1:6]:
        assert sd.generate(model, prompt, drafter=NAME, max_new_tokens=1,
                           eos_token_id=[]).token_ids == vanilla(model, prompt, 1)
        reference = vanilla(model, prompt, 20)
        for options in ({"max_draft_nodes": 3}, {"num_draft_tokens": 1}, {"max_nodes": 1},
                        {"topk": 1}, {"topk": 3, "num_draft_tokens": 9}):
            events = list(sd.stream(model, prompt, drafter=NAME, max_new_tokens=20,
                                    eos_token_id=[], **options))
            assert [t for e in events for t in e.tokens] == reference, options
            cap = min(options.get("max_draft_nodes", 64), options.get("max_nodes", 64))
            assert all(e.stats.drafted <= cap for e in events)


def test_runs_without_the_feedback_channel():
    model = tiny_model("llama")
    prompt = PROMPTS[5]
    drafter = build(96)
    drafter.feedback_topk = 0  # the engine then sends verdicts with feedback None
    out = sd.generate(model, prompt, drafter=drafter, max_new_tokens=10, eos_token_id=[])
    assert out.token_ids == vanilla(model, prompt, 10) and out.stats.drafted == 0


@pytest.mark.parametrize("options", [{"topk": 0}, {"max_nodes": 0}, {"num_draft_tokens": 0},
                                     {"hot": "yes"}, {"topk": 2.5}, {"max_nodes": True},
                                     {"tree_width": 2}])
def test_bad_options_raise(options):
    with pytest.raises(SpecDecodeError):
        build(96, **options)


def test_small_vocabulary_narrows_the_table():
    drafter = build(5, topk=8)
    assert drafter.table.shape == (6, 5) and drafter.feedback_topk == 5
