"""The attention every adopted model runs: transformers' sdpa or eager attention, unchanged when
called without a plan (the user's own calls of the model), and the plan's attention when the
adapters pass one (``ForwardPlan``, the ``specdecode`` keyword; ``models/plan.py``).

``install(model)`` switches the model once to ``specdecode_sdpa`` (or ``specdecode_eager`` for a
model set to eager attention), registered with transformers' attention and mask interfaces: it is
a permanent switch made when a model is adopted, not a per-call swap, and behaves as the model's
own attention whenever no plan is given.

With a plan the attention honours each layer's sliding window: the model hands it as the
``sliding_window`` keyword (Mistral, Qwen2, Gemma 2 / 3 and most modelling code of transformers 5);
keys outside a query's window are hidden whatever the mode, the window being a function of the
query's and the key's positions (``masks.in_window``).
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from specdecode.models.exact import exact_attention
from specdecode.models.masks import causal_mask
from specdecode.models.plan import CAUSAL, CHUNKS, EXACT, SEGMENTS, ForwardPlan

SDPA, EAGER = "specdecode_sdpa", "specdecode_eager"


def _eager(module):
    """The eager attention of ``module``'s modelling file (each model family has its own)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def attend(plan: ForwardPlan, module, query, key, value, attention_mask, inner, **kwargs):
    """The attention of one layer in a planned forward; ``inner`` the model's own attention
    function (sdpa or eager). Returns (output [b, q, heads, dim], None)."""
    window = kwargs.get("sliding_window")
    plan.windows[getattr(module, "layer_idx", None)] = window
    window = plan.binding(window)
    scaling = kwargs.get("scaling")
    if plan.attention == EXACT:
        return exact_attention(plan, query, key, value, scaling, window, kwargs.get("softcap"))
    if plan.attention == SEGMENTS:
        return _segments(plan, module, query, key, value, inner, window, kwargs)
    sdpa = inner is sdpa_attention_forward
    if window is not None:
        attention_mask = plan.window_mask(attention_mask, window, query.shape[2], key.shape[2],
                                          query.dtype, query.device)
    elif plan.attention == CAUSAL and sdpa:
        return sdpa_attention_forward(module, query, key, value, None,
                                      **{**kwargs, "is_causal": True})
    if plan.attention == CHUNKS and sdpa and len(plan.chunks) > 1:
        outs = []
        for r0, r1, slots in plan.chunks:
            mask = None if attention_mask is None else attention_mask[r0:r1, ..., :slots]
            out, _ = inner(module, query[r0:r1], key[r0:r1, :, :slots], value[r0:r1, :, :slots],
                           mask, **kwargs)
            outs.append(out)
        return torch.cat(outs, 0), None
    return inner(module, query, key, value, attention_mask, **kwargs)


def _segments(plan: ForwardPlan, module, query, key, value, inner, window, kwargs):
    """Prefills of several rows in one forward (``plan.segments``). Each row's queries attend
    over its own slots exactly as its prefill alone would: plain causal sdpa on an empty row
    without a window, else ``inner`` with the causal (and window) mask of its own prefill.
    ``key`` / ``value`` are the whole cache buffers."""
    outs = []
    for row, past, offset, q in plan.segments:
        part = query[:, :, offset:offset + q]
        keys, values = key[row:row + 1, :, :past + q], value[row:row + 1, :, :past + q]
        if past == 0 and q > 1 and window is None and inner is sdpa_attention_forward:
            out, _ = sdpa_attention_forward(module, part, keys, values, None,
                                            **{**kwargs, "is_causal": True})
        else:
            memo_key = ("mask", past, q, window)
            if memo_key not in plan.memo:
                plan.memo[memo_key] = causal_mask(past, q, query.dtype, window).to(query.device)
            out, _ = inner(module, part, keys, values, plan.memo[memo_key], **kwargs)
        outs.append(out)
    return torch.cat(outs, 1), None


def _sdpa_entry(module, query, key, value, attention_mask, *args, specdecode=None, **kwargs):
    if specdecode is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    return attend(specdecode, module, query, key, value, attention_mask, sdpa_attention_forward,
                  **_keywords(args, kwargs))


def _eager_entry(module, query, key, value, attention_mask, *args, specdecode=None, **kwargs):
    inner = _eager(module)
    if specdecode is None:
        return inner(module, query, key, value, attention_mask, *args, **kwargs)
    return attend(specdecode, module, query, key, value, attention_mask, inner,
                  **_keywords(args, kwargs))


def _keywords(args: tuple, kwargs: dict) -> dict:
    """Attention arguments as keywords (transformers passes ``dropout`` and ``scaling`` by name;
    older modelling code may pass them by position)."""
    return {**dict(zip(("dropout", "scaling"), args)), **kwargs}


AttentionInterface.register(SDPA, _sdpa_entry)
AttentionInterface.register(EAGER, _eager_entry)
AttentionMaskInterface.register(SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
AttentionMaskInterface.register(EAGER, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def install(model) -> None:
    """Switch ``model`` to the planned attention (once; again if the user switched it back):
    ``specdecode_eager`` over eager attention, ``specdecode_sdpa`` over anything else (flash and
    flex attention take no tree masks)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current not in (SDPA, EAGER):
        model.set_attn_implementation(EAGER if current == "eager" else SDPA)
    # modules that keep a config of their own (a view sharing another model's layers) follow too
    for config in {id(c): c for m in model.modules()
                   if (c := getattr(m, "config", None)) is not None}.values():
        own = getattr(config, "_attn_implementation", None)
        if own not in (SDPA, EAGER, None):
            config._attn_implementation = EAGER if own == "eager" else SDPA


def attention_function(config):
    """What the lean forward calls as the attention of a model with ``config`` (installed)."""
    impl = config._attn_implementation
    return _eager_entry if impl == EAGER else _sdpa_entry
