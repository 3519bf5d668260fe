"""L3/L4: greedy speculative output is token-identical to the vanilla decoder (the oracle) for every
drafter, three architectures, 20 prompts, chains and trees, and to transformers' own generate."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_prompts, vanilla
from drafters_for_tests import (
    AntiOracle,
    Exploding,
    FlakyPolicy,
    OraclePrefixTree,
    steep_adaptive,
    trained_heads,
)

import specdecode as sd
from specdecode.datastore import build_datastore_from_token_docs

PROMPTS = make_prompts(20)


@pytest.fixture(scope="module")
def datastore(models, tmp_path_factory) -> str:
    """A REST datastore holding the target's own continuations of half the prompts (so drafts get
    accepted) and random documents (so they get rejected too)."""
    target, _ = models
    rng = random.Random(5)
    docs = [p + vanilla(target, p, 30) for p in PROMPTS[::2]]
    docs += [[rng.randrange(95) for _ in range(40)] for _ in range(10)]
    path = tmp_path_factory.mktemp("datastore")
    build_datastore_from_token_docs(docs, path, 96, 95)
    return str(path)


def drafter_matrix(target, other, reference, seed, datastore=None):
    """(label, drafter, options) for every registered drafter plus the test-only patterns."""
    eagle, medusa = trained_heads(target)
    return [
        ("ngram", "ngram", {"num_draft_tokens": 4}),
        ("ngram-unigram-k8", "ngram", {"num_draft_tokens": 8, "min_n": 1, "max_n": 1}),
        ("draft-model", "draft-model", {"draft_model": other, "num_draft_tokens": 3}),
        ("draft-model-self-tree", "draft-model",
         {"draft_model": target, "num_draft_tokens": 4, "tree_width": 3}),
        ("draft-model-self-dynamic", "draft-model",
         {"draft_model": target, "tree": "dynamic", "num_draft_tokens": 4, "max_nodes": 8}),
        ("draft-model-dynamic", "draft-model",
         {"draft_model": other, "tree": "dynamic", "topk": 2, "max_nodes": 5}),
        ("layer-skip", "layer-skip", {"num_layers": 1, "num_draft_tokens": 3}),
        ("layer-skip-auto", "layer-skip", {"num_draft_tokens": 3}),
        ("layer-skip-dynamic", "layer-skip", {"num_layers": 2, "tree": "dynamic", "topk": 3}),
        ("layer-skip-tree", "layer-skip", {"num_layers": 2, "num_draft_tokens": 3,
                                           "tree_width": 2}),
        ("suffix", "suffix", {"max_nodes": 8}),
        ("suffix-request-only", "suffix", {"use_global": False, "num_draft_tokens": 4}),
        ("sam", "sam", {}),
        ("token-recycling", "token-recycling", {}),
        ("token-recycling-hot-small", "token-recycling", {"hot": True, "max_nodes": 6}),
        ("lookahead", "lookahead", {}),
        ("rest", "rest", {"datastore": datastore}),
        ("mix", "mix", {}),
        ("mix-sam+rest+recycling", "mix", {"sources": "sam+rest+token-recycling",
                                           "datastore": datastore, "max_nodes": 12}),
        ("mix-ngram+self-draft", "mix", {"sources": "ngram+draft-model", "draft_model": target,
                                         "max_nodes": 8, "num_draft_tokens": 3}),
        ("oracle", "oracle", {"continuation": reference, "num_draft_tokens": 5}),
        ("grammar", "grammar", {}),  # without a constraint: empty drafts (tests/test_structured*)
        ("eagle", "eagle", {"head": eagle}),
        ("eagle-dynamic-tree", "eagle", {"head": eagle, "topk": 4, "max_nodes": 16}),
        ("eagle-deep-narrow", "eagle", {"head": eagle, "num_draft_tokens": 8, "topk": 2,
                                        "max_nodes": 10}),
        ("medusa", "medusa", {"head": medusa}),
        ("mix-ngram+eagle", "mix", {"sources": "ngram+eagle", "head": eagle}),
        ("none", "none", {}),
        ("oracle-prefix-tree", OraclePrefixTree(reference, 96, seed), {}),
        ("anti-oracle", AntiOracle(reference, 96), {}),
        ("exploding", Exploding(), {}),
    ]


def test_greedy_matches_vanilla_for_every_drafter(models, datastore):
    """Every drafter, 20 prompts; on every third prompt an EOS token that first appears mid-output
    (so it falls inside accepted drafts of the drafters that draft well)."""
    target, other = models
    rng = random.Random(1)
    failures = []
    accepted: dict[str, int] = {}
    for i, prompt in enumerate(PROMPTS):
        max_new = rng.randint(1, 24)
        reference = vanilla(target, prompt, max_new)
        assert len(reference) == max_new
        eos: list[int] = []
        if i % 3 == 0:
            fresh = [j for j in range(2, max_new) if reference[j] not in reference[:j]]
            if fresh:
                eos = [reference[fresh[-1]]]
                reference = reference[:fresh[-1] + 1]
                assert vanilla(target, prompt, max_new, eos_token_id=eos) == reference
        for label, drafter, options in drafter_matrix(target, other, reference, i, datastore):
            out = sd.generate(target, prompt, drafter=drafter, max_new_tokens=max_new,
                              eos_token_id=eos, **options)
            if out.token_ids != reference:
                failures.append((label, i))
            assert sum(out.accept_lengths) == len(out.token_ids)
            accepted[label] = accepted.get(label, 0) + out.stats.accepted
    assert not failures, f"outputs differ from vanilla: {failures}"
    idle = [label for label, n in accepted.items() if n == 0 and label not in NEVER_ACCEPTED]
    assert not idle, f"drafters never accepted a token, so the test proves nothing for them: {idle}"


POLICIES = {"heuristic": lambda i: "heuristic", "adaptive": lambda i: "adaptive",
            "adaptive-steep": lambda i: steep_adaptive(), "flaky": FlakyPolicy}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_greedy_matches_vanilla_under_every_policy(models, datastore, policy):
    """The matrix again (6 prompts) with each policy deciding the budget, plain steps included:
    a drafter that is skipped must catch up, a cut budget must stay lossless."""
    target, other = models
    rng = random.Random(2)
    failures, accepted, plain = [], {}, 0
    for i, prompt in enumerate(PROMPTS[:6]):
        max_new = rng.randint(8, 24)
        reference = vanilla(target, prompt, max_new)
        for label, drafter, options in drafter_matrix(target, other, reference, i, datastore):
            chosen = POLICIES[policy](i)
            out = sd.generate(target, prompt, drafter=drafter, max_new_tokens=max_new,
                              eos_token_id=[], policy=chosen, **options)
            if out.token_ids != reference:
                failures.append((label, i))
            accepted[label] = accepted.get(label, 0) + out.stats.accepted
            plain += out.stats.plain_steps
    assert not failures, f"outputs differ from vanilla under {policy}: {failures}"
    if policy.startswith("adaptive"):  # it may rightly turn a drafter off for good on these models
        assert sum(accepted.values()) > 0, "adaptive never let any draft through"
    else:
        idle = [label for label, n in accepted.items() if n == 0 and label not in NEVER_ACCEPTED]
        assert not idle, f"drafters never accepted a token under {policy}: {idle}"
    if policy in ("flaky", "adaptive-steep"):
        assert plain > 0, "the policy never chose a plain step, so skipping went untested"


# never accept by design; the unrelated random draft model may never agree with the target (its
# acceptance paths are covered by draft-model-self-tree, which drafts with the target itself)
NEVER_ACCEPTED = {"none", "anti-oracle", "exploding", "draft-model", "draft-model-dynamic",
                  "grammar"}


def test_registered_drafters_are_all_covered():
    covered = {d for _, d, _ in drafter_matrix(None, None, [], 0) if isinstance(d, str)}
    assert set(sd.available()) == covered, "a new drafter needs a row in drafter_matrix"


def test_eos_and_max_new_tokens_inside_an_accepted_draft(models):
    target, _ = models
    prompt = PROMPTS[3]
    full = vanilla(target, prompt, 30)
    # EOS = a token first seen in the middle of an 8-token oracle draft
    cut = next(i for i in range(3, 30) if full[i] not in full[:i])
    eos = full[cut]
    expected = vanilla(target, prompt, 30, eos_token_id=eos)
    assert expected == full[:cut + 1]
    out = sd.generate(target, prompt, drafter="oracle", continuation=full, num_draft_tokens=8,
                      max_new_tokens=30, eos_token_id=eos)
    assert out.token_ids == expected and out.finish_reason == "eos"
    # max_new_tokens in the middle of a fully accepted draft
    for max_new in (1, 2, 5, 7):
        out = sd.generate(target, prompt, drafter="oracle", continuation=full,
                          num_draft_tokens=8, max_new_tokens=max_new, eos_token_id=[])
        assert out.token_ids == full[:max_new] and out.finish_reason == "length"
    assert sd.generate(target, prompt, max_new_tokens=0).token_ids == []


def test_matches_transformers_generate(models):
    target, other = models
    for prompt in PROMPTS[:6]:
        ids = torch.tensor([prompt])
        ref = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=16, pad_token_id=0)[0, len(prompt):].tolist()
        assert vanilla(target, prompt, 16) == ref
        out = sd.generate(target, prompt, drafter="draft-model", draft_model=other,
                          max_new_tokens=16, eos_token_id=[], tree_width=2)
        assert out.token_ids == ref


def test_float32_model_matches_vanilla():
    from conftest import tiny_model

    target = tiny_model("llama", dtype=torch.float32)
    for prompt in PROMPTS[:8]:
        reference = vanilla(target, prompt, 20)
        out = sd.generate(target, prompt, drafter="layer-skip", num_layers=2, tree_width=2,
                          max_new_tokens=20, eos_token_id=[])
        assert out.token_ids == reference


@pytest.mark.parametrize("context", [24])
def test_generation_stops_at_the_context_length(context):
    from conftest import tiny_model

    target = tiny_model("llama", context=context)
    prompt = PROMPTS[5][:10]
    reference = vanilla(target, prompt, 100)
    assert len(prompt) + len(reference) == context
    out = sd.generate(target, prompt, drafter="oracle", continuation=reference,
                      num_draft_tokens=6, max_new_tokens=100, eos_token_id=[])
    assert out.token_ids == reference and out.finish_reason == "length"
