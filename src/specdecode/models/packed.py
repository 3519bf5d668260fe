"""Prepacked linears on the CPU: the target's forward with its weights reordered once into
oneDNN's blocked layout (what inductor's weight freezing does on the CPU), so that each matmul
skips the per-call reorder and runs oneDNN's packed kernel: bfloat16 / float16 where the CPU packs
them, float32 on CPUs without native bfloat16 (``models/cpu.py`` says which, per CPU).

Measured on SmolLM2-135M's shapes in bfloat16 (2-core Zen 4, AVX512-BF16): about 2x faster for one row and
1.2-1.5x for 4-16 rows than ``torch.nn.functional.linear`` on the same weights. Exactness is
unchanged: like the plain kernel, the packed one reduces each row in one order for every row count
from ``models.exact.MIN_ROWS`` up (checked up to 80 rows on each of SmolLM2's shapes; the tests
check it on random models), and the exact forward never runs fewer rows. Vanilla decoding and every
method go through the same path, so their outputs stay identical to each other; they may differ
from the same model run without packing (another kernel), as any two kernels do.

``BatchTarget`` enters ``PackedLinears`` around its forward (the model itself is not modified:
other users of it, e.g. transformers' ``generate`` in the benchmark, keep the stock path). The
packed copies are made once per model and kept on it (``packed_linears``).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from specdecode.models.cpu import packs, row_blocks

_ATTR = "_specdecode_packed_linears"
BATCH_HINT = 4  # the row count oneDNN lays the packed weight out for (any count runs on it)


def can_pack(model) -> bool:
    """The model on the CPU in a dtype whose linears this CPU runs prepacked (``models/cpu.py``)."""
    param = next(model.parameters())
    return param.device.type == "cpu" and packs(param.dtype)


ROW_BLOCK = 32  # rows one oneDNN kernel serves on every x86 CPU seen (AMX takes over above)
_BLOCKS: dict[torch.dtype, bool] = {}  # dtype -> whether matmuls must be split into row blocks


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered for ``packed_matmul``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _row_dependent(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed kernel gives a row another result among 64 rows than among 4 (AMX
    from 33 rows on, ``models/cpu.py``: there ``row_blocks`` says so without asking)."""
    gen = torch.Generator().manual_seed(0)
    weight = pack_weight(torch.randn(1536, 576, generator=gen).to(dtype))  # SmolLM2's MLP
    x = torch.randn(64, 576, generator=gen).to(dtype)
    alone = torch.cat([_linear(x[r:r + 4], weight, None)[:1] for r in range(0, 64, 7)])
    return not torch.equal(_linear(x, weight, None)[::7], alone)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``linear(x, weight, bias)`` for rows ``x`` [M, in] on ``pack_weight(weight)``: each row's
    result the same whatever M (from ``models.exact.MIN_ROWS`` rows up in half precision)."""
    if x.shape[0] > ROW_BLOCK:
        blocks = _BLOCKS.get(x.dtype)
        if blocks is None:
            blocks = _BLOCKS[x.dtype] = row_blocks(x.dtype) or _row_dependent(x.dtype)
        if blocks:  # blocks of ROW_BLOCK rows, the last one overlapping the one before it
            out, done, rows = [], 0, x.shape[0]
            while done < rows:
                start = min(done, rows - ROW_BLOCK)
                out.append(_linear(x[start:start + ROW_BLOCK], packed, bias)[done - start:])
                done = start + ROW_BLOCK
            return torch.cat(out)
    return _linear(x, packed, bias)


def _linear_weights(model) -> list[tuple[torch.Tensor, bool]]:
    """(weight, stored [in, out]) of the model's linears: ``nn.Linear`` and GPT-2's ``Conv1D``
    (``addmm(bias, x, weight)``; the stock half-precision kernel for it may change its reduction
    order with the row count: 22 rows and more on a 32 x 32 float16 weight, AVX512-FP16 CPU)."""
    out = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            if isinstance(module, torch.nn.Linear):
                out.append((weight, False))
            elif type(module).__name__ == "Conv1D":
                out.append((weight, True))
    return out


class PackedLinears(TorchFunctionMode):
    """Inside this mode, ``linear`` calls (and GPT-2's ``Conv1D`` ``addmm`` calls) on one of the
    model's packable weights run oneDNN's packed kernel on the prepacked copy of that weight."""

    def __init__(self, model) -> None:
        super().__init__()
        self.packed: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        with torch.no_grad():
            for weight, transposed in _linear_weights(model):
                if packs(weight.dtype) and id(weight) not in self.packed:
                    packed = pack_weight(weight.t().contiguous() if transposed else weight)
                    self.packed[id(weight)] = (weight, packed, weight._version)

    def __deepcopy__(self, memo: dict) -> None:  # a copied model packs its own weights
        return None

    def __reduce__(self):  # nor are packed weights pickled with a model
        return (type(None), ())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            entry = self.packed.get(id(args[1]))
            x = args[0]
            if entry is not None and entry[0] is args[1] and x.dtype == args[1].dtype \
                    and not x.requires_grad:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                flat = x.reshape(-1, x.shape[-1])
                out = packed_matmul(flat, entry[1], bias)
                return out.reshape(*x.shape[:-1], out.shape[-1])
        elif func is torch.addmm and len(args) == 3 and not kwargs:  # Conv1D: bias + x @ weight
            bias, x, weight = args
            entry = self.packed.get(id(weight))
            if entry is not None and entry[0] is weight and x.dtype == weight.dtype \
                    and bias.dim() == 1 and not x.requires_grad:
                return packed_matmul(x, entry[1], bias)
        return func(*args, **kwargs)


def packed_linears(model) -> PackedLinears | None:
    """The model's packed linears (made on first use, kept on the model; remade if its weights
    were replaced or changed in place), or None where packing does not apply."""
    if not can_pack(model):
        return None
    current = getattr(model, _ATTR, None)
    weights = [w for w, _ in _linear_weights(model)]
    def stale(w: torch.Tensor) -> bool:
        entry = current.packed.get(id(w)) if packs(w.dtype) else (w, None, w._version)
        return entry is None or entry[0] is not w or entry[2] != w._version

    if current is None or any(stale(w) for w in weights):
        try:
            current = PackedLinears(model)
        except RuntimeError:  # e.g. float16 packing needs AVX512-FP16 / AVX-NE-CONVERT
            return None
        setattr(model, _ATTR, current)
    return current
