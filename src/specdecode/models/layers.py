"""The lean forward's per-layer math (RMSNorm, rotary embedding, the fused matmuls, the gated MLP),
optionally through ``torch.compile`` (``compile_forward``,
``--compile``): each layer's matmuls and the elementwise work between them (RMSNorm, rotary
embedding, SiLU-gated MLP, residuals) as one compiled region from the attention output of layer i
to the queries, keys and values of layer i + 1; the cache update and the attention stay eager
between regions. Every tensor a region takes or gives is laid out by rows [M, ...] (M = batch
rows x tokens) and shapes are dynamic, so one graph serves every batch size and token count (two:
M = 1 is its own), and no step recompiles.

On the CPU the prepacked weights (``models/packed.py``) enter the graph through
the ``specdecode::packed_linear`` op (inductor lowers oneDNN's packed linear only for frozen
constant weights). Exactness is unchanged in kind: every region computes each token's row with
the same kernels whatever the token count (dynamic shapes: one kernel for all of them), and the
tests prove the batch invariance with compiling on. The compiled forward may differ from the eager
one (other kernels), so vanilla and every method must run the same one, which they do: the choice
is the model's.

Measured on SmolLM2-135M in bfloat16, 2 threads (``docs/benchmarks/compile-smollm2-bf16-cpu``):
compiling does not pay on this CPU; each compiled call costs more in guards and dispatch than the
fused elementwise work saves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdecode.models.packed import packed_matmul

_MARK = "_specdecode_compile"


def compile_forward(model, enabled: bool = True):
    """Run ``model``'s lean forward (``models/lean.py``) with its per-layer work compiled by
    ``torch.compile`` (the first forward of each kind compiles: seconds to minutes). Returns the
    model. Models the lean forward does not take keep the eager forward."""
    setattr(model, _MARK, bool(enabled))
    return model


def wants_compile(model) -> bool:
    return bool(getattr(model, _MARK, False))


@torch.library.custom_op("specdecode::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """oneDNN's packed linear as an op the compiler calls as it is."""
    return packed_matmul(x, weight, bias)


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama / Qwen2 RMSNorm, the same ops in the same order."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def layer_functions(mm: Callable) -> tuple[Callable, Callable, Callable]:
    """(pre, post, post_pre) of a layer with ``mm(x, weight, bias)`` as the matmul:
    ``pre`` gives the layer's rotated queries, keys and values; ``post`` the residual stream after
    its attention output and MLP; ``post_pre`` one layer's post then the next one's pre."""

    def pre(flat, w1, eps: float, qkv, bias, cos, sin, heads: int, kv: int, dim: int, qk=None):
        """Rows [M, hidden] (M = batch x tokens, the only size that varies) to queries, keys and
        values [M, heads, dim] ([M, kv, dim]); ``cos`` / ``sin`` [M, 1, dim]; ``qk``: the
        per-head q / k norms (weights and eps; Qwen3) applied before the rotation, or None."""
        y = mm(rms_norm(flat, w1, eps), qkv, bias).view(flat.shape[0], -1, dim)
        x = y[:, :heads + kv]  # queries and keys rotated together
        if qk is not None:
            x = torch.cat((rms_norm(x[:, :heads], qk[0], qk[2]),
                           rms_norm(x[:, heads:], qk[1], qk[2])), 1)
        half = dim // 2
        rotated = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
        return rotated[:, :heads], rotated[:, heads:], y[:, heads + kv:]

    def post(flat, out, o, w2, eps: float, gate_up, down, act):
        flat = flat + mm(out, o, None)
        gate, up = mm(rms_norm(flat, w2, eps), gate_up, None).chunk(2, dim=-1)
        return flat + mm(act(gate) * up, down, None)

    def post_pre(flat, out, o, w2, eps: float, gate_up, down, act, w1, eps1: float, qkv, bias,
                 cos, sin, heads: int, kv: int, dim: int, qk=None):
        flat = post(flat, out, o, w2, eps, gate_up, down, act)
        return (flat, *pre(flat, w1, eps1, qkv, bias, cos, sin, heads, kv, dim, qk))

    return pre, post, post_pre


def compiled_functions(pack: bool) -> tuple[Callable, Callable, Callable]:
    """``layer_functions`` compiled (dynamic shapes), with the packed op where weights are packed."""
    mm = packed_linear if pack else torch.nn.functional.linear
    return tuple(torch.compile(fn, dynamic=True) for fn in layer_functions(mm))
