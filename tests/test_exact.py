"""The exact (batch-invariant) forward: a token's logits are bitwise the same whether it is computed
alone, inside a chain or a tree, or as one of several batch rows (bfloat16, float16, float32), so
every drafter is token-identical to vanilla decoding in half precision too. The negative control:
the plain batched forward in bfloat16 is not."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from helpers import ARCHS, make_prompts, tiny_model
from helpers import fixed_policy as sd
from helpers.invariance import mismatches
from helpers.matrix import NEVER_ACCEPTED, drafter_matrix


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.e2e
def test_logits_do_not_depend_on_what_shares_the_forward(arch, dtype):
    model = tiny_model(arch, seed=3, dtype=dtype, vocab=256)
    assert mismatches(model, exact=True, trials=20, seed=zlib.crc32(f"{arch}{dtype}".encode())) == 0


@pytest.mark.e2e
def test_invariant_with_two_threads():
    """The kernels may block differently with more threads: bfloat16 again on 2 threads."""
    model = tiny_model("qwen2", seed=5, dtype=torch.bfloat16, vocab=256)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert mismatches(model, exact=True, trials=20, seed=11) == 0
    finally:
        torch.set_num_threads(before)


def test_negative_control_the_plain_forward_is_not_invariant_in_bfloat16():
    """Without the exact forward, bfloat16 logits change with what shares the forward (so the
    test above can fail)."""
    model = tiny_model("llama", seed=3, dtype=torch.bfloat16, vocab=256)
    assert mismatches(model, exact=False, trials=12, seed=7) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.e2e
def test_every_drafter_is_token_identical_in_half_precision(dtype):
    """The greedy drafter matrix in half precision, exact forward on (the default for these
    dtypes), one architecture per dtype; and batch rows equal their batch-1 runs."""
    arch = "llama" if dtype == torch.bfloat16 else "qwen2"
    target = tiny_model(arch, seed=0, dtype=dtype)
    other = tiny_model(arch, seed=1, layers=1, dtype=dtype)
    rng = random.Random(4)
    failures, accepted = [], {}
    for i, prompt in enumerate(make_prompts(8, seed=9)):
        max_new = rng.randint(8, 24)
        reference = sd.generate(target, prompt, drafter="none", max_new_tokens=max_new,
                                eos_token_id=[]).token_ids
        for label, drafter, options in drafter_matrix(target, other, reference, i):
            if label.startswith(("rest", "mix-sam+rest")):
                continue  # needs a datastore; the model-free drafters' exactness is the forward's
            out = sd.generate(target, prompt, drafter=drafter, max_new_tokens=max_new,
                              eos_token_id=[], **options)
            if out.token_ids != reference:
                failures.append((label, i))
            accepted[label] = accepted.get(label, 0) + out.stats.accepted
    assert not failures, f"outputs differ from vanilla in {dtype}: {failures}"
    idle = [k for k, n in accepted.items() if n == 0 and k not in NEVER_ACCEPTED]
    assert not idle, f"never accepted, so nothing was proven for them: {idle}"
    prompts = make_prompts(6, seed=11)
    rows = sd.generate_batch(target, prompts, drafter="suffix", max_new_tokens=16, batch_size=3,
                             eos_token_id=[])
    for prompt, row in zip(prompts, rows):
        alone = sd.generate(target, prompt, drafter="none", max_new_tokens=16, eos_token_id=[])
        assert row.token_ids == alone.token_ids


def test_exact_whatever_attention_the_model_was_loaded_with():
    """A model loaded with eager attention gets the exact attention too (not silently the plain
    one)."""
    model = tiny_model("llama", seed=3, dtype=torch.bfloat16, vocab=256)
    model.set_attn_implementation("eager")
    assert mismatches(model, exact=True, trials=8, seed=3) == 0


@pytest.mark.parametrize("dim,kv_heads,group", [(64, 3, 3), (64, 2, 1), (128, 1, 4)])
def test_exact_attention_at_real_shapes(dim, kv_heads, group):
    """The bfloat16 exact attention at real head sizes and contexts past 512 keys: a token's output
    is the same computed alone (plain decoding), inside a chain of 1 to 40 tokens sharing the
    row's keys, or as a tree node with its keys gathered."""
    from specdecode.models.exact import KEY_BLOCK, _matmul_attention, block_end

    gen = torch.Generator().manual_seed(dim + group)
    for length in (KEY_BLOCK, 3 * KEY_BLOCK, 5 * KEY_BLOCK, 9 * KEY_BLOCK):
        k = torch.randn(kv_heads, length, dim, generator=gen).to(torch.bfloat16)
        v = torch.randn(kv_heads, length, dim, generator=gen).to(torch.bfloat16)
        for g in (1, 2, 5, 17, 40):
            q = torch.randn(g, kv_heads, group, dim, generator=gen).to(torch.bfloat16)
            positions = torch.randint(length - KEY_BLOCK, length, (g,), generator=gen)
            assert all(block_end(int(p)) == length for p in positions)
            mask = torch.arange(length)[None, :] <= positions[:, None]  # [g, length]
            chain = _matmul_attention(q.transpose(0, 1).reshape(kv_heads, g * group, dim), k, v,
                                      mask[:, None].expand(g, group, length).reshape(-1, length),
                                      0.125).view(kv_heads, g, group, dim).transpose(0, 1)
            tree = _matmul_attention(q, k.expand(g, -1, -1, -1).contiguous(),
                                     v.expand(g, -1, -1, -1).contiguous(),
                                     mask[:, None, None].expand(g, 1, group, length), 0.125)
            for i in range(g):
                alone = _matmul_attention(q[i].reshape(kv_heads, group, dim), k, v,
                                          mask[i, None].expand(group, length), 0.125)
                assert torch.equal(chain[i], alone.view(kv_heads, group, dim)), (length, g, i)
                assert torch.equal(tree[i], chain[i]), (length, g, i)
