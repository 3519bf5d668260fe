"""SAM-Decoding (``sam``): the suffix automaton against brute force (substrings, longest earlier
suffix, matching statistics against a static corpus), the drafter's proposals, corpus files and
their cache, and greedy losslessness with and without a static corpus on three architectures."""

from __future__ import annotations

import itertools
import os
import random
import time

import numpy as np
import pytest
from helpers import ARCHS, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd

import specdecode.drafters.sam  # noqa: F401  (registers "sam")
from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.sam import CorpusCache, SamDrafter, StaticCorpus, build_sam
from specdecode.drafters.suffix_automaton import SuffixAutomaton
from specdecode.types import SamplingParams, SpecDecodeError

PROMPTS = make_prompts(20)


# ---------------------------------------------------------------- brute-force references

def brute_earlier(text: list[int]) -> tuple[int, int]:
    """(m, e): the largest m such that text[-m:] also ends at a position e <= len - 2, and the
    smallest such e; (0, -1) if none. Direct comparison at every earlier end position."""
    n = len(text)
    best, first = 0, -1
    for e in range(n - 1):
        m = 0
        while m <= e and text[e - m] == text[n - 1 - m]:
            m += 1
        if m > best:
            best, first = m, e
    return best, first


def brute_in_corpus(stream: list[int], corpus: list[int]) -> tuple[int, int]:
    """(m, e): the longest suffix of ``stream`` that ends in ``corpus`` at some e <= len - 2 (so it
    has a continuation), and the smallest such e."""
    best, first = 0, -1
    for e in range(len(corpus) - 1):
        m = 0
        while m <= e and m < len(stream) and corpus[e - m] == stream[-1 - m]:
            m += 1
        if m > best:
            best, first = m, e
    return best, first


def sequences(seed: int) -> list[list[int]]:
    """Random texts over small and large alphabets, and repetitive texts with mutations."""
    rng = random.Random(seed)
    out = [[rng.randrange(a) for _ in range(90)] for a in (2, 3, 10, 96)]
    for period in (1, 3, 7):
        pattern = [rng.randrange(20) for _ in range(period)]
        text = (pattern * 100)[:90]
        for _ in range(4):
            text[rng.randrange(len(text))] = rng.randrange(20)
        out.append(text)
    out.append([0] * 40 + [1] + [0] * 40)
    return out


# ---------------------------------------------------------------- the automaton

def test_automaton_recognises_exactly_the_substrings():
    rng = random.Random(0)
    texts = [[rng.randrange(3) for _ in range(14)], [0, 1, 0, 1, 0, 1, 2, 0, 1, 0], [2] * 9,
             [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    probed = {p for length in range(6) for p in itertools.product(range(4), repeat=length)}
    for text in texts:
        sam = SuffixAutomaton()
        for n in range(1, len(text) + 1):
            sam.append(text[n - 1])
            assert len(sam) == n and sam.num_states <= max(2, 2 * n - 1)
            if n >= 3:
                assert sum(map(len, sam.next)) <= 3 * n - 4
        subs = {tuple(text[i:j]) for i in range(len(text)) for j in range(i, len(text) + 1)}
        for s in subs:
            assert sam.contains(list(s))
        for p in probed:  # every sequence of length <= 5 over 0..3, in the text or not
            assert sam.contains(list(p)) == (p in subs), (text, p)
        assert not sam.contains(text + [0]) and not sam.contains([9] + text)


def test_longest_earlier_suffix_matches_brute_force_at_every_step():
    for text in sequences(1):
        sam = SuffixAutomaton()
        for n, token in enumerate(text, start=1):
            sam.append(token)
            state, m = sam.earlier_suffix()
            want_m, want_e = brute_earlier(text[:n])
            assert m == want_m, (text[:n], m, want_m)
            if m:
                e = sam.first_end[state]
                assert e == want_e and e <= n - 2
                assert text[e - m + 1:e + 1] == text[n - m:n]  # an earlier occurrence


def test_matching_statistics_against_a_static_corpus():
    rng = random.Random(2)
    for corpus in sequences(3)[:6]:
        static = StaticCorpus(corpus)
        stream: list[int] = []
        while len(stream) < 120:  # pieces of the corpus mixed with random tokens
            if rng.random() < 0.7:
                start = rng.randrange(len(corpus))
                stream.extend(corpus[start:start + rng.randint(1, 12)])
            else:
                stream.append(rng.randrange(25))
        state = matched = 0  # token by token, as the drafter does
        for n in range(1, len(stream) + 1):
            state, matched = static.automaton.advance(state, matched, stream[n - 1])
            want_m, want_e = brute_in_corpus(stream[:n], corpus)
            assert matched == want_m
            if matched:
                assert static.automaton.first_end[state] == want_e
        assert static.automaton.match(stream) == (state, matched)


def test_a_100k_token_corpus_builds_in_seconds():
    rng = random.Random(4)
    tokens = [rng.randrange(32000) for _ in range(100_000)]
    start = time.perf_counter()
    static = StaticCorpus(tokens)
    assert time.perf_counter() - start < 10.0
    assert static.automaton.num_states < 2 * len(tokens)
    assert static.automaton.contains(tokens[5000:5100])


# ---------------------------------------------------------------- the drafter

def ctx_for(tokens: list[int], budget: int = 64, max_depth: int = 64) -> DraftContext:
    return DraftContext(tokens, 1, budget, max_depth, SamplingParams(), 0)


def test_proposals_follow_the_first_earlier_occurrence():
    rng = random.Random(5)
    for text in sequences(6):
        for k, min_match in ((8, 1), (5, 2), (60, 3)):
            drafter = SamDrafter(k, min_match)
            n = 0
            while n < len(text):
                n = min(len(text), n + rng.randint(1, 4))  # several tokens per step
                budget, depth = rng.choice([(64, 64), (3, 64), (64, 2), (64, 0)])
                prefix = text[:n]
                draft = drafter.propose(ctx_for(prefix, budget, depth))
                m, e = brute_earlier(prefix)
                want = (prefix[e + 1:e + 1 + min(4 * m, k, budget, depth)]
                        if m >= min_match else [])
                assert draft.tokens.tolist() == want
                assert draft.parents.tolist() == list(range(-1, len(want) - 1))
                assert drafter.dynamic_match[1] == m and len(drafter.automaton) == n
                again = drafter.propose(ctx_for(prefix, budget, depth))  # no new tokens: same draft
                assert again.tokens.tolist() == want and len(drafter.automaton) == n


def test_static_corpus_drafts_when_the_prompt_lacks_the_context():
    corpus = [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61]
    drafter = build_sam(BuildContext(target=None), corpus_tokens=corpus)
    # "53 54" never occurred in the prompt, but it did in the corpus: draft what followed it
    draft = drafter.propose(ctx_for([1, 2, 3, 1, 53, 54]))
    assert draft.tokens.tolist() == corpus[5:5 + 8]
    assert drafter.drafts_from == {"dynamic": 0, "static": 1}
    # the corpus' last token has no continuation: the dynamic match (1 token) is used instead
    drafter = SamDrafter(corpus=StaticCorpus(corpus))
    assert drafter.propose(ctx_for([61, 7, 61])).tokens.tolist() == [7, 61]
    # equal match lengths: the request's own text wins
    drafter = SamDrafter(corpus=StaticCorpus(corpus))
    assert drafter.propose(ctx_for([53, 54, 9, 9, 53, 54])).tokens.tolist() == [9, 9, 53, 54]
    assert drafter.drafts_from == {"dynamic": 1, "static": 0}
    # a longer corpus match wins; min_match applies to it too
    drafter = SamDrafter(corpus=StaticCorpus(corpus))
    assert drafter.propose(ctx_for([52, 9, 52, 53, 54])).tokens.tolist() == corpus[5:13]
    drafter = SamDrafter(min_match=4, corpus=StaticCorpus(corpus))
    assert len(drafter.propose(ctx_for([52, 9, 52, 53, 54]))) == 0


def write_corpus(tmp_path, name: str, tokens: list[int]) -> str:
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, np.asarray(tokens, dtype=np.int32))
    else:
        path.write_text(" ".join(map(str, tokens[:5])) + "\n" + "\t".join(map(str, tokens[5:])))
    return str(path)


def test_corpus_files_and_their_cache(tmp_path):
    tokens = [random.Random(7).randrange(96) for _ in range(300)]
    shared = CorpusCache()  # a host's cache
    npy = write_corpus(tmp_path, "c.npy", tokens)
    txt = write_corpus(tmp_path, "c.txt", tokens)
    a, b = shared.from_path(npy), shared.from_path(txt)
    assert list(a.tokens) == tokens and list(b.tokens) == tokens
    assert shared.from_path(npy) is a and len(shared) == 2  # built once
    cache = CorpusCache(max_entries=2)
    first = cache.from_tokens([1, 2, 3])
    cache.from_tokens([4, 5])
    assert cache.from_tokens([1, 2, 3]) is first  # recently used, kept
    cache.from_tokens([6])
    assert len(cache) == 2 and cache.from_tokens([1, 2, 3]) is first
    # a rewritten file is read again
    os.utime(txt, ns=(0, 0))
    assert shared.from_path(txt) is not b
    for bad, content in (("missing.txt", None), ("words.txt", "1 2 three"), ("neg.txt", "1 -2"),
                         ("empty.txt", " \n"), ("float.npy", np.ones(4)), ("2d.npy", np.ones((2, 2), int)),
                         ("broken.npy", "not numpy")):
        path = tmp_path / bad
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            np.save(path, content)
        with pytest.raises(SpecDecodeError, match=str(path).replace("\\", "\\\\")):
            build_sam(BuildContext(target=None), corpus=str(path))
    with pytest.raises(SpecDecodeError, match=str(tmp_path)):
        build_sam(BuildContext(target=None), corpus=str(tmp_path))  # a directory


def test_bad_options():
    build = BuildContext(target=None)
    for options in ({"num_draft_tokens": 0}, {"num_draft_tokens": "8"}, {"num_draft_tokens": True},
                    {"min_match": 0}, {"min_match": 1.5}, {"corpus": 12},
                    {"corpus": "x.txt", "corpus_tokens": [1]}, {"corpus_tokens": "1 2"},
                    {"corpus_tokens": []}, {"corpus_tokens": [1, -1]}, {"corpus_tokens": [1.0]}):
        with pytest.raises(SpecDecodeError):
            build_sam(build, **options)
    model = tiny_model("llama", layers=1)
    for options in ({"num_draft_tokens": -1}, {"corpus_tokens": [1, 96]}, {"window": 3}):
        with pytest.raises(SpecDecodeError):
            sd.generate(model, [1, 2], drafter="sam", max_new_tokens=2, **options)


# ---------------------------------------------------------------- greedy losslessness

@pytest.fixture(scope="module", params=ARCHS)
def target(request):
    return tiny_model(request.param)


def noisy_corpus(target, rng: random.Random) -> list[int]:
    """The target's own continuations of half the prompts, cut at a random point and followed by
    random tokens (so static drafts are partly right, partly wrong), plus unrelated noise."""
    corpus: list[int] = []
    for prompt in PROMPTS[1::2]:
        ref = vanilla(target, prompt, 24)
        corpus += prompt + ref[:rng.randint(0, 24)] + [rng.randrange(96) for _ in range(6)]
    return corpus + [rng.randrange(96) for _ in range(200)]


@pytest.mark.e2e
def test_greedy_matches_vanilla_with_and_without_a_corpus(target):
    rng = random.Random(8)
    corpus = noisy_corpus(target, rng)
    accepted = {"plain": 0, "corpus": 0}
    static_drafts = 0
    for prompt in PROMPTS:
        max_new = rng.randint(1, 24)
        reference = vanilla(target, prompt, max_new)
        out = sd.generate(target, prompt, drafter="sam", max_new_tokens=max_new, eos_token_id=[])
        assert out.token_ids == reference
        accepted["plain"] += out.stats.accepted
        drafter = SamDrafter(num_draft_tokens=6, corpus=CorpusCache().from_tokens(corpus))
        out = sd.generate(target, prompt, drafter=drafter, max_new_tokens=max_new, eos_token_id=[])
        assert out.token_ids == reference and out.stats.fallbacks == 0
        accepted["corpus"] += out.stats.accepted
        static_drafts += drafter.drafts_from["static"]
    # the tiny gpt2 rarely repeats itself within 24 tokens: plain sam's acceptance is also checked
    # in test_eos_inside_an_accepted_draft, with longer outputs
    assert accepted["corpus"] > 0 and static_drafts > 0


@pytest.mark.e2e
def test_eos_inside_an_accepted_draft(target):
    """EOS = an accepted draft token (not the step's last) that is new to the output. The drafts
    of plain sam repeat the output, so a corpus holding the continuation is used as well."""
    cases = plain_accepted = 0
    for n, prompt in enumerate(PROMPTS[1:12]):
        reference = vanilla(target, prompt, 30)
        options = {} if n % 2 else {"corpus_tokens": [7] + prompt + reference}
        full = sd.generate(target, prompt, drafter="sam", max_new_tokens=30, eos_token_id=[],
                           **options)
        assert full.token_ids == reference
        plain_accepted += full.stats.accepted if n % 2 else 0
        start = 0
        for length in full.accept_lengths:
            for i in range(start, start + length - 1):
                eos = reference[i]
                if eos not in reference[:i] and eos not in prompt:
                    cases += 1
                    out = sd.generate(target, prompt, drafter="sam", max_new_tokens=30,
                                      eos_token_id=eos, **options)
                    assert out.token_ids == reference[:i + 1] == vanilla(
                        target, prompt, 30, eos_token_id=eos)
                    assert out.finish_reason == "eos"
                    break
            start += length
    assert cases > 0 and plain_accepted > 0


@pytest.mark.e2e
def test_edge_cases(target, tmp_path):
    corpus = write_corpus(tmp_path, "corpus.txt", noisy_corpus(target, random.Random(9)))
    for options in ({}, {"corpus": corpus}, {"num_draft_tokens": 1}, {"min_match": 3}):
        for prompt in (PROMPTS[0], PROMPTS[3]):  # a one-token prompt, a repetitive one
            assert len(PROMPTS[0]) == 1
            for max_new in (1, 2, 17):
                reference = vanilla(target, prompt, max_new)
                out = sd.generate(target, prompt, drafter="sam", max_new_tokens=max_new,
                                  eos_token_id=[], **options)
                assert out.token_ids == reference
            out = sd.generate(target, prompt, drafter="sam", max_new_tokens=20, eos_token_id=[],
                              max_draft_nodes=3, **options)
            assert out.token_ids == vanilla(target, prompt, 20)
            assert max(out.accept_lengths) <= 4 and out.stats.drafted <= 3 * out.stats.steps
