"""SuffixDecoding (``suffix``): the depth-limited suffix tree against brute force (counts, longest
match, removal, best-first drafts), the FIFO global store (eviction, save/load, cross-request
learning), greedy losslessness on three architectures, and edge cases."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from helpers import ARCHS, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd

import specdecode.drafters.suffix as suffix
from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.suffix_tree import ROOT, SuffixStore, SuffixTree
from specdecode.host import host_of
from specdecode.types import SamplingParams, SpecDecodeError

PROMPTS = make_prompts(20)
BUILD = BuildContext(target=None)  # a host of its own for drafters built without a model


@pytest.fixture(autouse=True)
def fresh_global_store():
    BUILD.host.clear()


def store_of(owner) -> SuffixStore:  # BUILD's, or a model's (its plain ``generate`` calls)
    return (getattr(owner, "host", None) or host_of(owner)).get(suffix.HOST_KEY, SuffixStore)


def random_sequences(rng: random.Random, count: int) -> list[list[int]]:
    """Random and repetitive (periodic, with rare noise) sequences over small vocabularies."""
    seqs = []
    for _ in range(count):
        vocab = rng.choice([2, 3, 10])
        if rng.random() < 0.5:
            pattern = [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
            seq = [t if rng.random() > 0.05 else vocab for t in (pattern * 30)[:rng.randint(1, 40)]]
        else:
            seq = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        seqs.append(seq)
    return seqs


def brute_counts(seqs: list[list[int]], depth: int) -> Counter:
    """Occurrences of every substring of length 1..depth, by explicit enumeration."""
    counts: Counter = Counter()
    for s in seqs:
        for i in range(len(s)):
            for n in range(1, min(depth, len(s) - i) + 1):
                counts[tuple(s[i:i + n])] += 1
    return counts


def build(seqs: list[list[int]], depth: int, rng: random.Random) -> SuffixTree:
    tree = SuffixTree(depth)
    for j, s in enumerate(seqs):
        i = 0
        while i < len(s):  # in random chunks, as the drafter learns them
            n = rng.randint(1, 6)
            tree.extend(j, s[i:i + n])
            i += n
    return tree


def export(tree: SuffixTree) -> dict[tuple[int, ...], tuple[int, int]]:
    """path string -> (count, ends) for every node, checking the structure on the way."""
    out, stack = {}, [(ROOT, ())]
    while stack:
        v, path = stack.pop()
        kids = tree.children[v] or {}
        if v != ROOT:
            label = tuple(tree.ref[v][tree.end[v] - tree.depth[v]:tree.end[v]])
            assert label[:len(path)] == path and len(label) == len(path) + tree.length[v]
            path = label
            assert tree.count[v] > 0 and (tree.ends[v] > 0 or len(kids) >= 2)  # compressed
            assert len(path) <= tree.max_depth
        assert tree.count[v] == tree.ends[v] + sum(tree.count[c] for c in kids.values())
        for tok, c in kids.items():
            assert tree.first_token(c) == tok and tree.parent[c] == v
            stack.append((c, path))
        out[path] = (tree.count[v], tree.ends[v])
    return out


def test_counts_equal_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        depth = rng.randint(1, 9)
        seqs = random_sequences(rng, rng.randint(1, 4))
        tree = build(seqs, depth, rng)
        expected = brute_counts(seqs, depth)
        for sub, n in expected.items():
            assert tree.count_of(list(sub)) == n
        nodes = export(tree)
        assert nodes[()][0] == sum(map(len, seqs))
        assert set(nodes) - {()} <= set(expected)  # every node is a real substring
        assert len(nodes) <= 2 * sum(map(len, seqs)) + 1
        for _ in range(20):  # absent strings count 0
            probe = tuple(rng.randrange(4) for _ in range(rng.randint(1, depth)))
            assert tree.count_of(list(probe)) == expected.get(probe, 0)


def test_longest_match_equals_brute_force():
    rng = random.Random(1)
    for _ in range(150):
        depth = rng.randint(1, 12)
        seqs = random_sequences(rng, rng.randint(1, 3))
        tree = build(seqs, depth, rng)
        substrings = set(brute_counts(seqs, depth))
        for _ in range(10):
            context = random_sequences(rng, 1)[0]
            expected = max((m for m in range(1, min(depth, len(context)) + 1)
                            if tuple(context[-m:]) in substrings), default=0)
            assert tree.longest_match(context) == expected


def test_open_sequence_suffix_nodes_are_the_context_suffixes():
    rng = random.Random(2)
    seq = random_sequences(rng, 1)[0] * 3
    tree = build([seq], 8, rng)
    for m in range(1, 8):
        node = tree.suffix_node(0, m)
        assert tree.locate(seq, len(seq) - m) == (node, tree.length[node])


def test_append_costs_at_most_depth_steps_per_token():
    tree, calls = SuffixTree(16), []
    step = tree._step
    tree._step = lambda *a: calls.append(1) or step(*a)
    tree.extend(0, [1, 2, 3] * 200)
    assert len(calls) <= 16 * 600


def test_removal_keeps_counts_of_the_survivors():
    rng = random.Random(3)
    for _ in range(100):
        depth = rng.randint(1, 8)
        seqs = random_sequences(rng, rng.randint(1, 5))
        tree = build(seqs, depth, rng)
        gone = rng.sample(range(len(seqs)), rng.randint(0, len(seqs)))
        for j in gone:
            tree.remove(j)
        survivors = [s for j, s in enumerate(seqs) if j not in gone]
        assert export(tree) == export(build(survivors, depth, rng))
        for j, s in enumerate(survivors):  # the freed nodes are reused correctly
            tree.extend(100 + j, s)
        assert export(tree) == export(build(survivors * 2, depth, rng))


def test_store_evicts_fifo_by_tokens():
    rng = random.Random(4)
    seqs = random_sequences(rng, 30)
    store = SuffixStore(cache_size=120, max_depth=6)
    for s in seqs:
        store.add(s)
        held = store.sequences()
        assert store.num_tokens == sum(map(len, held)) <= 120
        expected: list[list[int]] = []  # the newest outputs that fit, in order
        for t in reversed(seqs[:seqs.index(s) + 1]):
            if sum(map(len, expected)) + len(t) > 120:
                break
            expected.insert(0, t)
        assert held == expected
        assert export(store.tree) == export(build(held, 6, rng))
    store.add(list(range(200)))  # longer than the bound: cut to its first cache_size tokens
    assert store.sequences() == [list(range(120))]
    store.configure(cache_size=50)
    assert store.sequences() == [] and store.num_tokens == 0


def brute_draft_probs(seqs, depth, match, levels, min_prob):
    """Every continuation of ``match`` (up to ``levels`` tokens) with its estimated probability:
    count(child) / sum of the counts of the parent's continuations, multiplied along the path."""
    counts = brute_counts(seqs, depth)
    found, frontier = [], [((), 1.0)]
    for _ in range(levels):
        nxt = []
        for path, prob in frontier:
            base = tuple(match) + path
            kids = {s[-1]: c for s, c in counts.items() if len(s) == len(base) + 1 and s[:-1] == base}
            total = sum(kids.values())
            for tok, c in kids.items():
                p = prob * c / total
                if p >= min_prob:
                    nxt.append((path + (tok,), p))
        found += nxt
        frontier = nxt
    return sorted((p for _, p in found), reverse=True)


def test_best_first_draft_matches_brute_force():
    rng = random.Random(5)
    for _ in range(120):
        depth = rng.randint(3, 10)
        seqs = random_sequences(rng, rng.randint(1, 3))
        tree = build(seqs, depth, rng)
        source = rng.choice(seqs)
        i = rng.randrange(len(source))
        match = source[max(0, i + 1 - rng.randint(1, min(4, depth - 1))):i + 1]
        node, off = tree.locate(match)
        budget, levels, min_prob = rng.randint(1, 12), rng.randint(1, 5), rng.choice([0.0, 0.1, 0.3])
        tokens, parents, score = tree.expand(node, off, budget, levels, min_prob)
        expected = brute_draft_probs(seqs, depth, match, min(levels, depth - len(match)), min_prob)
        assert len(tokens) == min(budget, len(expected))
        # recompute each node's probability from brute counts: best-first, parents first
        counts, probs = brute_counts(seqs, depth), []
        for j, (tok, par) in enumerate(zip(tokens, parents)):
            assert par < j
            prefix, k = [tok], par
            while k >= 0:
                prefix.insert(0, tokens[k])
                k = parents[k]
            base = tuple(match) + tuple(prefix[:-1])
            total = sum(c for s, c in counts.items() if len(s) == len(base) + 1 and s[:-1] == base)
            probs.append((probs[par] if par >= 0 else 1.0) * counts[base + (tok,)] / total)
        assert all(a >= b - 1e-12 for a, b in zip(probs, probs[1:]))  # best first
        assert probs == pytest.approx(expected[:len(tokens)])
        assert score == pytest.approx(sum(probs))
        siblings = list(zip(parents, tokens))
        assert len(set(siblings)) == len(siblings)  # no duplicate siblings


def ctx_of(tokens, budget=64, max_depth=64):
    return DraftContext(list(tokens), 1, budget, max_depth, SamplingParams(), 0)


def test_global_store_drafts_another_requests_output():
    output = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    first = sd.drafters.make_drafter("suffix", BUILD)
    first.propose(ctx_of([1, 2, 3] + output))
    first.finish(output)
    second = sd.drafters.make_drafter("suffix", BUILD)  # a different prompt, the same output so far
    draft = second.propose(ctx_of([40, 41, 42] + output[:4]))
    assert draft.tokens.tolist() == output[4:8] and draft.parents.tolist() == [-1, 0, 1, 2]
    alone = sd.drafters.make_drafter("suffix", BUILD, use_global=False)
    assert len(alone.propose(ctx_of([40, 41, 42] + output[:4]))) == 0
    alone.finish(output)  # learns nothing
    assert store_of(BUILD).sequences() == [output]


def test_global_store_raises_acceptance_of_a_repeated_request():
    model = tiny_model("llama")
    prompt = [random.Random(6).randrange(96) for _ in range(12)]
    reference = vanilla(model, prompt, 40)
    runs = [sd.generate(model, prompt, drafter="suffix", max_new_tokens=40, eos_token_id=[],
                        use_global=g) for g in (True, True, False)]
    assert all(r.token_ids == reference for r in runs)
    assert runs[1].stats.mat > runs[0].stats.mat + 1.0  # the second run drafts from the first
    assert runs[2].stats.mat == runs[0].stats.mat  # without the store: same as a cold start
    assert len(store_of(model)) == 2  # outputs only, learned in finish


def test_save_load_round_trip_gives_identical_drafts(tmp_path):
    rng = random.Random(7)
    store = SuffixStore(cache_size=300, max_depth=16)
    for s in random_sequences(rng, 25):
        store.add(s)
    path = tmp_path / "suffix.json"
    store.save(path)
    loaded = SuffixStore(cache_size=300, max_depth=16)
    loaded.load(path)
    assert loaded.sequences() == store.sequences()
    assert export(loaded.tree) == export(store.tree)
    contexts = [random_sequences(rng, 1)[0] for _ in range(40)] + [s[:rng.randint(1, len(s))]
                                                                    for s in store.sequences()]
    for context in contexts:
        drafts = []
        for st in (store, loaded):
            drafter = suffix.build_suffix(BUILD, store=st, max_depth=16, cache_size=300)
            d = drafter.propose(ctx_of(context))
            drafts.append((d.tokens.tolist(), d.parents.tolist()))
        assert drafts[0] == drafts[1]


def test_corrupt_or_unreadable_cache_file(tmp_path):
    store = SuffixStore()
    for content in ["{not json", json.dumps({"format": "other"}), json.dumps([1, 2]),
                    json.dumps({"format": SuffixStore.FORMAT, "sequences": [[1, -2]]})]:
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(SpecDecodeError):
            store.load(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecDecodeError):
        store.load(tmp_path / "bin.json")
    with pytest.raises(SpecDecodeError):
        store.load(tmp_path / "missing.json")
    model = tiny_model("gpt2", layers=1)
    with pytest.raises(SpecDecodeError, match="suffix cache"):
        sd.generate(model, [1, 2, 3], drafter="suffix", max_new_tokens=2,
                    cache_file=str(tmp_path / "bad.json"))


def test_cache_file_option_saves_after_each_request_and_loads(tmp_path):
    model = tiny_model("gpt2", layers=1)
    path = str(tmp_path / "cache.json")
    out = sd.generate(model, PROMPTS[4], drafter="suffix", max_new_tokens=10, eos_token_id=[],
                      cache_file=path)
    assert json.loads(open(path).read())["sequences"] == [out.token_ids]
    store_of(model).clear()  # a new process: the file is loaded at the first request naming it
    sd.generate(model, PROMPTS[6], drafter="suffix", max_new_tokens=5, eos_token_id=[], cache_file=path)
    assert store_of(model).sequences()[0] == out.token_ids
    assert len(store_of(model)) == 2


def test_requests_rebound_the_shared_store():
    store_of(BUILD).add(list(range(50)))
    suffix.build_suffix(BUILD, cache_size=10)
    assert store_of(BUILD).cache_size == 10 and len(store_of(BUILD)) == 0
    store_of(BUILD).add(list(range(8)))
    suffix.build_suffix(BUILD, cache_size=10, max_depth=4)
    assert store_of(BUILD).max_depth == 4 and store_of(BUILD).sequences() == [list(range(8))]


def test_drafts_are_deterministic_and_respect_caps():
    rng = random.Random(8)
    seq = random_sequences(rng, 1)[0] * 4
    for budget, max_depth in [(1, 1), (3, 2), (64, 3), (5, 64)]:
        drafts = []
        for _ in range(2):
            d = suffix.build_suffix(BUILD, use_global=False).propose(ctx_of(seq, budget, max_depth))
            assert len(d) <= budget and (len(d) == 0 or int(d.depths().max()) <= max_depth)
            drafts.append((d.tokens.tolist(), d.parents.tolist()))
        assert drafts[0] == drafts[1] and drafts[0][0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.e2e
def test_greedy_matches_vanilla(arch):
    model = tiny_model(arch)
    rng = random.Random(9)
    accepted = 0
    for use_global in (True, False):
        store_of(model).clear()
        for prompt in PROMPTS:
            max_new = rng.randint(1, 24)
            reference = vanilla(model, prompt, max_new)
            out = sd.generate(model, prompt, drafter="suffix", max_new_tokens=max_new, eos_token_id=[],
                              use_global=use_global, max_nodes=rng.choice([4, 16]))
            assert out.token_ids == reference
            assert sum(out.accept_lengths) == len(out.token_ids)
            accepted += out.stats.accepted
    assert accepted > 0


def test_eos_inside_an_accepted_draft():
    model = tiny_model("llama")
    prompt = PROMPTS[3]
    full = vanilla(model, prompt, 30)
    inside = 0
    for cut in [i for i in range(1, 30) if full[i] not in full[:i]]:
        store_of(model).clear()
        sd.generate(model, prompt, drafter="suffix", max_new_tokens=30, eos_token_id=[])  # learn it
        expected = vanilla(model, prompt, 30, eos_token_id=full[cut])
        assert expected == full[:cut + 1]
        events = list(sd.stream(model, prompt, drafter="suffix", max_new_tokens=30,
                                eos_token_id=full[cut]))
        assert [t for e in events for t in e.tokens] == expected
        assert events[-1].finish_reason == "eos"
        last = events[-1].stats
        inside += last.accepted == last.emitted  # the EOS itself was an accepted draft node
    assert inside > 0


def test_edge_cases():
    model = tiny_model("qwen2", layers=1)
    for prompt, max_new in [([7], 12), (PROMPTS[1], 1), ([3, 4], 0)]:
        out = sd.generate(model, prompt, drafter="suffix", max_new_tokens=max_new, eos_token_id=[])
        assert out.token_ids == vanilla(model, prompt, max_new)
    prompt = PROMPTS[5]
    sd.generate(model, prompt, drafter="suffix", max_new_tokens=20, eos_token_id=[])
    events = list(sd.stream(model, prompt, drafter="suffix", max_new_tokens=20, eos_token_id=[],
                            max_draft_nodes=3))
    assert all(e.stats.drafted <= 3 for e in events) and sum(e.stats.accepted for e in events) > 0
    assert [t for e in events for t in e.tokens] == vanilla(model, prompt, 20)


@pytest.mark.parametrize("options", [
    {"num_draft_tokens": 0}, {"max_nodes": 0}, {"max_nodes": 2.5}, {"alpha": -1}, {"min_prob": 1.5},
    {"max_depth": 1}, {"cache_size": -1}, {"use_global": "yes"}, {"offset": "x"},
    {"cache_file": 3}, {"cache_file": "x.json", "use_global": False}, {"store": object()},
    {"window": 3},
])
def test_bad_options(options):
    model = tiny_model("gpt2", layers=1)
    with pytest.raises(SpecDecodeError):
        sd.generate(model, [1, 2], drafter="suffix", max_new_tokens=2, **options)


def test_coupled_sampling_matches_vanilla():
    model = tiny_model("llama")
    for i, prompt in enumerate(PROMPTS[:6]):
        kw = dict(temperature=0.8, seed=i, sampling="coupled")
        reference = vanilla(model, prompt, 20, **kw)
        for _ in range(2):  # cold, then with the global store
            out = sd.generate(model, prompt, drafter="suffix", max_new_tokens=20, eos_token_id=[], **kw)
            assert out.token_ids == reference
