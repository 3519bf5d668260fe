"""L3/L4: greedy speculative output is token-identical to the vanilla decoder (the oracle) for every
drafter, three architectures, 20 prompts, chains and trees, and to transformers' own generate."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import fixed_policy as sd
from helpers import make_prompts, matrix, vanilla
from helpers.drafters import FlakyPolicy, steep_adaptive
from helpers.matrix import NEVER_ACCEPTED, drafter_matrix

PROMPTS = make_prompts(20)
datastore = matrix.datastore  # the REST datastore fixture (of half of these prompts)


@pytest.mark.e2e
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
@pytest.mark.e2e
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


@pytest.mark.e2e
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
    from helpers import tiny_model

    target = tiny_model("llama", dtype=torch.float32)
    for prompt in PROMPTS[:8]:
        reference = vanilla(target, prompt, 20)
        out = sd.generate(target, prompt, drafter="layer-skip", num_layers=2, tree_width=2,
                          max_new_tokens=20, eos_token_id=[])
        assert out.token_ids == reference


@pytest.mark.parametrize("context", [24])
def test_generation_stops_at_the_context_length(context):
    from helpers import tiny_model

    target = tiny_model("llama", context=context)
    prompt = PROMPTS[5][:10]
    reference = vanilla(target, prompt, 100)
    assert len(prompt) + len(reference) == context
    out = sd.generate(target, prompt, drafter="oracle", continuation=reference,
                      num_draft_tokens=6, max_new_tokens=100, eos_token_id=[])
    assert out.token_ids == reference and out.finish_reason == "length"
