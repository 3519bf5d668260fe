"""The exact forward (``BatchTarget(exact=True)``): a token's logits do not depend on how many
other tokens (draft nodes, batch rows) share its forward, so speculative decoding is bitwise
identical to plain decoding in any dtype, bfloat16 and float16 included.

Where a forward's result for one token could depend on the others, the exact forward does for each
token exactly what plain decoding does for it (Thinking Machines, "Defeating Nondeterminism in LLM
Inference", 2025; vLLM's and SGLang's batch-invariant modes, here on the CPU):

- attention (``_exact_attention``): one call per query token over exactly the keys it sees, in
  position order and with no mask, the call plain decoding makes for that token;
- matmuls: half-precision matmuls on the CPU (oneDNN) take another reduction order for the
  smallest row counts (measured: one row for SmolLM2's 1536-wide down projection, up to two for a
  64-wide one), then one order whatever the count (checked up to 600 rows on SmolLM2's layers and
  by the tests on random models), so a step never runs fewer than ``MIN_ROWS`` tokens
  (``BatchTarget.step`` pads it with masked dummy nodes); float32 matmuls on the CPU (MKL) change
  their reduction order with the row count, so under ``ExactMatmul`` every float32 linear runs row
  by row (each row is then the same one-row product plain decoding computes).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface

from specdecode.models.attention import _FORWARD, EXACT_ATTENTION

MIN_ROWS = 4  # tokens per exact half-precision forward, at least (see above)


def default_exact(dtype: torch.dtype) -> bool:
    """The exact forward by default where exactness needs it: half precision (bfloat16, float16),
    where a token's logits otherwise depend on how many tokens share its forward. float32 keeps the
    batched forward (its differences stay far below the greedy margins met in practice; the exact
    one costs a row-by-row float32 matmul there)."""
    return dtype in (torch.bfloat16, torch.float16)


def _exact_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """Batch-invariant attention (``BatchTarget(exact=True)``): every query token attends through
    its own call, over exactly the keys it sees laid out in position order (slots 0..p of its row
    for a chain; the committed prefix, then its tree path, for a tree node), with no mask: the
    very call plain decoding makes for that token at that position. Its result therefore does not
    depend on how many draft nodes or batch rows share the forward (Thinking Machines, "Defeating
    Nondeterminism in LLM Inference", 2025: fixed reduction order per token). ``_FORWARD.exact``:
    per row, (its committed length + 1, [(query column, tree path slots or None)])."""
    b, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    # each query's heads as [kv heads, group, dim] rows (GQA), contiguous whatever b and q: the
    # kernel sees the same layout for a token in any forward
    queries_ = query.transpose(1, 2).reshape(b, q, kv_heads, heads // kv_heads, dim).contiguous()
    out = query.new_zeros(b, q, heads, dim)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for r, (prefix, queries) in enumerate(_FORWARD.exact):
        keys, values, scratch = key[r:r + 1], value[r:r + 1], None
        for j, path in queries:
            if path is None:  # a chain node (or the pending token): a view of its row's slots
                k, v = keys.narrow(2, 0, prefix + j), values.narrow(2, 0, prefix + j)
            else:  # a tree node: the prefix, then its ancestors and itself, in a scratch row
                if scratch is None:
                    scratch = (keys.new_empty(keys.shape), values.new_empty(values.shape))
                    scratch[0][:, :, :prefix] = keys[:, :, :prefix]
                    scratch[1][:, :, :prefix] = values[:, :, :prefix]
                end = prefix + len(path)
                scratch[0][:, :, prefix:end] = keys.index_select(2, path)
                scratch[1][:, :, prefix:end] = values.index_select(2, path)
                k, v = scratch[0][:, :, :end], scratch[1][:, :, :end]
            out[r, j] = sdpa(queries_[r, j, None], k, v, scale=scaling).view(heads, dim)
    return out, None


AttentionInterface.register(EXACT_ATTENTION, _exact_attention)


class ExactMatmul(TorchFunctionMode):
    """Inside this mode (this thread only), float32 ``linear`` / ``addmm`` calls over several rows
    run one row at a time."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x = args[0]
            if x.dtype == torch.float32 and x.numel() > x.shape[-1]:
                flat = x.reshape(-1, x.shape[-1])
                rows = [func(flat[i:i + 1], *args[1:], **kwargs) for i in range(flat.shape[0])]
                return torch.cat(rows).reshape(*x.shape[:-1], -1)
        elif func is torch.addmm:  # GPT-2's Conv1D: addmm(bias, x, weight)
            bias, x = args[0], args[1]
            if x.dtype == torch.float32 and x.shape[0] > 1:
                rows = [func(bias, x[i:i + 1], *args[2:], **kwargs) for i in range(x.shape[0])]
                return torch.cat(rows)
        return func(*args, **kwargs)


def exact_plan(lengths: list[int], drafts: list, device) -> list:
    """Per row: (committed length + 1, [(query column, None for a chain node, else the slots of its
    tree path in depth order)]), for ``_exact_attention``."""
    plan = []
    for length, draft in zip(lengths, drafts):
        prefix = length + 1
        if draft.is_chain():
            plan.append((prefix, [(j, None) for j in range(len(draft) + 1)]))
            continue
        parents = draft.parents.tolist()
        queries: list = [(0, None)]
        for i in range(len(parents)):
            path, node = [], i
            while node >= 0:
                path.append(prefix + node)
                node = parents[node]
            queries.append((i + 1, torch.tensor(path[::-1], device=device)))
        plan.append((prefix, queries))
    return plan
