"""What this CPU runs natively, as the forward's kernels see it: which dtype is exact and fastest
here, and which matmuls are prepacked for oneDNN (``models/packed.py``, ``models/lean.py``).

Two CPU classes meet this project (both measured on SmolLM2-135M's shapes, 2 threads):

- **AVX512-BF16** (e.g. AMD Zen 4): bfloat16 is native. The default dtype is bfloat16 for models of
  50M parameters and more, its linears prepacked (oneDNN's packed bfloat16 kernel); float32 keeps
  MKL's matmul.
- **AVX2 and FMA only**: torch cannot pack bfloat16 (its packing needs AVX512-BW/VL/DQ or
  AVX-NE-CONVERT) and bfloat16 matmuls are emulated, so the default dtype is float32, with its
  linears prepacked for oneDNN's float32 kernel: faster than MKL's for 2 rows and more (MKL's
  float32 matmul for 2-3 rows costs nearly twice its one-row time there), and each row's result
  the same whatever the row count (1 to 64 rows checked on each shape; the tests check it).

``SPECDECODE_CPU_ISA=avx2`` makes a bigger CPU take the AVX2 machines' path (the project's
checks then see no AVX-512 and no native bfloat16), so that CI on a Zen 4 machine proves that
path. It sets oneDNN's and MKL's own caps (``ONEDNN_MAX_CPU_ISA=AVX2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2``) where they are unset, so their kernels match the AVX2
machines'; both libraries read them when first used, so set the variable before starting Python.

A third class, Intel CPUs with AMX (Sapphire Rapids and later): oneDNN's packed bfloat16 kernel
reduces in another order from 33 rows on (measured on SmolLM2's shapes: rows 4-32 agree with each
other, 33 and more do not), so a token's logits would depend on how many tokens share its forward.
The exact attention's bfloat16 matmuls do the same past 32 rows. Importing specdecode therefore
caps oneDNN below AMX there (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_FP16``, where unset): exact, at a
cost (verifying 8-16 draft tokens 15-50% slower than with AMX, docs/cpus.md). Where the cap is
off (oneDNN ran before specdecode was imported, or the variable says otherwise),
``models/packed.py`` runs packed matmuls of more than 32 rows in blocks of 32 (``row_blocks``).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

from specdecode.types import SpecDecodeError

ISA_ENV = "SPECDECODE_CPU_ISA"
# the x86 flags an AVX2 machine has (what the cap keeps); everything AVX-512, AMX or AVX-VNNI goes
_AVX2_LEVEL = frozenset({"sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
                         "bmi1", "bmi2", "popcnt", "movbe", "aes", "pclmulqdq"})
_AMX_CAP = None  # the cap this module set on import (else None)
_SHOWN = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16",
          "avx_ne_convert")


def forced_isa() -> str | None:
    """``avx2`` where ``SPECDECODE_CPU_ISA`` asks for the AVX2 machines' path, else None."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if not value:
        return None
    if value != "avx2":
        raise SpecDecodeError(f"{ISA_ENV}={value!r}: the only CPU path that can be forced is "
                              "'avx2' (unset it for this CPU's own path)")
    return value


@cache
def _real_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


# oneDNN and MKL read their caps when first used: set here, on import, before any forward
if os.environ.get(ISA_ENV, "").strip().lower() == "avx2":
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")
elif "amx_bf16" in _real_flags() and "ONEDNN_MAX_CPU_ISA" not in os.environ:
    # AMX tiles reduce in another order from 33 rows on
    os.environ["ONEDNN_MAX_CPU_ISA"] = _AMX_CAP = "AVX512_CORE_FP16"


def allow_amx() -> bool:
    """For work that needs no batch invariance (training a head): lift the AMX cap this module set
    on import, so that oneDNN's bfloat16 matmuls use AMX (measured on SmolLM2's training shapes,
    2 threads: the target pass 3.7x and the head's bfloat16 training step 1.7x faster). oneDNN
    reads its cap once, when first used: call this before any matmul. True where AMX is allowed
    now (or was never capped here); False on CPUs without AMX or where the user set the cap."""
    if "amx_bf16" not in cpu_flags():
        return False
    if _AMX_CAP is not None and os.environ.get("ONEDNN_MAX_CPU_ISA") == _AMX_CAP:
        del os.environ["ONEDNN_MAX_CPU_ISA"]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "DEFAULT").upper()
    return cap in ("DEFAULT", "ALL") or "AMX" in cap


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the project sees them (capped by ``SPECDECODE_CPU_ISA``)."""
    flags = _real_flags()
    return flags & _AVX2_LEVEL if forced_isa() == "avx2" else flags


def native_bf16() -> bool:
    """Native bfloat16 matmuls (AVX512-BF16 or AMX)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _has_mkldnn_linear() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packs(dtype: torch.dtype) -> bool:
    """Whether linears of ``dtype`` run prepacked for oneDNN on this CPU: bfloat16 where torch can
    pack it (AVX512-BW/VL/DQ or AVX-NE-CONVERT), float16 where it may (AVX512-FP16 or
    AVX-NE-CONVERT; ``models/packed.py`` still tries it), float32 where bfloat16 is not native
    (there oneDNN's float32 kernel is both faster than MKL's and row-invariant)."""
    if not _has_mkldnn_linear():
        return False
    flags = cpu_flags()
    if dtype == torch.bfloat16:
        return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    if dtype == torch.float16:
        return "avx512_fp16" in flags or "avx_ne_convert" in flags or "amx_fp16" in flags
    if dtype == torch.float32:
        return "avx2" in flags and not native_bf16()
    return False


def row_blocks(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed matmuls of ``dtype`` change their reduction order past 32 rows on
    this CPU (AMX tiles: bfloat16 with AMX-BF16, float16 with AMX-FP16) and oneDNN is not capped
    below AMX."""
    flags = cpu_flags()
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith(("AVX512_CORE", "AVX10_1_512")) \
            and "AMX" not in os.environ["ONEDNN_MAX_CPU_ISA"].upper():
        return False
    return (dtype == torch.bfloat16 and "amx_bf16" in flags) or (
        dtype == torch.float16 and "amx_fp16" in flags)


def cpu_path() -> str:
    """One line for reports: the path the forward takes here and the flags that chose it."""
    flags = cpu_flags()
    shown = " ".join(f for f in _SHOWN if f in flags) or "none of " + " ".join(_SHOWN)
    if native_bf16():
        path = "AVX512-BF16 path (bfloat16 native, packed" + (
            ", AMX in 32-row blocks)" if row_blocks(torch.bfloat16) else
            ", oneDNN capped below AMX)" if "amx_bf16" in flags else ")")
    elif "avx2" in flags:
        path = "AVX2 path (float32, packed for oneDNN)"
    else:
        path = "generic path (stock kernels)"
    forced = f", forced by {ISA_ENV}=avx2" if forced_isa() else ""
    return f"{path}{forced}; ISA flags: {shown}"
