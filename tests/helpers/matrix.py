"""The drafter matrix of the greedy identity tests (test_greedy_equivalence.py, and again in
test_batch_rows.py and test_exact.py): every registered drafter, with the options that reach its
chains, trees and sources, plus the test-only patterns; and the REST datastore they draft from."""

from __future__ import annotations

import random

import pytest

from helpers import make_prompts, vanilla
from helpers.drafters import AntiOracle, Exploding, OraclePrefixTree, trained_heads
from specdecode.datastore import build_datastore_from_token_docs

PROMPTS = make_prompts(20)  # test_greedy_equivalence.py's prompts


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


# never accept by design; the unrelated random draft model may never agree with the target (its
# acceptance paths are covered by draft-model-self-tree, which drafts with the target itself)
NEVER_ACCEPTED = {"none", "anti-oracle", "exploding", "draft-model", "draft-model-dynamic",
                  "grammar"}
