"""Lookahead decoding drafter: the n-gram pool and the trie against brute-force models, the Jacobi
guess update (by hand and from a real generation's feedback), greedy losslessness, edge cases."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import ARCHS, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd

import specdecode.drafters.lookahead as la
from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.types import SamplingParams, SpecDecodeError, TargetFeedback, Verdict

PROMPTS = make_prompts(20)


def token_streams(seed: int) -> list[list[int]]:
    """Random and repetitive token sequences over small vocabularies (many key collisions)."""
    rng = random.Random(seed)
    streams = [[rng.randrange(6) for _ in range(300)], [rng.randrange(40) for _ in range(300)]]
    pattern = [rng.randrange(12) for _ in range(5)]
    streams.append([t if rng.random() < 0.9 else rng.randrange(12) for t in pattern * 60])
    return streams


def ngram_events(seq: list[int], n: int, rng: random.Random) -> list[tuple[int, ...]]:
    return [tuple(seq[i:i + rng.randint(2, n)]) for i in range(len(seq) - n)]


# ---------------------------------------------------------------- pool vs brute force
class BrutePool:
    """The pool's specification by explicit enumeration over the full insertion log: a key's entries
    are its distinct continuations inserted since the key last (re)appeared, newest first, the first
    ``per_key``; while the total exceeds ``cap``, the key updated longest ago is forgotten."""

    def __init__(self, per_key: int, cap: int) -> None:
        self.per_key, self.cap = per_key, cap
        self.log: list[tuple[int, tuple[int, ...]]] = []
        self.since: dict[int, int] = {}  # present key -> time of its (re)appearance

    def entries(self, key: int) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for t in range(len(self.log) - 1, self.since[key] - 1, -1):
            k, cont = self.log[t]
            if k == key and cont not in out:
                out.append(cont)
        return out[:self.per_key]

    def add(self, ngram: tuple[int, ...]) -> None:
        self.since.setdefault(ngram[0], len(self.log))
        self.log.append((ngram[0], ngram[1:]))
        while sum(len(self.entries(k)) for k in self.since) > self.cap and len(self.since) > 1:
            last = {k: max(t for t, (kk, _) in enumerate(self.log) if kk == k) for k in self.since}
            del self.since[min(last, key=last.get)]


@pytest.mark.parametrize("per_key,cap", [(1, 10**9), (3, 10**9), (5, 10**9), (3, 12), (4, 7)])
def test_pool_matches_brute_force(per_key, cap):
    for seed, seq in enumerate(token_streams(per_key * 100 + cap % 97)):
        rng = random.Random(seed)
        pool, brute = la.NgramPool(per_key, cap), BrutePool(per_key, cap)
        for step, gram in enumerate(ngram_events(seq, 5, rng)[:150 if cap < 100 else 300]):
            pool.add(gram)
            brute.add(gram)
            if step % 7 and cap > 100:
                continue
            assert list(pool.table) == sorted(brute.since, key=lambda k: max(
                t for t, (kk, _) in enumerate(brute.log) if kk == k))  # LRU order of keys
            for key in brute.since:
                assert pool.get(key) == brute.entries(key)
            assert len(pool) == sum(len(v) for v in pool.table.values()) <= max(cap, per_key)
        assert pool.get(-1) == []


def test_pool_zero_per_key_holds_nothing():
    pool = la.NgramPool(0, 10)
    pool.add((1, 2, 3))
    pool.add((4,))
    assert len(pool) == 0 and pool.get(1) == []


# ---------------------------------------------------------------- trie
def root_paths(tokens: list[int], parents: list[int]) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for tok, par in zip(tokens, parents):
        assert par < len(paths)  # parents precede children
        paths.append((paths[par] if par >= 0 else ()) + (tok,))
    return paths


def test_trie_merge_brute_force():
    rng = random.Random(5)
    for _ in range(300):
        vocab = rng.choice([2, 3, 8])
        branches = [[rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
                    for _ in range(rng.randint(0, 7))]
        chain = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
        budget = rng.choice([1, 3, 6, 10, 100])
        trie, chain_nodes = la.build_tree(branches, chain, budget)
        tokens, parents = trie.tokens, trie.parents
        paths = root_paths(tokens, parents)
        assert len(set(zip(parents, tokens))) == len(tokens)  # no duplicate siblings
        assert len(set(paths)) == len(paths) and len(tokens) <= budget
        prefixes = {tuple(b[:i]) for b in branches + [chain] for i in range(1, len(b) + 1)}
        assert set(paths) <= prefixes
        if len(prefixes) <= budget:
            assert set(paths) == prefixes  # every branch is a root path
        if len(chain) <= budget:  # room for the chain is always kept
            assert [paths[n] for n in chain_nodes] == [tuple(chain[:i + 1]) for i in range(len(chain))]
        # nodes come branch by branch, pool branches in order, then the chain: the first branch
        # holding each node's path never decreases along the node order
        owners = [min(j for j, b in enumerate(branches + [chain]) if tuple(b[:len(p)]) == p)
                  for p in paths]
        assert owners == sorted(owners)
        draft = trie.draft()
        draft.validate(vocab)
        assert draft.tokens.tolist() == tokens


# ---------------------------------------------------------------- the drafter by hand
def ctx_for(tokens: list[int], num_prompt: int, budget: int = 64, max_depth: int = 64) -> DraftContext:
    return DraftContext(tokens, num_prompt, budget, max_depth, SamplingParams(), 0)


def paths_of(draft) -> list[tuple[int, ...]]:
    return root_paths(draft.tokens.tolist(), draft.parents.tolist())


def test_draft_holds_every_pool_ngram_of_the_last_token_and_the_chain():
    drafter = la.LookaheadDrafter(num_draft_tokens=4, window=4, max_ngrams=4, max_nodes=64)
    tokens = [1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 1, 7, 7, 7, 8, 1]
    draft = drafter.propose(ctx_for(tokens, len(tokens)))
    paths = set(paths_of(draft))
    conts = drafter.pool.get(1)
    # n-grams of the text starting with 1, newest first: (1,7,7,7,8), (1,2,3,9,9), (1,2,3,4,5)
    assert conts == [(7, 7, 7, 8), (2, 3, 9, 9), (2, 3, 4, 5)]
    for cont in conts:
        assert cont in paths
    assert tuple(drafter.guess) in paths
    assert [paths_of(draft)[n] for n in drafter.chain_nodes] == [
        tuple(drafter.guess[:i + 1]) for i in range(4)]
    # pool branches come first: the newest n-gram occupies the first nodes
    assert draft.tokens[:4].tolist() == [7, 7, 7, 8]
    # caps: budget and depth
    small = drafter.propose(ctx_for(tokens, len(tokens), budget=5, max_depth=2))
    assert len(small) <= 5 and int(small.depths().max()) <= 2
    assert len(drafter.chain_nodes) == 2  # the chain takes at most half the budget, depth-capped


def feedback_for(draft, rows: list[int]) -> TargetFeedback:
    return TargetFeedback([0] + draft.tokens.tolist(), torch.tensor(rows).reshape(-1, 1))


def test_guess_update_by_hand():
    """The new guesses are the target's top-1 along the guess chain, shifted by what was committed;
    guesses that were not drafted survive; trajectories of N tokens enter the pool."""
    for accepted in (0, 2):
        drafter = la.LookaheadDrafter(num_draft_tokens=3, window=3, max_ngrams=3, max_nodes=64)
        tokens = [10, 11]
        draft = drafter.propose(ctx_for(tokens, 2))
        chain = list(drafter.guess)
        assert len(draft) == 3 and set(chain) <= {10, 11}  # initial guesses: prompt tokens
        rows = [50, 51, 52, 53]  # root, then after g1, g1 g2, g1 g2 g3
        path = list(drafter.chain_nodes[:accepted])
        verdict = Verdict(path, chain[:accepted] + [rows[accepted]], len(draft), feedback_for(draft, rows))
        drafter.observe(verdict)
        assert drafter.start == 2 + accepted + 1
        assert drafter.guess == rows[accepted + 1:]  # offsets accepted+1..3, refined
        assert drafter.traj == [(chain[i - 1], rows[i]) for i in range(accepted + 1, 4)]

    # three steps with nothing accepted: the trajectories reach N = 4 tokens and enter the pool
    drafter = la.LookaheadDrafter(num_draft_tokens=3, window=3, max_ngrams=3, max_nodes=64)
    tokens = [10, 11]
    history = []
    for step in range(3):
        draft = drafter.propose(ctx_for(tokens, 2))
        assert [paths_of(draft)[n][-1] for n in drafter.chain_nodes] == drafter.guess
        history.append(list(drafter.guess))
        rows = [60 + step] + [20 * (step + 1) + i for i in range(1, 4)]
        drafter.observe(Verdict([], [rows[0]], len(draft), feedback_for(draft, rows)))
        tokens = tokens + [rows[0]]
    a, b, c = history[0]
    assert history[1] == [21, 22, 23] and history[2] == [41, 42, 43]
    for key, gram in ((a, (21, 41, 61)), (b, (22, 42, 62)), (c, (23, 43, 63))):
        assert gram in drafter.pool.get(key)


class Recording(la.LookaheadDrafter):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.log: list[tuple] = []

    def observe(self, verdict: Verdict) -> None:
        before = (self.start, list(self.guess), list(self.chain_nodes))
        super().observe(verdict)
        self.log.append((before, verdict, list(self.guess)))


def test_guess_update_follows_the_recorded_feedback():
    model = tiny_model("llama")
    checked = 0
    for prompt in PROMPTS[1:9]:
        drafter = Recording(num_draft_tokens=4, max_nodes=16)
        out = sd.generate(model, prompt, drafter=drafter, max_new_tokens=20, eos_token_id=[])
        assert out.token_ids == vanilla(model, prompt, 20)
        for (_, guess, nodes), verdict, after in drafter.log:
            top1 = verdict.feedback.topk_ids[:, 0].tolist()
            refined = {i + 1: top1[n + 1] for i, n in enumerate(nodes)}  # offset -> new guess
            iterate = {**dict(enumerate(guess)), **refined}
            committed = verdict.num_accepted + 1
            assert after == [iterate[q] for q in range(committed, max(iterate) + 1)]
            checked += bool(nodes)
    assert checked > 20


# ---------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_greedy_matches_vanilla_three_archs():
    for arch in ARCHS:
        model = tiny_model(arch)
        rng = random.Random(7)
        accepted = 0
        for i, prompt in enumerate(PROMPTS):
            max_new = rng.randint(1, 24)
            reference = vanilla(model, prompt, max_new)
            opts = [{}, {"max_ngrams": 2, "max_nodes": 6}, {"num_draft_tokens": 6, "window": 3},
                    {"max_ngrams": 0}][i % 4]
            out = sd.generate(model, prompt, drafter="lookahead", max_new_tokens=max_new,
                              eos_token_id=[], **opts)
            assert out.token_ids == reference, (arch, i, opts)
            assert sum(out.accept_lengths) == len(out.token_ids)
            accepted += out.stats.accepted
        assert accepted > 0, arch


def test_eos_inside_an_accepted_draft():
    model = tiny_model("qwen2")
    hits = 0
    for prompt in PROMPTS[1::2]:
        full = vanilla(model, prompt, 30)
        drafter = Recording()
        sd.generate(model, prompt, drafter=drafter, max_new_tokens=30, eos_token_id=[])
        # an EOS = a token first emitted inside a step that accepted draft tokens
        pos = 0
        for _, verdict, _ in drafter.log:
            step_tokens = verdict.tokens
            for j, tok in enumerate(step_tokens[:-1]):
                if pos + j < len(full) and tok not in full[:pos + j]:
                    expected = vanilla(model, prompt, 30, eos_token_id=tok)
                    assert expected == full[:pos + j + 1]
                    out = sd.generate(model, prompt, drafter="lookahead", max_new_tokens=30,
                                      eos_token_id=tok)
                    assert out.token_ids == expected and out.finish_reason == "eos"
                    hits += 1
                    break
            pos += len(step_tokens)
    assert hits > 0


def test_mat_above_one_on_repetitive_prompts():
    model = tiny_model("llama")
    emitted = steps = jacobi_accepted = 0
    for prompt in PROMPTS[1::2]:
        out = sd.generate(model, prompt, drafter="lookahead", max_new_tokens=24, eos_token_id=[])
        emitted, steps = emitted + out.stats.emitted, steps + out.stats.steps
        plain = sd.generate(model, prompt, drafter="lookahead", max_new_tokens=24, eos_token_id=[],
                            max_ngrams=0)
        jacobi_accepted += plain.stats.accepted
    assert emitted / steps > 1.5
    assert jacobi_accepted > 0  # the guess chain alone (plain Jacobi decoding) gets accepted too


def test_coupled_sampling_is_bitwise_vanilla():
    model = tiny_model("gpt2")
    for prompt in PROMPTS[2:6]:
        kw = dict(max_new_tokens=16, eos_token_id=[], temperature=0.8, seed=3, sampling="coupled")
        ref = sd.generate(model, prompt, drafter="none", **kw).token_ids
        assert sd.generate(model, prompt, drafter="lookahead", **kw).token_ids == ref


def test_deterministic_drafts():
    model = tiny_model("llama")
    runs = []
    for _ in range(2):
        drafter = Recording()
        sd.generate(model, PROMPTS[4], drafter=drafter, max_new_tokens=20, eos_token_id=[])
        runs.append([(v.path, v.tokens, v.feedback.row_tokens) for _, v, _ in drafter.log])
    assert runs[0] == runs[1]


def test_edge_cases():
    model = tiny_model("llama")
    one = PROMPTS[0]
    assert len(one) == 1
    assert sd.generate(model, one, drafter="lookahead", max_new_tokens=12,
                       eos_token_id=[]).token_ids == vanilla(model, one, 12)
    for prompt in PROMPTS[1:6]:
        assert sd.generate(model, prompt, drafter="lookahead", max_new_tokens=1,
                           eos_token_id=[]).token_ids == vanilla(model, prompt, 1)
        for nodes in (0, 1, 3):
            out = sd.generate(model, prompt, drafter="lookahead", max_new_tokens=15, eos_token_id=[],
                              max_draft_nodes=nodes)
            assert out.token_ids == vanilla(model, prompt, 15)
            assert out.stats.drafted <= nodes * out.stats.steps and out.stats.fallbacks == 0


@pytest.mark.parametrize("options", [
    {"num_draft_tokens": 0}, {"window": 0}, {"window": 9}, {"max_ngrams": -1}, {"max_nodes": 0},
    {"pool_size": 2, "max_ngrams": 5}, {"num_draft_tokens": "4"}, {"bogus": 1}])
def test_bad_options(options):
    with pytest.raises(SpecDecodeError):
        sd.generate(tiny_model("llama"), [1, 2, 3], drafter="lookahead", max_new_tokens=2, **options)


def test_factory_defaults():
    drafter = la.build_lookahead(BuildContext(target=None), num_draft_tokens=6)
    assert drafter.window == 6 and drafter.n == 7 and drafter.feedback_topk == 1
