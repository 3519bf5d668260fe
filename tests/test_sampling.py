"""L2 and L5: sampled output follows the target's exact distribution (rejection sampling), and
coupled sampling is bit-identical to vanilla coupled sampling for the same seed."""

from __future__ import annotations

import pytest
import torch
from helpers import fixed_policy as sd
from helpers import make_prompts, tiny_model
from helpers.drafters import FlakyPolicy, eager_adaptive, eagle3_head, trained_heads
from scipy.stats import chi2

import specdecode.engine as engine
from specdecode.sampling import processed_probs
from specdecode.types import SamplingParams
from specdecode.verify import verify_rejection

pytestmark = pytest.mark.e2e  # chi-square tests of sampled distributions

VOCAB, LENGTH, SAMPLES, ALPHA = 6, 4, 2000, 1e-4
PARAMS = dict(temperature=1.0, top_k=4)
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def pair():
    return (tiny_model("llama", vocab=VOCAB, seed=3, scale=30.0),
            tiny_model("llama", vocab=VOCAB, seed=4, scale=30.0, layers=1))


@torch.no_grad()
def exact_distribution(model) -> dict[tuple[int, ...], float]:
    params = SamplingParams(**PARAMS)
    dist = {(): 1.0}
    for _ in range(LENGTH):
        prefixes = list(dist)
        ids = torch.tensor([PROMPT + list(p) for p in prefixes])
        probs = processed_probs(model(input_ids=ids).logits[:, -1], params)
        dist = {p + (t,): dist[p] * float(probs[i, t]) for i, p in enumerate(prefixes)
                for t in range(VOCAB) if probs[i, t] > 0}
    return dist


def chi_square_p(samples: list[tuple[int, ...]], exact: dict) -> float:
    """Goodness of fit; bins with expected count < 5 are merged; a sample of probability 0 fails."""
    counts: dict = {}
    for s in samples:
        assert s in exact, f"sampled a sequence of target probability 0: {s}"
        counts[s] = counts.get(s, 0) + 1
    stat, dof, merged_obs, merged_exp = 0.0, -1, 0, 0.0
    for seq, p in exact.items():
        expected = p * len(samples)
        if expected < 5:
            merged_obs, merged_exp = merged_obs + counts.get(seq, 0), merged_exp + expected
            continue
        stat += (counts.get(seq, 0) - expected) ** 2 / expected
        dof += 1
    if merged_exp > 0:
        stat += (merged_obs - merged_exp) ** 2 / merged_exp
        dof += 1
    return float(chi2.sf(stat, dof))


def sample(target, drafter, options) -> list[tuple[int, ...]]:
    runs = [sd.generate(target, PROMPT, drafter=drafter, max_new_tokens=LENGTH, seed=i,
                        eos_token_id=[], **PARAMS, **options) for i in range(SAMPLES)]
    if drafter != "none":  # the drafts were really used, so the acceptance rule was exercised
        if "policy" in options:  # it may rightly turn drafting off after the first steps
            assert sum(r.stats.drafted for r in runs) > SAMPLES
            assert sum(r.stats.accepted for r in runs) > 0
        else:
            assert sum(r.stats.accepted for r in runs) > SAMPLES // 10
    return [tuple(r.token_ids) for r in runs]


CASES = {
    "vanilla": ("none", {}),
    "draft-model-rejection": ("draft-model", {"num_draft_tokens": 2}),
    "ngram-point-mass": ("ngram", {"num_draft_tokens": 3}),
    "draft-model-tree-point-mass": ("draft-model", {"num_draft_tokens": 2, "tree_width": 2}),
    "layer-skip-auto-rejection": ("layer-skip", {"num_draft_tokens": 2}),
    "draft-model-dynamic-tree": ("draft-model", {"num_draft_tokens": 2, "tree": "dynamic",
                                                 "topk": 2, "max_nodes": 4}),
    # adaptive believing drafting is free, so that it keeps drafting (and cutting by score)
    "draft-model-dynamic-tree-adaptive": ("draft-model", {"num_draft_tokens": 3, "tree": "dynamic",
                                                          "policy": "eager"}),
    # model-free trees and chains: deterministic proposals, point-mass rule
    "suffix-tree": ("suffix", {"store": "fresh"}),
    "sam-corpus": ("sam", {"corpus_tokens": "likeliest"}),
    "token-recycling-tree": ("token-recycling", {}),
    "lookahead-tree": ("lookahead", {"num_draft_tokens": 2}),
    "rest-tree": ("rest", {}),
    "mix-tree": ("mix", {"sources": "sam+token-recycling", "max_nodes": 6}),
    # policies choose the budget (plain steps included); the rules must stay exact
    # adaptive believing drafting is free (see eager_adaptive): a sampled chain it may stop early
    "draft-model-rejection-adaptive": ("draft-model", {"num_draft_tokens": 3, "policy": "eager"}),
    "ngram-point-mass-adaptive": ("ngram", {"num_draft_tokens": 3, "policy": "eager"}),
    "draft-model-rejection-flaky": ("draft-model", {"num_draft_tokens": 3, "policy": "flaky"}),
    "ngram-point-mass-heuristic": ("ngram", {"num_draft_tokens": 3, "policy": "heuristic"}),
    "suffix-tree-flaky": ("suffix", {"store": "fresh", "policy": "flaky"}),
    # feature heads: EAGLE's sampled tree (recursive rejection), Medusa's top-k tree (point mass)
    "eagle-sampled-tree": ("eagle", {"num_draft_tokens": 2, "topk": 2, "max_nodes": 4}),
    "eagle-sampled-tree-flaky": ("eagle", {"num_draft_tokens": 3, "topk": 4, "policy": "flaky"}),
    "medusa-point-mass-tree": ("medusa", {"max_nodes": 6}),
    # EAGLE-3 (fused layer features, a draft vocabulary of 5 of the 6 tokens): its draft
    # distribution, zero outside that vocabulary, in the chain's and the tree's rejection rules
    "eagle3-sampled-chain": ("eagle3", {"num_draft_tokens": 3}),
    "eagle3-sampled-tree": ("eagle3", {"num_draft_tokens": 2, "topk": 2, "max_nodes": 4}),
}


@pytest.fixture(scope="module")
def corpus(pair, tmp_path_factory) -> tuple[list[list[int]], str]:
    """The prompt followed by each of the 12 likeliest continuations, and a REST datastore of it
    (retrieval drafters then propose likely tokens, so the acceptance rule really runs)."""
    from specdecode.datastore import build_datastore_from_token_docs

    exact = exact_distribution(pair[0])
    docs = [PROMPT + list(s) for s in sorted(exact, key=exact.get, reverse=True)[:12]]
    path = tmp_path_factory.mktemp("ds")
    build_datastore_from_token_docs(docs, path, VOCAB, VOCAB)
    return docs, str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejection_sampling_matches_target_distribution(pair, corpus, case):
    from specdecode.drafters.suffix_tree import SuffixStore

    target, draft = pair
    drafter, options = CASES[case]
    if drafter == "draft-model":
        options = dict(options, draft_model=draft)
    if drafter == "rest":
        options = dict(options, datastore=corpus[1])
    if options.get("corpus_tokens") == "likeliest":
        options = dict(options, corpus_tokens=[t for doc in corpus[0] for t in doc])
    if options.get("policy") in ("flaky", "eager"):  # one object, shared by the samples
        options = dict(options, policy=FlakyPolicy(0) if options["policy"] == "flaky"
                       else eager_adaptive())
    if drafter in ("eagle", "medusa"):
        options = dict(options, head=trained_heads(target)[drafter == "medusa"])
    if drafter == "eagle3":
        drafter, options = "eagle", dict(options, head=eagle3_head(target, vocab=[0, 1, 2, 3, 5]))
    if options.get("store") == "fresh":  # learns across the samples, from this test only
        options = dict(options, store=SuffixStore())
    samples = sample(target, drafter, options)
    assert chi_square_p(samples, exact_distribution(target)) > ALPHA


def test_negative_control_accept_always_fails(pair, monkeypatch):
    target, draft = pair

    class Yes:
        def __init__(self, rng):
            self.rng = rng

        def bernoulli(self, p):
            return True

        def categorical(self, probs):
            return self.rng.categorical(probs)

    def broken(d, logits, params, rng, seed, base_position):
        return verify_rejection(d, processed_probs(logits, params), Yes(rng))

    monkeypatch.setattr(engine, "verify", broken)
    samples = sample(target, "draft-model", {"draft_model": draft, "num_draft_tokens": 2})
    exact = exact_distribution(target)
    try:
        p = chi_square_p(samples, exact)
    except AssertionError:
        return  # it even produced a sequence of probability 0: failed, as it must
    assert p < ALPHA


def test_negative_control_eagle3_reporting_another_distribution_fails(pair, monkeypatch):
    """The EAGLE-3 head's draft tokens drawn from one distribution, verified against another
    (its rows sharpened, q^2 renormalised): the sampled output is no longer the target's."""
    import dataclasses

    from specdecode.drafters.eagle import EagleDrafter

    target, _ = pair
    propose = EagleDrafter.propose

    def misreported(self, ctx):
        draft = propose(self, ctx)
        if draft.draft_probs is None:
            return draft
        sharp = draft.draft_probs ** 2
        return dataclasses.replace(draft, draft_probs=sharp / sharp.sum(-1, keepdim=True))

    monkeypatch.setattr(EagleDrafter, "propose", misreported)
    samples = sample(target, "eagle", {"num_draft_tokens": 3,
                                       "head": eagle3_head(target, vocab=[0, 1, 2, 3, 5])})
    try:
        p = chi_square_p(samples, exact_distribution(target))
    except AssertionError:
        return  # a sequence of probability 0: failed, as it must
    assert p < ALPHA


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)])
def test_coupled_sampling_is_bit_identical_to_vanilla(settings):
    target = tiny_model("qwen2", seed=5)
    other = tiny_model("qwen2", seed=6, layers=1)
    eagle, medusa = trained_heads(target)
    for seed, prompt in enumerate(make_prompts(6)):
        common = dict(max_new_tokens=20, seed=seed, sampling="coupled", eos_token_id=[], **settings)
        reference = sd.generate(target, prompt, drafter="none", **common).token_ids
        runs = {
            "ngram": sd.generate(target, prompt, drafter="ngram", **common),
            "draft-model": sd.generate(target, prompt, drafter="draft-model", draft_model=other,
                                       **common),
            "self-draft-tree": sd.generate(target, prompt, drafter="draft-model",
                                           draft_model=target, tree_width=2, **common),
            "layer-skip": sd.generate(target, prompt, drafter="layer-skip", num_layers=2, **common),
            "oracle": sd.generate(target, prompt, drafter="oracle", continuation=reference,
                                  **common),
            "eagle": sd.generate(target, prompt, drafter="eagle", head=eagle, **common),
            "medusa": sd.generate(target, prompt, drafter="medusa", head=medusa, **common),
        }
        for name, out in runs.items():
            assert out.token_ids == reference, name
        assert runs["oracle"].stats.mat > 2.0  # the oracle really was accepted
        assert runs["self-draft-tree"].stats.mat > 2.0  # same model, same keyed noise


def test_coupled_differs_across_seeds_and_matches_across_runs():
    target = tiny_model("llama", seed=5, scale=1.0)
    prompt = make_prompts(3)[2]
    a = sd.generate(target, prompt, drafter="none", max_new_tokens=30, seed=1, temperature=1.0,
                    sampling="coupled", eos_token_id=[]).token_ids
    b = sd.generate(target, prompt, drafter="none", max_new_tokens=30, seed=1, temperature=1.0,
                    sampling="coupled", eos_token_id=[]).token_ids
    c = sd.generate(target, prompt, drafter="none", max_new_tokens=30, seed=2, temperature=1.0,
                    sampling="coupled", eos_token_id=[]).token_ids
    assert a == b and a != c


# The other exact rules for sampled drafts (verify/block.py, traversal.py, spectr.py), each on the
# drafts it is made for; rows run batched through the scheduler (each row is its batch-1 run, see
# test_new_rules_batch_rows_equal_batch_1).
RULE_CASES = {
    "block-chain": ("block", {"num_draft_tokens": 3}),
    # delayed tree expansion: a chain, then 3 branches at depth 2 drawn without replacement
    "traversal-delayed-tree-without-replacement": ("traversal", {
        "num_draft_tokens": 3, "num_drafts": 3, "branch_depth": 2, "replacement": False}),
    "spectr-dynamic-tree": ("spectr", {"num_draft_tokens": 2, "tree": "dynamic", "topk": 3,
                                       "max_nodes": 5}),
    "traversal-dynamic-tree": ("traversal", {"num_draft_tokens": 2, "tree": "dynamic", "topk": 3,
                                             "max_nodes": 5}),
}


def sample_batched(target, options: dict, seeds, batch_size: int = 64) -> list[sd.GenerationResult]:
    scheduler = sd.Scheduler(target, max_batch_size=batch_size)
    ids = [scheduler.add_request(PROMPT, max_new_tokens=LENGTH, seed=i, eos_token_id=[], **PARAMS,
                                 **options) for i in seeds]
    while scheduler.has_unfinished():
        scheduler.step()
    return [scheduler.release(rid) for rid in ids]


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_new_rules_match_target_distribution(pair, case):
    target, draft = pair
    mode, options = RULE_CASES[case]
    runs = sample_batched(target, dict(options, drafter="draft-model", draft_model=draft,
                                       sampling=mode), range(SAMPLES))
    assert sum(stats.accepted for _, stats, _ in runs) > SAMPLES // 10  # the rule really ran
    assert chi_square_p([tuple(tokens) for tokens, _, _ in runs], exact_distribution(target)) > ALPHA


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_new_rules_batch_rows_equal_batch_1(pair, case):
    target, draft = pair
    mode, options = RULE_CASES[case]
    options = dict(options, drafter="draft-model", draft_model=draft, sampling=mode)
    seeds = range(100, 124)
    batched = sample_batched(target, options, seeds, batch_size=8)
    for seed, (tokens, _, _) in zip(seeds, batched):
        alone = sd.generate(target, PROMPT, max_new_tokens=LENGTH, seed=seed, eos_token_id=[],
                            **PARAMS, **options)
        assert tokens == alone.token_ids, seed
