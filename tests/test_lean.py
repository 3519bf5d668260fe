"""The lean forward (models/lean.py) gives bitwise the logits and features of the model's own
forward, for prefill and for chain / tree / multi-row steps, exact or not, in float32 and
bfloat16; models it does not reproduce keep their own forward."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers import tiny_model

from specdecode.models import BatchTarget, HFModel, lean
from specdecode.models.cpu import cpu_path, packs
from specdecode.types import Draft


def _run(model, exact: bool, seed: int) -> list[torch.Tensor]:
    """Logits and features of a prefill and three steps over two rows (chains and trees)."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    target = BatchTarget(model, exact=exact)
    out = []
    for length in (5, 40):
        row = target.add_row(length + 40)
        out.append(target.prefill(row, [rng.randrange(vocab) for _ in range(length)],
                                  hidden=True))
        out.append(target.hidden)
    for _ in range(3):
        drafts = []
        for _ in range(2):
            n = rng.randint(0, 6)
            parents = list(range(-1, n - 1)) if rng.random() < 0.5 else \
                [rng.randint(-1, i - 1) for i in range(n)]
            drafts.append(Draft(torch.tensor([rng.randrange(vocab) for _ in range(n)]),
                                torch.tensor(parents, dtype=torch.long)))
        logits = target.step([rng.randrange(vocab) for _ in range(2)], drafts, hidden=True)
        out += logits + list(target.hidden)
        for r, draft in enumerate(drafts):
            target.keep(r, [0] if len(draft) else [])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exact", [True, False])
def test_lean_equals_the_models_forward(arch, dtype, exact, monkeypatch):
    model = tiny_model(arch, seed=2, dtype=dtype, vocab=128)
    assert lean.supported(model)
    fast = _run(model, exact, seed=5)
    assert getattr(model, lean._ATTR, None) is not None  # the lean forward did run
    monkeypatch.setattr(lean.LeanForward, "build", classmethod(lambda cls, m: None))
    slow = _run(model, exact, seed=5)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_changed_weights_rebuild_it():
    model = tiny_model("llama", seed=2, dtype=torch.bfloat16, vocab=128)
    first = _run(model, True, seed=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    second = _run(model, True, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_kept_per_model_and_never_copied():
    model = tiny_model("qwen2", seed=2, dtype=torch.bfloat16, vocab=128)
    first = lean.LeanForward.build(model)
    assert first is not None and lean.LeanForward.build(model) is first
    twin = copy.deepcopy(model)
    assert lean.LeanForward.build(twin) is not first
    assert all(torch.equal(a, b) for a, b in zip(_run(twin, True, 3), _run(model, True, 3)))


def test_other_architectures_keep_their_forward():
    assert not lean.supported(tiny_model("gpt2", seed=0))
    model = tiny_model("llama", seed=0)
    model.model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(32))
    assert not lean.supported(model)


def _run_draft(model, seed: int) -> list[torch.Tensor]:
    """A draft model's calls through ``HFModel``: prefill, one- and many-token extends on a
    non-empty cache, a tree, new tree nodes, keep and crop."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    draft = HFModel(model)
    draft.reset()
    out = [draft.extend([rng.randrange(vocab) for _ in range(9)]),
           draft.extend([rng.randrange(vocab)], last_only=True),
           draft.extend([rng.randrange(vocab) for _ in range(4)])]
    tree = Draft(torch.tensor([rng.randrange(vocab) for _ in range(4)]),
                 torch.tensor([-1, 0, 0, 1]))
    out.append(draft.forward_tree(rng.randrange(vocab), tree))
    draft.keep([0, 1], 4)
    past = draft.length
    visible = torch.ones(2, past + 2, dtype=torch.bool)
    visible[0, -1] = False
    out.append(draft.forward_nodes([rng.randrange(vocab) for _ in range(2)], [past, past],
                                   visible))
    draft.crop(past)
    out.append(draft.extend([rng.randrange(vocab) for _ in range(3)]))
    return out + [kv for pair in draft.cached_kv() for kv in pair]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_draft_models_run_it_too(arch, dtype, attn, monkeypatch):
    model = tiny_model(arch, seed=4, dtype=dtype, vocab=128)
    model.set_attn_implementation(attn)
    fast = _run_draft(model, seed=7)
    assert getattr(model, lean._ATTR, None)  # the lean forward did run
    monkeypatch.setattr(lean.LeanForward, "build", classmethod(lambda cls, m: None))
    slow = _run_draft(model, seed=7)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_a_shallow_view_builds_its_own():
    """Layer-skip's view shares the target's weights (and, copied shallowly, its attributes): it
    must not run the target's lean forward over all the layers."""
    from specdecode.drafters.layer_skip import shallow_view

    model = tiny_model("llama", seed=1, dtype=torch.bfloat16, vocab=128)
    full = lean.LeanForward.build(model)
    view = shallow_view(model, 1)
    own = lean.LeanForward.build(view)
    assert own is not None and own is not full and len(own.layers) == 1
    assert lean.LeanForward.build(model) is full


def _prefill_many(model, runs, last_only, together: bool):
    target = BatchTarget(model, exact=True)
    rows = [target.add_row(len(run) + 8) for run in runs]
    target.prefill(rows[0], runs[0][:3])  # a row that already holds tokens
    runs = [runs[0][3:]] + runs[1:]
    if together:
        logits = target.prefill_rows(rows, runs, last_only, hidden=True)
        hidden = target.hidden
    else:
        logits, hidden = [], []
        for row, run, last in zip(rows, runs, last_only):
            logits.append(target.prefill(row, run, last, hidden=True))
            hidden.append(target.hidden)
    cached = [kv for row in rows for pair in target.cached_kv(row) for kv in pair]
    step = target.step([1] * len(rows), [Draft.empty()] * len(rows))
    return logits + hidden + cached + step, list(target.lengths)


# the dtype whose linears this CPU packs (bfloat16; float32 on the AVX2 path: models/cpu.py)
PACKED = next((d for d in (torch.bfloat16, torch.float32) if packs(d)), None)
needs_packing = pytest.mark.skipif(PACKED is None, reason=f"no packed linears here ({cpu_path()})")


@needs_packing
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_joining_rows_prefill_together_exactly_as_alone(arch, attn):
    """Requests that join together are prefilled in one forward (the packed dtype: oneDNN's packed
    matmuls, whose rows do not depend on how many share the call); every row's logits, features
    and cache are bitwise its prefill alone."""
    model = tiny_model(arch, seed=3, dtype=PACKED, vocab=128)
    model.set_attn_implementation(attn)
    assert lean.LeanForward.build(model).pack
    rng = random.Random(arch + attn)
    for _ in range(4):
        runs = [[rng.randrange(128) for _ in range(rng.choice([4, 9, 33, 70]))]
                for _ in range(rng.randint(2, 5))]
        last_only = [rng.random() < 0.7 for _ in runs]
        alone, lengths = _prefill_many(model, runs, last_only, together=False)
        together, lengths2 = _prefill_many(model, runs, last_only, together=True)
        assert lengths == lengths2 and len(alone) == len(together)
        for a, b in zip(alone, together):
            assert a.shape == b.shape and torch.equal(a, b)


def test_prefill_together_is_one_forward_where_packed_else_per_row(monkeypatch):
    calls = []
    original = lean.LeanForward.__call__
    monkeypatch.setattr(lean.LeanForward, "__call__",
                        lambda self, *a, **k: calls.append(a[0].shape) or original(self, *a, **k))
    runs = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    for dtype in (torch.bfloat16, torch.float32):
        forwards = 1 if packs(dtype) else 3
        calls.clear()
        target = BatchTarget(tiny_model("llama", seed=3, dtype=dtype, vocab=128))
        rows = [target.add_row(16) for _ in runs]
        out = target.prefill_rows(rows, runs, [True, False, True])
        assert len(calls) == forwards and [o.shape[0] for o in out] == [1, 2, 1]
        assert target.lengths == [4, 2, 3]
