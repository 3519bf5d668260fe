"""Prepacked linears (models/packed.py): bfloat16 where the CPU packs it, float32 on the AVX2 path
(models/cpu.py); row-invariant on SmolLM2-135M's own shapes (bfloat16 from MIN_ROWS rows up,
float32 from one row), and refreshed when the weights change. Each dtype runs where this CPU (or
``SPECDECODE_CPU_ISA=avx2``, which CI sets in a second step) packs it and says so where it does
not."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import fixed_policy as sd
from helpers import tiny_model

from specdecode.models.cpu import cpu_path, packs, row_blocks
from specdecode.models.exact import MIN_ROWS
from specdecode.models.packed import PackedLinears, packed_linears

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in)
DTYPES = [pytest.param(dtype, marks=pytest.mark.skipif(
    not packs(dtype), reason=f"this CPU does not pack {dtype} ({cpu_path()})"))
    for dtype in (torch.bfloat16, torch.float32)]
FIRST_ROWS = {torch.bfloat16: MIN_ROWS, torch.float32: 1}  # fewest rows of one reduction order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMOLLM2_SHAPES)
def test_packed_rows_do_not_depend_on_the_row_count(shape, dtype):
    torch.manual_seed(sum(shape))
    out_f, in_f = shape
    layer = torch.nn.Linear(in_f, out_f, bias=False).to(dtype)
    mode = PackedLinears(layer)
    assert mode.packed  # the packed kernel runs, not the stock one
    x = torch.randn(40, in_f).to(dtype)
    first = FIRST_ROWS[dtype]
    filler = torch.randn(first - 1, in_f).to(dtype)
    with torch.no_grad(), mode:
        alone = torch.stack([layer(torch.cat([x[r:r + 1], filler]))[0] for r in range(40)])
        for rows in sorted({first, 2, 3, 5, 7, 8, 15, 16, 17, 31, 40} - set(range(first))):
            assert torch.equal(layer(x[:rows].clone()), alone[:rows]), rows
        assert torch.allclose(alone.float(), torch.nn.functional.linear(x, layer.weight).float(),
                              rtol=2e-2, atol=2e-2)  # the same product as the stock kernel's


@pytest.mark.parametrize("dtype", DTYPES)
def test_packs_are_kept_and_refreshed(dtype):
    model = tiny_model("llama", seed=2, dtype=dtype)
    first = packed_linears(model)  # (BatchTarget uses models/lean.py's own packs for a llama)
    assert first is not None and packed_linears(model) is first  # made once per model
    twin = copy.deepcopy(model)  # a copy packs its own weights
    assert packed_linears(twin) is not first
    prompt = [5, 6, 7, 5, 6, 7, 5]
    before = sd.generate(model, prompt, drafter="none", max_new_tokens=1, eos_token_id=[])
    top = before.token_ids[0]
    other = (top + 1) % model.config.vocab_size
    with torch.no_grad():  # changed in place so that another token wins: packed again
        model.lm_head.weight[other] = model.lm_head.weight[top] * 3
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    assert logits.argmax().item() == other  # (the top logit was positive)
    assert packed_linears(model) is not first
    after = sd.generate(model, prompt, drafter="none", max_new_tokens=1, eos_token_id=[])
    assert after.token_ids == [other]  # a stale pack would still say ``top``
    for kind in (torch.bfloat16, torch.float32, torch.float64):  # packed where the CPU packs
        assert (packed_linears(tiny_model("llama", dtype=kind)) is None) == (not packs(kind))


def test_cpu_classes(monkeypatch):
    """The AVX2 path forced on any CPU (the switch CI uses) sees no AVX-512 and no native
    bfloat16, packs float32 and not bfloat16, and says so; a bad value is a clear error."""
    from specdecode.models import cpu
    from specdecode.models.sources import auto_dtype
    from specdecode.types import SpecDecodeError

    monkeypatch.setattr(cpu, "_real_flags", lambda: frozenset(
        "fma avx avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16".split()))
    monkeypatch.setenv(cpu.ISA_ENV, "")
    assert cpu.native_bf16() and "AVX512-BF16 path" in cpu.cpu_path()
    assert not cpu.row_blocks(torch.bfloat16)  # Zen 4: one reduction order at any row count
    monkeypatch.setattr(cpu, "_real_flags", lambda: frozenset(
        "fma avx avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_bf16".split()))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16")  # AMX capped (the default)
    assert not cpu.row_blocks(torch.bfloat16) and "capped below AMX" in cpu.cpu_path()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")  # AMX on: blocks of 32 rows
    assert cpu.row_blocks(torch.bfloat16) and "32-row blocks" in cpu.cpu_path()
    assert not cpu.row_blocks(torch.float16) and not cpu.row_blocks(torch.float32)
    monkeypatch.setenv(cpu.ISA_ENV, "avx2")
    assert cpu.cpu_flags() == {"fma", "avx", "avx2"} and not cpu.native_bf16()
    assert not cpu.row_blocks(torch.bfloat16)
    assert "AVX2 path" in cpu.cpu_path() and "forced" in cpu.cpu_path()
    if cpu._has_mkldnn_linear():
        assert cpu.packs(torch.float32) and not cpu.packs(torch.bfloat16)
    big = tiny_model("llama", dtype=torch.float32).config
    big.hidden_size, big.num_hidden_layers, big.vocab_size = 576, 30, 49152
    assert auto_dtype(big, None) == torch.float32  # SmolLM2's shape: float32 without native bf16
    monkeypatch.setenv(cpu.ISA_ENV, "")
    assert auto_dtype(big, None) == torch.bfloat16
    monkeypatch.setenv(cpu.ISA_ENV, "avx512")
    with pytest.raises(SpecDecodeError, match="avx2"):
        cpu.cpu_flags()


def test_allow_amx_lifts_only_the_cap_specdecode_set(monkeypatch):
    """Training lifts the AMX cap that importing specdecode set (not one the user set), and says
    whether AMX is allowed; without AMX nothing changes."""
    from specdecode.models import cpu

    amx = frozenset("avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_bf16".split())
    monkeypatch.setattr(cpu, "_real_flags", lambda: amx)
    monkeypatch.setenv(cpu.ISA_ENV, "")
    monkeypatch.setattr(cpu, "_AMX_CAP", "AVX512_CORE_FP16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16")
    assert not cpu.row_blocks(torch.bfloat16)
    assert cpu.allow_amx() and "ONEDNN_MAX_CPU_ISA" not in os.environ
    assert cpu.row_blocks(torch.bfloat16)  # the exact forward then keeps 32-row blocks
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # the user's own cap stays
    assert not cpu.allow_amx() and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu.allow_amx()
    monkeypatch.setattr(cpu, "_real_flags", lambda: amx - {"amx_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16")
    assert not cpu.allow_amx() and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_FP16"
    monkeypatch.setattr(cpu, "_real_flags", lambda: amx)
    monkeypatch.setenv(cpu.ISA_ENV, "avx2")  # the forced AVX2 path has no AMX
    assert not cpu.allow_amx()


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_blocks_keep_rows_invariant(dtype, monkeypatch):
    """Where oneDNN was already running when specdecode capped it (AMX from 33 rows on), packed
    matmuls run in blocks of ROW_BLOCK rows: any row count still gives each row one result."""
    from specdecode.models import packed

    monkeypatch.setattr(packed, "_BLOCKS", {dtype: True})
    torch.manual_seed(3)
    weight = torch.randn(1536, 576).to(dtype)
    w = packed.pack_weight(weight)
    x = torch.randn(100, 576).to(dtype)
    filler = x[:FIRST_ROWS[dtype] - 1]
    alone = torch.cat([packed.packed_matmul(torch.cat([x[r:r + 1], filler]), w)[:1]
                       for r in range(100)])
    for rows in (packed.ROW_BLOCK, 33, 40, 64, 65, 99, 100):
        assert torch.equal(packed.packed_matmul(x[:rows].clone(), w), alone[:rows]), rows
    # the probe agrees with what the CPU class says (AMX: rows reduce in another order past 32)
    assert packed._row_dependent(dtype) == row_blocks(dtype)
