"""Prepacked half-precision linears on the CPU: the target's forward with its weights reordered once
into oneDNN's blocked layout (what inductor's weight freezing does on the CPU), so that each
bfloat16 / float16 matmul skips the per-call reorder and runs oneDNN's packed kernel.

Measured on SmolLM2-135M's shapes (2-core Zen 4, AVX512-BF16): about 2x faster for one row and
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

HALF = (torch.bfloat16, torch.float16)
_ATTR = "_specdecode_packed_linears"


def can_pack(model) -> bool:
    """Half precision on the CPU with oneDNN's packed linear available."""
    param = next(model.parameters())
    return (param.dtype in HALF and param.device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinears(TorchFunctionMode):
    """Inside this mode, ``linear`` calls on one of the model's half-precision weights run oneDNN's
    packed kernel on the prepacked copy of that weight."""

    def __init__(self, model) -> None:
        super().__init__()
        self.packed: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        with torch.no_grad():
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if isinstance(module, torch.nn.Linear) and weight is not None \
                        and weight.dtype in HALF and id(weight) not in self.packed:
                    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 4)
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
                out = torch.ops.mkldnn._linear_pointwise(flat, entry[1], bias, "none", [], "")
                return out.reshape(*x.shape[:-1], out.shape[-1])
        return func(*args, **kwargs)


def packed_linears(model) -> PackedLinears | None:
    """The model's packed linears (made on first use, kept on the model; remade if its weights
    were replaced or changed in place), or None where packing does not apply."""
    if not can_pack(model):
        return None
    current = getattr(model, _ATTR, None)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    def stale(w: torch.Tensor) -> bool:
        entry = current.packed.get(id(w)) if w.dtype in HALF else (w, None, w._version)
        return entry is None or entry[0] is not w or entry[2] != w._version

    if current is None or any(stale(w) for w in weights):
        try:
            current = PackedLinears(model)
        except RuntimeError:  # e.g. float16 packing needs AVX512-FP16 / AVX-NE-CONVERT
            return None
        setattr(model, _ATTR, current)
    return current
