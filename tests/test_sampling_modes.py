"""Choosing the sampling rule: SamplingParams.mode, verify()'s dispatch and fallbacks, and the
"sampling" choice through generate, the CLI, the benchmark's method strings and the server."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import fixed_policy as sd
from helpers import make_prompts, tiny_model

from specdecode.bench.methods import Settings, check_specs, method_options
from specdecode.cli import main
from specdecode.sampling import TorchRandom, processed_probs
from specdecode.server.protocol import CompletionRequest, speculation
from specdecode.types import Draft, SamplingParams, SpecDecodeError
from specdecode.verify import (
    RULES,
    SAMPLING_MODES,
    verify,
    verify_block,
    verify_rejection,
    verify_spectr,
    verify_traversal,
)

SAMPLED = {"rejection": verify_rejection, "block": verify_block, "traversal": verify_traversal,
           "spectr": verify_spectr}


def test_unknown_mode_lists_the_choices():
    with pytest.raises(SpecDecodeError) as err:
        SamplingParams(temperature=1.0, mode="nucleus")
    assert all(mode in str(err.value) for mode in SAMPLING_MODES)
    assert SAMPLING_MODES == tuple(RULES)  # derived from the rule table, in its order


def random_case(n: int, vocab: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n + 1, vocab, generator=gen, dtype=torch.float64)
    draft_probs = torch.softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)
    tokens = torch.multinomial(draft_probs, 1, generator=gen).squeeze(1)
    return logits, tokens, draft_probs


@pytest.mark.parametrize("mode", sorted(SAMPLED))
def test_verify_dispatches_on_the_mode(mode):
    params = SamplingParams(temperature=0.9, top_k=5, mode=mode)
    for seed in range(10):
        logits, tokens, draft_probs = random_case(3, seed=seed)
        draft = Draft.chain(tokens, draft_probs)
        got = verify(draft, logits, params, TorchRandom(seed), seed, 0)
        assert got == SAMPLED[mode](draft, processed_probs(logits, params), TorchRandom(seed))


def test_fallbacks_to_the_nearest_exact_rule():
    params = SamplingParams(temperature=1.0)
    for seed in range(10):
        logits, tokens, draft_probs = random_case(4, seed=seed)
        probs = processed_probs(logits, params)
        tree = Draft(tokens, torch.tensor([-1, -1, 0, 1]), draft_probs)
        point_mass = Draft(tokens, torch.tensor([-1, -1, 0, 1]))
        rejection = verify_rejection(tree, probs, TorchRandom(seed))
        assert verify_block(tree, probs, TorchRandom(seed)) == rejection  # block on a tree
        for rule in (verify_block, verify_traversal, verify_spectr):  # point masses
            assert rule(point_mass, probs, TorchRandom(seed)) == \
                verify_rejection(point_mass, probs, TorchRandom(seed))


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=5), tiny_model("llama", seed=6, layers=1)


@pytest.mark.parametrize("mode", ["block", "traversal", "spectr"])
def test_generate_takes_the_mode(pair, mode):
    target, draft = pair
    prompt = make_prompts(3)[2]
    common = dict(drafter="draft-model", draft_model=draft, max_new_tokens=16, eos_token_id=[])
    sampled = sd.generate(target, prompt, temperature=1.0, seed=1, sampling=mode, **common)
    assert len(sampled.token_ids) == 16 and sampled.stats.drafted > 0
    # greedy ignores the sampling rule: the vanilla tokens
    greedy = sd.generate(target, prompt, sampling=mode, **common).token_ids
    assert greedy == sd.generate(target, prompt, drafter="none", max_new_tokens=16,
                                 eos_token_id=[]).token_ids


def test_cli_offers_every_mode():
    out = CliRunner().invoke(main, ["generate", "--help"]).output
    assert all(mode in out for mode in SAMPLING_MODES)
    bad = CliRunner().invoke(main, ["generate", "--prompt", "x", "--sampling", "nucleus"])
    assert bad.exit_code != 0 and "traversal" in bad.output


def test_bench_method_strings_choose_the_mode():
    check_specs(["vanilla", "ngram:sampling=block", "ngram:sampling=traversal"], has_draft=False)
    with pytest.raises(SpecDecodeError, match="sampling must be one of rejection, coupled"):
        check_specs(["vanilla", "ngram:sampling=nucleus"], has_draft=False)
    with pytest.raises(SpecDecodeError, match="our methods only"):
        check_specs(["vanilla", "hf-pld:sampling=block"], has_draft=False)
    settings = Settings(target=None, draft=None, max_new_tokens=4, num_draft_tokens=2,
                        sampling="coupled")
    assert method_options("ngram:sampling=spectr", settings, None)[1]["sampling"] == "spectr"
    assert method_options("ngram", settings, None)[1]["sampling"] == "coupled"


def test_server_requests_choose_the_mode():
    req = CompletionRequest(prompt="x", speculative={"sampling": "traversal"})
    name, options, _ = speculation(req, drafter="ngram", options={"num_draft_tokens": 3},
                                   policy=None, allowed=frozenset({"ngram"}))
    assert name == "ngram" and options == {"num_draft_tokens": 3, "sampling": "traversal"}


def test_delayed_tree_expansion_drafts_branches_and_stays_exact(pair):
    """draft-model num_drafts / branch_depth: a chain, then i.i.d. branches; greedy and coupled
    outputs equal vanilla's tokens; sampled drafts carry draft_probs (chi-square in
    test_sampling.py)."""
    target, draft = pair
    options = dict(drafter="draft-model", draft_model=draft, num_draft_tokens=4, num_drafts=3,
                   branch_depth=2, max_new_tokens=24, eos_token_id=[])
    for prompt in make_prompts(4)[:3]:
        vanilla = sd.generate(target, prompt, drafter="none", max_new_tokens=24, eos_token_id=[])
        assert sd.generate(target, prompt, **options).token_ids == vanilla.token_ids
        coupled = dict(temperature=1.0, seed=3, sampling="coupled")
        assert sd.generate(target, prompt, **options, **coupled).token_ids == sd.generate(
            target, prompt, drafter="none", max_new_tokens=24, eos_token_id=[], **coupled).token_ids
    run = sd.generate(target, make_prompts(3)[2], temperature=1.0, seed=2, sampling="traversal",
                      **options)
    assert run.steps[0].drafted == 1 + 3 * 3  # 1 spine node, then 3 branches of 3
    with pytest.raises(SpecDecodeError, match="num_drafts"):
        sd.generate(target, [1, 2], drafter="draft-model", draft_model=draft, num_drafts=2,
                    tree="dynamic")


def test_branches_without_replacement_carry_the_rows_they_were_drawn_from(pair):
    """Each child's draft_probs row is its parent's row without the earlier siblings,
    renormalised (the SpecInfer residual on the plain row would be lossy)."""
    from specdecode.drafters.model_drafting import DraftModelDrafter
    from specdecode.models import HFModel

    drafter = DraftModelDrafter(HFModel(pair[1]), num_drafts=3, replacement=False)
    drafter.rng = TorchRandom(0)
    row = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    for _ in range(20):
        drawn, rows = drafter._draw(row, 5)
        assert len(drawn) == 3 and len(set(drawn)) == 3 and 3 not in drawn  # support exhausted
        for i, (tok, own) in enumerate(zip(drawn, rows)):
            expected = row.clone()
            expected[drawn[:i]] = 0.0
            assert torch.allclose(own, expected / expected.sum()) and own[tok] > 0
