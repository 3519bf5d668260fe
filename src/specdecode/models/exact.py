"""The exact forward (``BatchTarget(exact=True)``): a token's logits do not depend on how many
other tokens (draft nodes, batch rows) share its forward, so speculative decoding is bitwise
identical to plain decoding in any dtype, bfloat16 and float16 included.

Where a forward's result for one token could depend on the others, the exact forward does for each
token exactly what plain decoding does for it (Thinking Machines, "Defeating Nondeterminism in LLM
Inference", 2025; vLLM's and SGLang's batch-invariant modes, here on the CPU):

- attention (``_exact_attention``): a token at position p attends over the keys up to the end of
  its ``KEY_BLOCK``-aligned block, in position order, the later ones masked (a tree node: in the
  layout of a root-to-leaf chain through it, so a tree costs a gather per chain, not per node), in
  a call shared by the row's tokens: the key length and the token's computation are functions of
  p alone, the same in every forward;
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

from specdecode.types import SpecDecodeError

MIN_ROWS = 4  # tokens per exact half-precision forward, at least (see above)
# key-length granularity of the exact attention: rows of a batch whose queries end in different
# windows need calls of their own, so wider windows mean fewer calls (26 rows of 80-600 tokens: 11
# windows of 32, 5 of 128) at the price of masked keys read (SmolLM2, one step over 26 such rows:
# 132 ms with 128 against 193 ms with 32; one row: unchanged; docs/benchmarks/window-smollm2-*)
KEY_BLOCK = 128


def default_exact(dtype: torch.dtype) -> bool:
    """The exact forward by default where exactness needs it: half precision (bfloat16, float16),
    where a token's logits otherwise depend on how many tokens share its forward. float32 keeps the
    batched forward (its differences stay far below the greedy margins met in practice; the exact
    one costs a row-by-row float32 matmul there)."""
    return dtype in (torch.bfloat16, torch.float16)


def additive(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask [..., M, length] as the float32 additive mask ``_attend`` takes, its rows padded
    to ``MIN_ROWS`` with visible ones (oneDNN may split a one-row product across threads)."""
    rows = mask.shape[-2]
    bias = torch.zeros(*mask.shape[:-2], max(rows, MIN_ROWS), mask.shape[-1])
    bias[..., :rows, :].masked_fill_(~mask, float("-inf"))
    return bias


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
            scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention as two bfloat16 matmuls around a float32 softmax, per batch of items: ``q`` [...,
    M, dim] (padded to ``bias``'s rows here), ``k`` / ``v`` [..., length, dim], ``bias`` from
    ``additive``. oneDNN's bfloat16 matmul reduces each output element in one order whatever M
    from ``MIN_ROWS`` up (measured on this CPU up to 200 rows and 4,000 keys; the tests check it
    on every run), the softmax works row by row, and the elementwise ops are exactly rounded: an
    item's result does not depend on the other items. ``softcap`` (Gemma 2): the scaled scores
    pass through softcap * tanh(scores / softcap) before the mask, as the model's eager attention
    does (here in float32; key lengths are multiples of 128, so every row runs the same vectorised
    tanh whatever the layout). Returns [..., M, dim]."""
    rows = q.shape[-2]
    if rows < bias.shape[-2]:
        q = torch.nn.functional.pad(q, (0, 0, 0, bias.shape[-2] - rows))
    if softcap is None:
        scores = torch.add(torch.matmul(q, k.transpose(-1, -2)), bias)
        probs = torch.softmax(scores.mul_(scale), dim=-1).to(q.dtype)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale / softcap)
        probs = torch.softmax(scores.tanh_().mul_(softcap).add_(bias), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)[..., :rows, :]


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """``_attend`` with a bool ``mask`` [..., M, length]."""
    return _attend(q, k, v, additive(mask.expand(*q.shape[:-1], mask.shape[-1])), scale)


def exact_attention(plan, query, key, value, scaling: float | None, window: int | None,
                    softcap: float | None = None):
    """Batch-invariant attention (``BatchTarget(exact=True)``; ``plan.exact`` from ``exact_plan``,
    ``window``: the layer's sliding window where it binds). A query at position p attends over
    ``block_end(p)`` keys laid out in position order (key t at index t: the row's own slots for a
    chain; for a tree, the committed prefix then the path of a root-to-leaf chain holding the
    node, gathered once per chain), those after p (and with a window, those at or before
    p - window) masked. Neither the key length nor the computation for an item (a token's GQA
    group of heads) depends on how many draft nodes or batch rows share the forward: the result
    for a token is the one plain decoding computes for it (Thinking Machines, "Defeating
    Nondeterminism in LLM Inference", 2025: a fixed reduction order per token). bfloat16 runs
    ``_attend``: one call per key length for the chain queries of every row, one per row and key
    length for a tree's chains; other dtypes run sdpa per row and key length with each token as
    its own batch item. Never one call per token. Masked keys are finite (the cache starts
    zeroed), so they contribute exact zeros."""
    b, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    # each query's heads as [kv heads, group, dim] (GQA), contiguous whatever b and q
    queries_ = query.transpose(1, 2).reshape(b, q, kv_heads, group, dim).contiguous()
    out = query.new_zeros(b, q, heads, dim)
    matmul = query.dtype == torch.bfloat16
    sdpa = torch.nn.functional.scaled_dot_product_attention
    memo = plan.memo  # per forward: masks and indices, made at the first layer (per window)
    if matmul:  # every row's chain queries, one call per key length across the rows
        if ("chains", window) not in memo:
            memo["chains", window] = _chain_calls(plan.exact, q, group, key.device, window)
        flat_q, flat_out = queries_.view(b * q, kv_heads, group, dim), out.view(b * q, heads, dim)
        for rows, tokens, bias, out_index, res_index in memo["chains", window]:
            n, length = bias.shape[0], bias.shape[-1]
            items = flat_q[tokens.view(-1)].view(n, -1, kv_heads, group, dim).transpose(1, 2)
            if isinstance(rows, slice):  # consecutive rows (one row, every row): a view
                keys, values = key[rows, :, :length], value[rows, :, :length]
            else:
                keys = key[:, :, :length].index_select(0, rows)
                values = value[:, :, :length].index_select(0, rows)
            res = _attend(items.reshape(n, kv_heads, -1, dim), keys, values, bias, scale,
                          softcap)
            res = res.view(n, kv_heads, -1, group, dim).transpose(1, 2).reshape(-1, heads, dim)
            flat_out[out_index] = res[res_index]
    if matmul:  # tree rows: their chains' gathered keys, one call per row and key length
        if ("trees", window) not in memo:
            memo["trees", window] = _tree_calls(plan.exact, group, kv_heads, key.device, window)
        for r, cols, gather, bias, out_cols, res_index in memo["trees", window]:
            n, t = cols.shape
            length = bias.shape[-1]
            items = queries_[r, cols.view(-1)].view(n, t, kv_heads, group, dim)
            k = key[r].index_select(1, gather).view(kv_heads * n, length, dim)
            v = value[r].index_select(1, gather).view(kv_heads * n, length, dim)
            res = _attend(items.permute(2, 0, 1, 3, 4).reshape(kv_heads * n, t * group, dim), k,
                          v, bias, scale, softcap)
            res = res.view(kv_heads, n, t, group, dim).permute(1, 2, 0, 3, 4)
            out[r, out_cols] = res.reshape(n * t, heads, dim)[res_index]
        return out, None
    if softcap is not None:
        raise SpecDecodeError(
            "attention logit soft-capping (Gemma 2) is in the exact forward for bfloat16 only: "
            "run the model in bfloat16, or in float32 without the exact forward")
    for r, calls in enumerate(plan.exact):  # other dtypes: sdpa, each token its own item
        for i, (cols, length, mask, gather) in enumerate(calls):
            if window is not None:
                if ("sdpa", window, r, i) not in memo:
                    memo["sdpa", window, r, i] = windowed(mask, window)
                mask = memo["sdpa", window, r, i]
            g, items = mask.shape[0], queries_[r, cols]  # [g, kv heads, group, dim]
            if gather is None:  # a chain: a view of the row's slots
                k, v = key[r, :, :length], value[r, :, :length]  # [kv heads, length, dim]
            else:  # a tree's chain: its keys gathered in position order
                k, v = key[r].index_select(1, gather), value[r].index_select(1, gather)
            res = sdpa(items, k.expand(g, -1, -1, -1), v.expand(g, -1, -1, -1), attn_mask=mask,
                       scale=scaling)
            out[r, cols] = res.reshape(g, heads, dim)
    return out, None


def windowed(mask: torch.Tensor, window: int) -> torch.Tensor:
    """An exact-plan mask [..., length] (key t visible iff t <= p, the query's position) with the
    keys at or before p - ``window`` hidden too (outside its sliding window)."""
    last = mask.sum(-1, keepdim=True) - 1  # p
    return mask & (torch.arange(mask.shape[-1], device=mask.device) > last - window)


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


def _columns(cols: slice | torch.Tensor) -> list[int]:
    return list(range(cols.start, cols.stop)) if isinstance(cols, slice) else cols.tolist()


def _padded(indices: list[list[int]], masks: list[torch.Tensor], length: int, group: int
            ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Entries of token indices (each with its mask [len, length]) as one call's: indices [n, t]
    (each entry padded with its first), additive mask [n, max(t * group, MIN_ROWS), length]
    (padding rows all visible), every real token's index and its index in the call's n * t."""
    t = max(len(ix) for ix in indices)  # rows below MIN_ROWS: padded by ``additive``
    tokens = torch.empty(len(indices), t, dtype=torch.long)
    visible = torch.ones(len(indices), t, length, dtype=torch.bool)
    out_index, res_index = [], []
    for i, (ix, mask) in enumerate(zip(indices, masks)):
        tokens[i] = ix[0]
        tokens[i, :len(ix)] = torch.tensor(ix)
        visible[i, :len(ix)] = mask
        out_index += ix
        res_index += range(i * t, i * t + len(ix))
    return tokens, additive(visible.repeat_interleave(group, dim=1)), out_index, res_index


def _chain_calls(plan: list, q: int, group: int, device, window: int | None) -> list:
    """The chain calls of ``plan`` (every row's), grouped by key length, as batched calls: (rows
    [n] (a slice where consecutive), token indices [n, t] into the forward's b * q tokens, additive
    mask [n, 1, rows, length], the real tokens' indices and their indices in the call's [n * t]
    results; see ``_padded``)."""
    by_length: dict[int, list] = {}
    for r, calls in enumerate(plan):
        for cols, length, mask, gather in calls:
            if gather is None:
                mask = mask[:, 0, 0].cpu()
                by_length.setdefault(length, []).append(
                    (r, [r * q + j for j in _columns(cols)],
                     mask if window is None else windowed(mask, window)))
    out = []
    for length, entries in by_length.items():
        tokens, bias, out_index, res_index = _padded([ix for _, ix, _ in entries],
                                                     [m for _, _, m in entries], length, group)
        rows = [r for r, _, _ in entries]
        rows = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) \
            else torch.tensor(rows, device=device)
        out.append((rows, *(x.to(device) for x in (tokens, bias[:, None], torch.tensor(out_index),
                                                   torch.tensor(res_index)))))
    return out


def _tree_calls(plan: list, group: int, kv: int, device, window: int | None) -> list:
    """The tree calls of ``plan`` (a row's chains, each with its gathered key layout), batched per
    row and key length: (row, token columns [n, t], gather index [n * length], additive mask
    [kv heads * n, rows, length], the real tokens' columns and their indices in the call's n * t;
    see ``_padded``)."""
    out = []
    for r, calls in enumerate(plan):
        by_length: dict[int, list] = {}
        for cols, length, mask, gather in calls:
            if gather is not None:
                mask = mask[:, 0, 0].cpu()
                by_length.setdefault(length, []).append(
                    (_columns(cols), mask if window is None else windowed(mask, window), gather))
        for length, entries in by_length.items():
            cols, bias, out_cols, res_index = _padded([js for js, _, _ in entries],
                                                      [m for _, m, _ in entries], length, group)
            bias = bias[None].expand(kv, -1, -1, -1).reshape(kv * len(entries), -1, length)
            out.append((r, cols.to(device), torch.cat([g for _, _, g in entries]).to(device),
                        bias.to(device), torch.tensor(out_cols, device=device),
                        torch.tensor(res_index, device=device)))
    return out


def block_end(position: int) -> int:
    """How many keys the exact attention lays out for a query at ``position``: up to the end of
    its ``KEY_BLOCK``-aligned block (a function of the position alone, so the same in every forward)."""
    return (position // KEY_BLOCK + 1) * KEY_BLOCK


def _tree_chains(n: int, parents: list[int]) -> list[tuple[int, list[int], list[int], list[int]]]:
    """A tree's queries (0: the pending token at position ``n``; i + 1: node i) split into
    root-to-leaf chains, each query in one chain whose path holds it (the pending token in the
    longest, or alone in a wide and shallow tree): per chain and key length, (length, its queries,
    their positions, the chain's slots after the pending token's, in position order). Parents
    precede their children."""
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    owner = [-1] * len(parents)
    chains: list[list[int]] = []
    for leaf in reversed(range(len(parents))):
        if owner[leaf] >= 0:
            continue
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            if owner[node] < 0:
                owner[node] = len(chains)
            node = parents[node]
        chains.append(path[::-1])
    members = [[(i + 1, n + depth[i]) for i in path if owner[i] == c]
               for c, path in enumerate(chains)]
    longest = max(range(len(chains)), key=lambda c: len(members[c]))
    if len(chains) > len(members[longest]):  # wide and shallow: the pending token alone
        chains.append([])                   # (every chain padded one token longer costs more)
        members.append([])
        longest = len(chains) - 1
    members[longest].insert(0, (0, n))
    out = []
    for path, queries in zip(chains, members):
        groups: dict[int, list] = {}
        for j, p in queries:
            groups.setdefault(block_end(p), []).append((j, p))
        for length, items in groups.items():
            out.append((length, [j for j, _ in items], [p for _, p in items],
                        [n + 1 + i for i in path]))
    return out


def exact_plan(lengths: list[int], drafts: list, device) -> list:
    """Per row, the calls of ``_exact_attention``: (query columns (a slice where contiguous), key
    length, mask [g, 1, 1, length] (key t visible to an item iff t <= its position), gather index
    [length] (a tree's chain: the slot holding the token at each position) or None for a chain
    row (the row's own slots)).
    Row r's query 0 is its pending token at position ``lengths[r]``, query i + 1 draft node i."""
    plan = []
    for n, draft in zip(lengths, drafts):
        if draft.is_chain():
            groups: dict[int, list] = {}
            for j in range(len(draft) + 1):
                groups.setdefault(block_end(n + j), []).append(j)
            calls = []
            for length, js in groups.items():
                positions = torch.tensor([n + j for j in js])
                mask = (torch.arange(length)[None, :] <= positions[:, None])[:, None, None]
                calls.append((slice(js[0], js[-1] + 1), length, mask.to(device), None))
            plan.append(calls)
            continue
        calls = []
        for length, js, positions, slots in _tree_chains(n, draft.parents.tolist()):
            mask = (torch.arange(length)[None, :] <= torch.tensor(positions)[:, None])
            index = torch.zeros(length, dtype=torch.long)  # key t: the token at position t
            index[:n + 1] = torch.arange(n + 1)
            tail = slots[:length - n - 1]
            index[n + 1:n + 1 + len(tail)] = torch.tensor(tail, dtype=torch.long)
            calls.append((torch.tensor(js, device=device), length,
                          mask[:, None, None].to(device), index.to(device)))
        plan.append(calls)
    return plan
