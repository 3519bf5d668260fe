"""Structured output (docs/structured.md): under a grammar, speculative output equals constrained
vanilla decoding for every drafter (greedy, and coupled sampling bitwise), batch rows equal their
batch-1 output with a different grammar per row, every finished output parses / matches, a cut
mid-structure reports "length", bad grammars raise a clear error, and the grammar drafter plus
jump-forward actually emit several tokens per step."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import fixed_policy as sd
from helpers import tiny_model
from helpers.drafters import AntiOracle, Exploding, OraclePrefixTree, trained_heads

from specdecode.types import SpecDecodeError

llguidance = pytest.importorskip("llguidance")
from specdecode import structured  # noqa: E402

VOCAB = 8192  # the demo tokenizer's
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}
COLORS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1,
          "maxItems": 4}
LARK = 'start: NUM ("+" NUM){0,3}\nNUM: /[0-9]{1,3}/'
CONSTRAINTS = [
    ("person", {"json": PERSON}),
    ("colors", {"json": COLORS}),
    ("object", {"json_object": True}),
    ("date", {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}),
    ("words", {"regex": r"(yes|no|maybe)( (yes|no|maybe)){0,3}"}),
    ("sum", {"grammar": LARK}),
]
PROMPTS = [[5, 17, 300, 42, 17, 300, 42, 17], [1000, 2000, 3000, 4000, 999]]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from specdecode.demo import load_demo
    return AutoTokenizer.from_pretrained(load_demo.__globals__["demo_dir"]() / "tokenizer")


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", vocab=VOCAB, seed=0), tiny_model("llama", vocab=VOCAB, seed=1,
                                                                 layers=1)


def run(target, prompt, tok, spec, drafter="none", n=40, **kw):
    return sd.generate(target, prompt, drafter=drafter, max_new_tokens=n, constraint=spec,
                       tokenizer=tok, eos_token_id=[], **kw)


def text(tok, ids):
    return tok.decode([t for t in ids if t != tok.eos_token_id])


def matrix(target, other, reference):
    eagle, medusa = trained_heads(target, steps=10)
    return [
        ("ngram", "ngram", {"num_draft_tokens": 4}),
        ("draft-model", "draft-model", {"draft_model": other, "num_draft_tokens": 3}),
        ("draft-model-self-tree", "draft-model",
         {"draft_model": target, "num_draft_tokens": 4, "tree_width": 3}),
        ("draft-model-dynamic", "draft-model",
         {"draft_model": target, "tree": "dynamic", "topk": 2, "max_nodes": 8}),
        ("layer-skip", "layer-skip", {"num_layers": 1, "num_draft_tokens": 3}),
        ("suffix", "suffix", {"max_nodes": 8}),
        ("sam", "sam", {}),
        ("token-recycling", "token-recycling", {}),
        ("lookahead", "lookahead", {}),
        ("eagle", "eagle", {"head": eagle, "topk": 2, "max_nodes": 8}),
        ("medusa", "medusa", {"head": medusa}),
        ("grammar", "grammar", {}),
        ("mix-grammar+suffix", "mix", {"sources": "grammar+suffix", "max_nodes": 12}),
        ("mix-default", "mix", {}),
        ("oracle", "oracle", {"continuation": reference, "num_draft_tokens": 5}),
        ("oracle-prefix-tree", OraclePrefixTree(reference, VOCAB, 3), {}),
        ("anti-oracle", AntiOracle(reference, VOCAB), {}),
        ("exploding", Exploding(), {}),
    ]


@pytest.mark.parametrize("name,spec", CONSTRAINTS, ids=[c[0] for c in CONSTRAINTS])
@pytest.mark.e2e
def test_greedy_identity_every_drafter(pair, tok, name, spec):
    target, other = pair
    for prompt in PROMPTS[:1] if name in ("object", "sum") else PROMPTS:
        ref = run(target, prompt, tok, spec)
        plain = run(target, prompt, tok, spec, jump_forward=True)  # forced tokens as drafts
        assert plain.token_ids == ref.token_ids
        for label, drafter, opts in matrix(target, other, ref.token_ids):
            out = run(target, prompt, tok, spec, drafter, **opts)
            assert out.token_ids == ref.token_ids, (label, name)
            assert out.finish_reason == ref.finish_reason, (label, name)


@pytest.mark.parametrize("drafter,opts", [("ngram", {}), ("grammar", {}),
                                          ("mix", {"sources": "grammar+suffix"})])
def test_coupled_sampling_bitwise(pair, tok, drafter, opts):
    target, _ = pair
    for name, spec in CONSTRAINTS[:5:2]:
        kw = dict(temperature=1.0, sampling="coupled", seed=11)
        ref = run(target, PROMPTS[0], tok, spec, **kw)
        out = run(target, PROMPTS[0], tok, spec, drafter, **kw, **opts)
        assert out.token_ids == ref.token_ids, name


def test_batch_rows_with_different_grammars(pair, tok):
    target, _ = pair
    jobs = [(PROMPTS[0], {"json": PERSON}, "ngram"), (PROMPTS[1], {"regex": r"[a-z]{3,8}"}, "grammar"),
            (PROMPTS[0], None, "suffix"), (PROMPTS[1], {"json": COLORS}, "mix"),
            (PROMPTS[0], {"grammar": LARK}, "none")]
    alone = [sd.generate(target, p, drafter=d, max_new_tokens=30, constraint=c, tokenizer=tok,
                         eos_token_id=[]).token_ids for p, c, d in jobs]
    sched = sd.Scheduler(target, max_batch_size=4)
    ids = [sched.add_request(p, drafter=d, max_new_tokens=30, constraint=c, tokenizer=tok,
                             eos_token_id=[]) for p, c, d in jobs]
    while sched.has_unfinished():
        sched.step()
    assert [sched.release(i)[0] for i in ids] == alone


def test_outputs_parse_and_match(pair, tok):
    target, _ = pair
    for prompt in PROMPTS:
        out = run(target, prompt, tok, {"json": PERSON}, "grammar", n=60)
        assert out.finish_reason == "eos" and out.token_ids[-1] == tok.eos_token_id
        value = json.loads(text(tok, out.token_ids))
        assert set(value) == {"name", "age", "ok"} and 0 <= value["age"] <= 120
        colors = json.loads(text(tok, run(target, prompt, tok, {"json": COLORS}, n=60).token_ids))
        assert 1 <= len(colors) <= 4 and set(colors) <= {"red", "green", "blue"}
        for pattern in (r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no|maybe)( (yes|no|maybe)){0,3}"):
            out = run(target, prompt, tok, {"regex": pattern}, "mix", n=60,
                      sources="grammar+suffix")
            assert re.fullmatch(pattern, text(tok, out.token_ids)), pattern


def test_length_cut_mid_structure(pair, tok):
    target, _ = pair
    full = run(target, PROMPTS[0], tok, {"json": PERSON}, n=60)
    cut = run(target, PROMPTS[0], tok, {"json": PERSON}, "grammar", n=5)
    assert cut.finish_reason == "length" and cut.token_ids == full.token_ids[:5]


def test_jump_forward_and_grammar_drafter_speed_up(pair, tok):
    target, _ = pair
    spec = {"json": PERSON}
    vanilla = run(target, PROMPTS[0], tok, spec)
    jumped = run(target, PROMPTS[0], tok, spec, jump_forward=True)
    drafted = run(target, PROMPTS[0], tok, spec, "grammar")
    assert vanilla.stats.mat == 1.0
    assert jumped.stats.mat > 1.3 and drafted.stats.mat >= jumped.stats.mat


def test_pruning_drops_forbidden_point_mass_nodes(pair, tok):
    target, _ = pair

    class Forbidden:  # proposes tokens no JSON value starts with
        def propose(self, ctx):
            return sd.Draft.chain([tok.convert_tokens_to_ids("a")] * 3)

        def observe(self, verdict):
            assert verdict.num_drafted == 3 and verdict.path == []

    out = run(target, PROMPTS[0], tok, {"json": COLORS}, Forbidden(), jump_forward=False)
    assert out.stats.drafted == 0  # every node was pruned before the forward
    assert out.token_ids == run(target, PROMPTS[0], tok, {"json": COLORS}).token_ids


@pytest.mark.parametrize("spec,needle", [
    ({"regex": "[a-"}, "invalid regex"),
    ({"json": {"type": "frobnicate"}}, "invalid JSON schema"),
    ({"json": "{not json"}, "invalid JSON schema"),
    ({"grammar": "start: foo"}, "invalid grammar"),
    ({"yaml": "x"}, "unknown constraint"),
])
def test_bad_constraints_raise_clear_errors(pair, tok, spec, needle):
    with pytest.raises(SpecDecodeError, match=needle):
        run(pair[0], PROMPTS[0], tok, spec)
    assert issubclass(SpecDecodeError, ValueError)


def test_compiled_once_and_needs_tokenizer(pair, tok):
    first = structured.compile_constraint({"json": PERSON}, tok)
    assert structured.compile_constraint({"json": dict(PERSON)}, tok) is first
    with pytest.raises(SpecDecodeError, match="tokenizer"):
        sd.generate(pair[0], PROMPTS[0], constraint={"json": PERSON}, max_new_tokens=3)
    state = first.start()
    masks = torch.stack([state.allowed()])
    assert masks.shape == (1, VOCAB) and not masks[0, tok.eos_token_id]


def test_lm_head_wider_than_tokenizer(tok):
    """Padding rows of the LM head (ids the tokenizer lacks) are never emitted nor verified."""
    target = tiny_model("llama", vocab=VOCAB + 64, seed=5)
    with torch.no_grad():  # make the padding ids the model's favourites
        target.get_output_embeddings().weight[VOCAB:] *= 50

    class Padding:
        def propose(self, ctx):
            return sd.Draft.chain([VOCAB + 3, VOCAB + 1])

        def observe(self, verdict):
            pass

    ref = run(target, PROMPTS[0], tok, {"json": COLORS})
    assert all(t < VOCAB for t in ref.token_ids) and ref.finish_reason == "eos"
    out = run(target, PROMPTS[0], tok, {"json": COLORS}, Padding(), jump_forward=False)
    assert out.token_ids == ref.token_ids and out.stats.drafted == 0
