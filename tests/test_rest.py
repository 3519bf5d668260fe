"""REST (He et al., NAACL 2024): the datastore (suffix array, lookups, builder, CLI) against brute
force, the trie against explicit prefix counts, and greedy losslessness of the ``rest`` drafter."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ARCHS, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd

import specdecode.drafters.rest as rest
from specdecode.cli import main
from specdecode.datastore import (
    CACHE_SIZE,
    Datastore,
    build_datastore_from_token_docs,
    build_suffix_array,
    open_datastore,
)
from specdecode.datastore import build as datastore_build
from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.types import SamplingParams, SpecDecodeError

PROMPTS = make_prompts(20)


def corpora(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5) for _ in range(300)],  # random, small alphabet: long shared prefixes
            ([1, 2, 3] * 60)[:170] + [rng.randrange(4) for _ in range(30)],  # periodic
            [7] * 80,  # constant: every doubling round needed
            [3],
            [rng.randrange(300) for _ in range(200)]]  # large alphabet: ranks distinct early


@pytest.mark.parametrize("case", range(5))
def test_suffix_array_orders_by_the_first_16_tokens(case):
    tokens = corpora()[case]
    expected = sorted(range(len(tokens)), key=lambda i: tokens[i:i + 16])  # stable: ties by position
    assert build_suffix_array(np.array(tokens, dtype=np.uint16)).tolist() == expected


def make_store(tmp_path, docs, vocab=8, separator=7, name="ds") -> Datastore:
    build_datastore_from_token_docs(docs, tmp_path / name, vocab, separator)
    return Datastore(tmp_path / name)


def random_docs(seed: int, count: int = 6, vocab: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    docs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(count)]
    docs.append(([0, 1, 2, 3] * 20)[:rng.randint(10, 80)])
    return docs


@pytest.mark.parametrize("seed", range(3))
def test_lookup_equals_brute_force(tmp_path, seed):
    store = make_store(tmp_path, random_docs(seed), vocab=7 + seed % 2, separator=7)
    tokens = store.tokens.tolist()
    n, sep = len(tokens), store.separator
    assert tokens[-1] == sep and store.meta["num_tokens"] == n - store.meta["num_documents"]
    rng = random.Random(seed)
    for _ in range(150):
        length = rng.randint(1, 16)
        start = rng.randrange(n)
        query = tokens[start:start + length] if rng.random() < 0.7 else \
            [rng.randrange(7) for _ in range(length)]
        lo, hi = store.find(query)
        found = set(store.suffix_array[lo:hi].tolist())
        assert found == {i for i in range(n) if tokens[i:i + len(query)] == query}
    for _ in range(100):  # longest context suffix, separators in the context cut it
        context = [rng.choice([rng.randrange(7), sep]) if rng.random() < 0.1 else rng.randrange(7)
                   for _ in range(rng.randint(0, 24))]
        lo_len, hi_len = rng.randint(1, 3), rng.randint(3, 16)
        tail = context[max(0, len(context) - hi_len):]
        if sep in tail:
            tail = tail[len(tail) - tail[::-1].index(sep):]
        occurs = [k for k in range(lo_len, len(tail) + 1)
                  if any(tokens[i:i + k] == tail[len(tail) - k:] for i in range(n))]
        match = store.longest_match(context, lo_len, hi_len)
        if not occurs:
            assert match is None
            continue
        length, lo, hi = match
        assert length == max(occurs)
        assert set(store.suffix_array[lo:hi].tolist()) == {
            i for i in range(n) if tokens[i:i + length] == tail[len(tail) - length:]}
        rows = store.continuations(lo, hi, length, 5, 1000)
        for row, pos in zip(rows.tolist(), store.suffix_array[lo:hi].tolist()):
            follow = []
            for t in tokens[pos + length:pos + length + 5]:
                if t == sep:
                    break
                follow.append(t)
            assert row == follow + [-1] * (5 - len(follow))


def test_continuations_sample_evenly_and_deterministically(tmp_path):
    store = make_store(tmp_path, [[1, 2] * 50, [1, 3] * 50], vocab=5, separator=4)
    lo, hi = store.find([1])
    assert hi - lo == 100
    rows = store.continuations(lo, hi, 1, 3, 10)
    assert rows.shape == (10, 3)
    assert {r[0] for r in rows.tolist()} == {2, 3}  # both halves of the sorted range sampled
    assert np.array_equal(rows, store.continuations(lo, hi, 1, 3, 10))


def brute_counts(rows: np.ndarray) -> Counter:
    counts: Counter = Counter()
    for row in rows.tolist():
        for d in range(1, len(row) + 1):
            if row[d - 1] < 0:
                break
            counts[tuple(row[:d])] += 1
    return counts


@pytest.mark.parametrize("seed", range(4))
def test_trie_counts_and_best_first_order(seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 3 + seed, size=(60 + 20 * seed, 6))
    rows[rng.random(rows.shape) < 0.08] = -1
    rows = np.where(np.cumsum(rows < 0, axis=1) > 0, -1, rows)  # -1 to the end of a row
    nodes = rest.count_prefixes(rows)
    paths = []
    for i in range(len(nodes)):
        parent = int(nodes.parents[i])
        paths.append((paths[parent] if parent >= 0 else ()) + (int(nodes.tokens[i]),))
        assert len(paths[i]) == nodes.depths[i]
    assert dict(zip(paths, nodes.counts.tolist())) == dict(brute_counts(rows))
    for budget in (1, 5, 16, 1000):
        tokens, parents = rest.best_first(nodes, budget)
        assert len(tokens) == min(budget, len(nodes))
        chosen, counts = [], []
        for tok, parent in zip(tokens, parents):
            assert parent < len(chosen)
            chosen.append((chosen[parent] if parent >= 0 else ()) + (tok,))
            counts.append(brute_counts(rows)[chosen[-1]])
        assert len(set(chosen)) == len(chosen)  # no duplicate siblings
        assert counts == sorted(counts, reverse=True)
        assert counts == sorted(nodes.counts.tolist(), reverse=True)[:len(counts)]
    assert rest.best_first(rest.count_prefixes(np.full((3, 4), -1)), 5) == ([], [])


def tiny_tokenizer(path, chat=True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "hello world how are you fine thanks user assistant system : code def return".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat:
        tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> "
                             "{% endfor %}")
    tok.save_pretrained(path)
    return tok


def test_cli_build_from_conversations_and_text(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    records = [{"conversations": [{"from": "human", "value": "hello how are you"},
                                  {"from": "gpt", "value": "fine thanks"}]},
               {"messages": [{"role": "system", "content": "code"},
                             {"role": "user", "content": "def return"}]},
               {"text": "hello world"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "b.py").write_text("def hello return world")
    out = tmp_path / "ds"
    result = CliRunner().invoke(main, ["datastore", "build", "--input", str(tmp_path / "a.jsonl"),
                                       "--input", str(tmp_path / "b.py"), "--tokenizer",
                                       str(tmp_path / "tok"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    texts = [tok.apply_chat_template([{"role": "user", "content": "hello how are you"},
                                      {"role": "assistant", "content": "fine thanks"}],
                                     tokenize=False),
             tok.apply_chat_template(records[1]["messages"], tokenize=False),
             "hello world", "def hello return world"]
    expected = []
    for text in texts:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [0]
    assert 1 in expected  # the template's <eos> stays a normal token; <pad> separates
    store = Datastore(out)
    assert store.tokens.tolist() == expected and store.tokens.dtype == np.uint8
    assert store.suffix_array.dtype == np.int32
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == len(tok) and meta["separator_id"] == 0
    assert meta["num_documents"] == 4 and meta["num_tokens"] == len(expected) - 4
    assert len(meta["vocab_fingerprint"]) == 64 and meta["builder_version"] >= 1
    capped = CliRunner().invoke(main, ["datastore", "build", "--input", str(tmp_path / "b.py"),
                                       "--tokenizer", str(tmp_path / "tok"), "--out",
                                       str(tmp_path / "cap"), "--max-tokens", "2"])
    assert capped.exit_code == 0 and Datastore(tmp_path / "cap").tokens.tolist() == expected[-5:-3] + [0]
    plain = tiny_tokenizer(tmp_path / "plain", chat=False)
    assert datastore_build.render_record(records[0], plain) == "hello how are you\nfine thanks"


def test_cli_build_errors(tmp_path):
    tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    runner = CliRunner()
    base = ["datastore", "build", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")]
    result = runner.invoke(main, base + ["--input", str(tmp_path / "empty.txt")])
    assert result.exit_code != 0 and "no tokens" in result.output
    result = runner.invoke(main, base + ["--input", str(tmp_path / "missing.jsonl")])
    assert result.exit_code != 0 and "input file not found" in result.output
    result = runner.invoke(main, base + ["--input", str(tmp_path / "bad.jsonl")])
    assert result.exit_code != 0 and "bad.jsonl:1" in result.output
    assert not (tmp_path / "o" / "meta.json").exists()
    with pytest.raises(SpecDecodeError, match="no tokens"):
        build_datastore_from_token_docs([[], []], tmp_path / "e", 96, 95)


def test_build_demo_on_a_fake_corpus(tmp_path, monkeypatch):
    from specdecode.train import corpus

    monkeypatch.setattr(datastore_build, "have_sharegpt", lambda: False)
    result = CliRunner().invoke(main, ["datastore", "build-demo", "--out", str(tmp_path / "d")])
    assert result.exit_code != 0 and 'pip install -e ".[train]"' in result.output
    fake = [("a", corpus.render_chat([{"role": "user", "content": "Hi there"},
                                      {"role": "assistant", "content": "Hello! How can I help?"}])),
            ("b", "<|user|>\nprint('x')<|end|>\n")]
    monkeypatch.setattr(datastore_build, "have_sharegpt", lambda: True)
    monkeypatch.setattr(corpus, "sharegpt_documents", lambda: iter(fake))
    result = CliRunner().invoke(main, ["datastore", "build-demo", "--out", str(tmp_path / "d"),
                                       "--max-tokens", "1000"])
    assert result.exit_code == 0, result.output
    store = Datastore(tmp_path / "d")
    assert store.meta["num_documents"] == 2 and store.vocab_size == 8192
    assert store.separator == 0 and store.tokens.dtype == np.uint16


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Per arch: a datastore of the target's own continuations of half the prompts (drafts get
    accepted) plus unrelated random documents (drafts get rejected); separator 95, a real token."""
    root = tmp_path_factory.mktemp("rest")
    rng = random.Random(5)
    built = {}
    for arch in ARCHS:
        target = tiny_model(arch, seed=0)
        docs = [p + vanilla(target, p, 30) for p in PROMPTS[::2]]
        docs += [[rng.randrange(96) for _ in range(40)] for _ in range(10)]
        build_datastore_from_token_docs(docs, root / arch, 96, 95)
        built[arch] = (target, str(root / arch))
    return built


@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.e2e
def test_greedy_matches_vanilla(stores, arch_name):
    target, path = stores[arch_name]
    rng = random.Random(2)
    accepted = drafted = 0
    for i, prompt in enumerate(PROMPTS):
        max_new = rng.randint(1, 24)
        opts = {"num_draft_tokens": 1 + i % 8, "max_nodes": (4, 16, 24)[i % 3]}
        out = sd.generate(target, prompt, drafter="rest", max_new_tokens=max_new, eos_token_id=[],
                          datastore=path, **opts)
        assert out.token_ids == vanilla(target, prompt, max_new), (arch_name, i)
        accepted += out.stats.accepted
        drafted += out.stats.drafted
    assert accepted > 0 and drafted > accepted  # acceptance and rejection paths both ran


def test_eos_inside_an_accepted_draft(stores):
    target, path = stores["llama"]
    prompt = PROMPTS[2]  # in the datastore
    full = vanilla(target, prompt, 30)
    cut = next(i for i in range(3, 30) if full[i] not in full[:i])
    expected = vanilla(target, prompt, 30, eos_token_id=full[cut])
    out = sd.generate(target, prompt, drafter="rest", datastore=path, max_new_tokens=30,
                      eos_token_id=full[cut])
    assert out.token_ids == expected == full[:cut + 1] and out.finish_reason == "eos"
    assert max(out.accept_lengths) > 2


def test_edge_cases_and_caps(stores):
    target, path = stores["qwen2"]
    for prompt, max_new in ((PROMPTS[0], 10), (PROMPTS[4], 1), ([PROMPTS[4][-1]], 8)):
        out = sd.generate(target, prompt, drafter="rest", datastore=path, max_new_tokens=max_new,
                          eos_token_id=[])
        assert out.token_ids == vanilla(target, prompt, max_new)
    out = sd.generate(target, PROMPTS[4], drafter="rest", datastore=path, max_new_tokens=20,
                      eos_token_id=[], max_draft_nodes=3)
    assert out.token_ids == vanilla(target, PROMPTS[4], 20) and out.stats.accepted > 0
    assert out.stats.drafted <= 3 * out.stats.steps
    store = open_datastore(path)
    drafter = rest.RestDrafter(store, num_draft_tokens=8, max_nodes=24)
    ctx = DraftContext(PROMPTS[4] + vanilla(target, PROMPTS[4], 5), len(PROMPTS[4]), 24, 3,
                       SamplingParams(), 0)
    draft = drafter.propose(ctx)
    assert 0 < len(draft) <= 24 and int(draft.depths().max()) <= 3
    again = drafter.propose(ctx)
    assert torch.equal(draft.tokens, again.tokens) and torch.equal(draft.parents, again.parents)
    ctx.budget = 2
    assert len(drafter.propose(ctx)) <= 2
    assert len(drafter.propose(DraftContext([95, 95], 2, 8, 8, SamplingParams(), 0))) == 0


def test_bad_options(stores, tmp_path):
    target, path = stores["gpt2"]
    prompt = PROMPTS[1]
    with pytest.raises(SpecDecodeError, match="needs a datastore"):
        sd.generate(target, prompt, drafter="rest", max_new_tokens=4)
    with pytest.raises(SpecDecodeError, match="not found"):
        sd.generate(target, prompt, drafter="rest", datastore=str(tmp_path / "nope"), max_new_tokens=4)
    with pytest.raises(SpecDecodeError, match="not a REST datastore"):
        sd.generate(target, prompt, drafter="rest", datastore=str(tmp_path), max_new_tokens=4)
    build_datastore_from_token_docs([[1, 2, 3]], tmp_path / "v100", 100, 0)
    with pytest.raises(SpecDecodeError, match="100 tokens but the target has 96"):
        sd.generate(target, prompt, drafter="rest", datastore=str(tmp_path / "v100"), max_new_tokens=4)
    for opts in ({"num_draft_tokens": 0}, {"max_nodes": -1}, {"max_candidates": 0},
                 {"min_suffix": 5, "max_suffix": 3}, {"max_suffix": 17}, {"max_nodes": "many"}):
        with pytest.raises(SpecDecodeError):
            sd.generate(target, prompt, drafter="rest", datastore=path, max_new_tokens=4, **opts)
    with pytest.raises(SpecDecodeError, match="outside the vocabulary"):
        build_datastore_from_token_docs([[1, 96]], tmp_path / "big", 96, 95)


def test_datastore_cache_is_shared_and_bounded(tmp_path):
    paths = []
    for i in range(CACHE_SIZE + 2):
        build_datastore_from_token_docs([[1, 2, i]], tmp_path / f"c{i}", 8, 7)
        paths.append(tmp_path / f"c{i}")
    build = BuildContext(target=None)  # its host owns the cache
    drafter = rest.build_rest(build, datastore=str(paths[0]))
    store = drafter.store
    assert rest.build_rest(build, datastore=str(paths[0])).store is store
    assert rest.build_rest(BuildContext(target=None), datastore=str(paths[0])).store is not store
    cache = build.host.peek("datastores")
    for p in paths[1:]:
        open_datastore(p, cache)
    assert len(cache) <= CACHE_SIZE and open_datastore(paths[0], cache) is not store
