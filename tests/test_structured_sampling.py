"""L2 under a grammar: sampled continuations of a tiny model (6-token vocabulary, toy regex) follow
the exact masked-and-renormalised target distribution, context by context (chi-square, bins merged
to expected counts >= 5, hard failure on any token the grammar forbids), for sampled draft trees
(never pruned) and point-mass chains (pruned, with forced tokens appended). Negative control:
masking each node's row with its PARENT's grammar state must fail."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest
import torch
from helpers import fixed_policy as sd
from helpers import tiny_model
from scipy.stats import chi2

from specdecode.types import Draft

pytest.importorskip("llguidance")
from specdecode import structured  # noqa: E402

pytestmark = pytest.mark.e2e  # chi-square tests of sampled distributions

SPEC = {"regex": "(a|c)(b|c|d)d(a|b|c)*"}  # tokens: a b c d and "ab"; EOS from the 3rd token on
PROMPT = [1, 3, 2]
LENGTH = 5
SAMPLES = 800  # point-mass chains; the draft-model tree (a forward per row) gets 500
ALPHA = 1e-4


@pytest.fixture(scope="module")
def toy():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "ab": 5}
    raw = Tokenizer(models.BPE(vocab, merges=[("a", "b")]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    target = tiny_model("llama", vocab=6, seed=3, scale=3.0)
    other = tiny_model("llama", vocab=6, seed=4, layers=1, scale=3.0)
    return tok, target, other


class RandomChain:
    """Point-mass chains of random tokens (mostly forbidden: pruned before the forward)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def propose(self, ctx):
        return Draft.chain([self.rng.randrange(6) for _ in range(min(3, ctx.max_depth))])

    def observe(self, verdict):
        pass


class RandomSampled:
    """Sampled chains: each token drawn from a fixed row (``draft_probs``), forbidden ones included
    (never pruned: the rule must reject them itself)."""

    ROW = torch.tensor([0.1, 0.3, 0.2, 0.15, 0.15, 0.1], dtype=torch.float64)
    DEPTH = 3

    def __init__(self, seed: int) -> None:
        # not the request's seed: the rule's uniforms come from a generator seeded with it
        self.gen = torch.Generator().manual_seed(10**9 + 7 * seed)

    def row(self, ctx) -> torch.Tensor:
        return self.ROW

    def propose(self, ctx):
        tokens, rows = [], []
        try:
            for _ in range(min(self.DEPTH, ctx.max_depth)):
                rows.append(self.row(ctx))
                tokens.append(int(torch.multinomial(rows[-1], 1, generator=self.gen)))
                if ctx.constraint is not None and tokens[-1] != 0:
                    ctx.constraint.push(tokens[-1:])
        finally:
            if ctx.constraint is not None:
                ctx.constraint.reset_probe()
        return Draft.chain(tokens, torch.stack(rows) if rows else None)

    def observe(self, verdict):
        pass


class LegalSampled(RandomSampled):
    """Sampled from the fixed row masked by the grammar along the chain: legal chains, so the
    engine appends forced tokens (one-hot rows) after them (one token: "ab" forces "d")."""

    DEPTH = 1

    def row(self, ctx) -> torch.Tensor:
        legal = ctx.constraint.allowed().double()
        return self.ROW * legal / (self.ROW * legal).sum()


def sample(tok, target, drafter, options, n=SAMPLES):
    sched = sd.Scheduler(target, max_batch_size=32)
    ids = [sched.add_request(PROMPT, drafter=drafter(i) if callable(drafter) else drafter,
                             max_new_tokens=LENGTH, temperature=1.0, seed=i, constraint=SPEC,
                             tokenizer=tok, eos_token_id=[], **options) for i in range(n)]
    while sched.has_unfinished():
        sched.step()
    return [tuple(sched.release(i)[0]) for i in ids]


def exact_next(tok, target, prefix) -> torch.Tensor | None:
    """The masked, renormalised target distribution after ``prefix`` (None: illegal prefix)."""
    state = structured.compile_constraint(SPEC, tok).start()
    if state.push(list(prefix)) < len(prefix):
        return None
    legal = state.allowed()
    with torch.no_grad():
        logits = target(torch.tensor([PROMPT + list(prefix)])).logits[0, -1].double()
    return torch.softmax(logits.masked_fill(~legal, float("-inf")), -1)


def goodness(tok, target, samples) -> float:
    """p-value of the summed per-context chi-square; 0.0 on any forbidden token."""
    nexts: dict[tuple, Counter] = defaultdict(Counter)
    for seq in samples:
        for k in range(len(seq)):
            nexts[seq[:k]][seq[k]] += 1
            if seq[k] == 0:
                break
    stat, dof = 0.0, 0
    for prefix, counts in nexts.items():
        probs = exact_next(tok, target, prefix)
        if probs is None:
            continue  # reached only through a forbidden token, failed at its parent
        total = sum(counts.values())
        if any(probs[t] == 0 for t in counts):
            return 0.0
        expected = (probs * total).tolist()
        bins, rest_obs, rest_exp = [], 0, 0.0
        for t in range(len(expected)):
            if expected[t] >= 5:
                bins.append((counts.get(t, 0), expected[t]))
            else:
                rest_obs, rest_exp = rest_obs + counts.get(t, 0), rest_exp + expected[t]
        if rest_exp > 0:
            bins.append((rest_obs, rest_exp))
        if len(bins) < 2 or min(e for _, e in bins) < 1:
            continue
        stat += sum((o - e) ** 2 / e for o, e in bins)
        dof += len(bins) - 1
    assert dof >= 10  # the test has power: many contexts were seen often enough
    return float(chi2.sf(stat, dof))


CASES = [
    ("draft-model-sampled-tree", "draft-model", {"num_draft_tokens": 3, "tree_width": 2}),
    ("random-chain-rejection", RandomChain, {"sampling": "rejection"}),
    ("random-sampled-rejection", RandomSampled, {"sampling": "rejection"}),
    ("legal-sampled-block", LegalSampled, {"sampling": "block"}),
]


@pytest.mark.parametrize("label,drafter,options", CASES, ids=[c[0] for c in CASES])
def test_sampled_continuations_follow_masked_target(toy, label, drafter, options):
    tok, target, other = toy
    if drafter == "draft-model":
        options = {**options, "draft_model": other}
    samples = sample(tok, target, drafter, options, 500 if drafter == "draft-model" else SAMPLES)
    assert goodness(tok, target, samples) > ALPHA, label


def test_negative_control_parent_state_mask_fails(toy, monkeypatch):
    tok, target, other = toy
    shape = structured.ConstraintState.shape

    def parent_masks(self, draft, max_nodes, max_depth):  # the bug: a node's row gets its
        shaped = shape(self, draft, max_nodes, max_depth)  # parent's grammar state
        rows = [0] + [p + 1 for p in shaped.parents.tolist()]
        self.masks = self.masks[rows]
        return shaped

    def lenient(self, tokens):  # keep going after an illegal token, so the statistics judge
        self.masks = None
        took = self.matcher.try_consume_tokens([t for t in tokens if t not in self.eos_ids])
        del took

    monkeypatch.setattr(structured.ConstraintState, "shape", parent_masks)
    monkeypatch.setattr(structured.ConstraintState, "advance", lenient)
    samples = sample(tok, target, RandomChain, {"sampling": "rejection"}, n=400)
    assert goodness(tok, target, samples) < ALPHA
