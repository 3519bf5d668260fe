"""Adopting a model: the checks every model passes (``check_model``), what both adapters read
from it (``Adapter``), its layers' sliding windows (``layer_windows``) and the check after a
planned forward that every layer's attention ran through the plan with the window its config
declares (``Adapter.checked``). The adapters themselves: ``models/target.py`` (``BatchTarget``, the
engine's target) and ``models/draft.py`` (``HFModel``, draft models)."""

from __future__ import annotations

import inspect

from specdecode.models.attention import install
from specdecode.models.plan import ForwardPlan
from specdecode.types import SpecDecodeError


def cache_arg(model) -> str:
    """How ``model.forward`` names its KV cache (5.25 renamed ``past_key_values``; it warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fresh_cache(model) -> dict:
    """A new ``DynamicCache`` for ``model``, as keywords (decoding loops outside the engine)."""
    from transformers import DynamicCache

    return {cache_arg(model): DynamicCache()}


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# layer kinds whose attention sees only a window of recent keys (transformers' names:
# "sliding_attention", "chunked_attention", "hybrid_sliding", "reference_sliding_attention", the
# sliding-masked "compressed_sparse_attention" / "heavily_compressed_attention", GPT-Neo's "local")
WINDOWED_LAYERS = ("sliding", "chunk", "window", "local", "compressed")
# what configs call a window's size, first match wins (GPT-Neo: window_size; Llama 4: chunks)
WINDOW_SIZES = ("sliding_window", "window_size", "attention_chunk_size")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _positive(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _windows(config, model=None) -> list[tuple[str, int | None]]:
    """(where, size) of every window ``config`` (and its text config) or ``model``'s modules
    declare, binding or not; size None: a windowed layer kind whose size the config does not
    give."""
    found: list[tuple[str, int | None]] = []
    text = _text_config(config)
    for cfg in [config] + ([text] if text is not config else []):  # composite: text part nested
        kinds = {(name, str(k)) for name in ("layer_types", "attention_layers")
                 for k in (getattr(cfg, name, None) or [])}
        windowed = sorted((n, k) for n, k in kinds if any(w in k.lower() for w in WINDOWED_LAYERS))
        for name, kind in windowed:
            sizes = ("attention_chunk_size",) if "chunk" in kind.lower() else WINDOW_SIZES
            size = next((v for v in (_positive(getattr(cfg, n, None)) for n in sizes) if v), None)
            found.append((f"{name} {kind!r}", size))
        if windowed:
            continue
        for name in ("sliding_window", "attention_chunk_size"):
            size = _positive(getattr(cfg, name, None))
            if size is None or (name == "sliding_window"
                                and getattr(cfg, "use_sliding_window", None) is False):
                continue  # switched off (SmolLM3 keeps the size; Qwen2 / Qwen3 clear it)
            if name == "sliding_window" and kinds and _per_layer(model):
                continue  # the layers chose, by layer_types, and none of them is windowed
            found.append((f"config.{name}", size))
    for module_name, module in ([] if model is None else model.named_modules()):
        for name in ("sliding_window", "attention_chunk_size"):
            size = _positive(getattr(module, name, None))
            if size is not None:
                found.append((f"{module_name or 'the model'}.{name}", size))
    return found


def _per_layer(model) -> bool:
    """Whether ``model``'s attention modules carry their own window, none of them set: the
    modelling code picked each layer's window from ``layer_types`` (Qwen2 with
    ``use_sliding_window`` but every layer below ``max_window_layers``). Models that read
    ``config.sliding_window`` for every layer (Mistral, Mixtral, Phi-3) carry none."""
    if model is None:
        return False
    own = [m.sliding_window for m in model.modules() if hasattr(m, "sliding_window")]
    return bool(own) and not any(_positive(size) for size in own)


def attention_window(config, model=None) -> int | None:
    """The smallest sliding (or chunked) attention window that binds in ``config`` (or its
    ``get_text_config()``) and, given ``model``, in its modules; None where attention is full.

    Read from windowed ``layer_types`` (Gemma 2/3, Cohere 2, GPT-OSS, Ministral, Qwen2 layers
    from ``max_window_layers`` on, Llama 4's chunks), GPT-Neo's "local" ``attention_layers``,
    ``config.sliding_window`` unless ``use_sliding_window`` is False (Mistral, Mixtral, Phi-3,
    Starcoder2, Qwen3-MoE), ``config.attention_chunk_size`` and per-layer ``sliding_window``
    attributes of the modules. A window at least as long as the context
    (``max_position_embeddings``) never binds: the engine never lets a sequence grow past the
    context, so a query and its farthest key stay less than a window apart. Such a window is
    inactive (Mistral-style configs with the window equal to the context). 0: a windowed layer
    kind whose size the config does not give (still active). The context is the one the engine
    keeps to, ``context_length(config)``: a composite config without one of its own (only its
    text part has it) binds every window."""
    limit = context_length(config)
    sizes = [size or 0 for _, size in _windows(config, model) if _binds(size, limit)]
    return min(sizes) if sizes else None


def _binds(size: int | None, limit: int | None) -> bool:
    return size is None or limit is None or size < limit


def _label(config, model, what: str) -> str:
    text = _text_config(config)
    kind = getattr(text, "model_type", None) or getattr(config, "model_type", None) or \
        getattr(config, "kind", None) or type(model or config).__name__
    return what if str(kind) in what else f"{what} ({kind})"


def _followed(where: str, size: int | None) -> bool:
    """Whether the planned attention follows a window declared at ``where``: a sliding window of
    known size, from ``sliding_window`` or "sliding_attention" layers (chunked attention, GPT-Neo's
    local layers and other windowed layer kinds are not)."""
    return bool(size) and ("'sliding_attention'" in where or where.endswith(".sliding_window"))


def check_window(config, model=None, what: str = "the model") -> None:
    """``SpecDecodeError`` where ``config`` (or ``model``'s modules) declare a window that binds and
    that the planned attention does not follow (``_followed``)."""
    limit = context_length(config)
    other = [(where, size) for where, size in _windows(config, model)
             if _binds(size, limit) and not _followed(where, size)]
    if not other:
        return
    where = ", ".join(sorted({w for w, _ in other})[:3]) + (
        f" and {len(other) - 3} more" if len(other) > 3 else "")
    sizes = sorted({size or 0 for _, size in other})
    size = f"a window of {sizes[0]} tokens" if sizes[0] else "a window of unknown size"
    raise SpecDecodeError(
        f"{_label(config, model, what)} uses windowed attention that specdecode does not follow "
        f"({size}, from {where}{f'; context {limit}' if limit else ''}): sliding windows (from "
        "sliding_window or 'sliding_attention' layers) are supported; chunked attention and other "
        "windowed layer kinds are not yet. A window at least as long as the context is accepted.")


def layer_windows(model) -> dict[int, int]:
    """Per layer index, the sliding window that binds (shorter than the context), as ``model``'s
    config declares it: ``layer_types``' "sliding_attention" layers take ``sliding_window`` (Gemma
    2 / 3, Qwen2 / Qwen3 from ``max_window_layers`` on, Cohere 2, Ministral); without layer types,
    ``sliding_window`` holds for every layer unless ``use_sliding_window`` is False (Mistral,
    Mixtral, Phi-3, Starcoder2). What each layer's attention must be handed (``Adapter.checked``)."""
    config = _text_config(model.config)
    limit = context_length(model.config)
    size = _positive(getattr(config, "sliding_window", None))
    if size is None or not _binds(size, limit):
        return {}
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return {i: size for i, kind in enumerate(kinds) if kind == "sliding_attention"}
    if getattr(config, "use_sliding_window", None) is False:
        return {}
    return {i: size for i in range(int(getattr(config, "num_hidden_layers", 0) or 0))}


def check_model(model, what: str = "the model") -> None:
    """Refuse the models whose cache cannot follow a tree path or whose windows the planned
    attention does not follow (``what`` names the model in the error); switch the model to the
    planned attention (``models/attention.py``)."""
    config = model.config
    check_window(config, model, what)
    if getattr(config, "is_encoder_decoder", False):
        raise SpecDecodeError("encoder-decoder models are not supported; give a causal LM")
    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()):
        raise SpecDecodeError(f"{_label(config, model, what)} takes no keyword arguments in its "
                              "forward, so its attention cannot be given a plan: not supported")
    install(model)


class Adapter:
    """What both adapters know of their model, and the check after each planned forward."""

    role = "the target model"  # how errors name the model (``HFModel``: a draft)

    def __init__(self, model) -> None:
        check_model(model, self.role)
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = context_length(model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        params = inspect.signature(model.forward).parameters
        self.can_slice_logits = "logits_to_keep" in params
        self.cache_arg = cache_arg(model)
        self.windows = layer_windows(model)
        self.attention_layers = sum(1 for m in model.modules() if hasattr(m, "layer_idx")
                                    and "Attention" in type(m).__name__)

    def checked(self, plan: ForwardPlan) -> None:
        """After a planned forward: every attention layer ran through the plan, each with the
        sliding window its config declares (a model whose layers bypass the planned attention, or
        hand it other windows than their config says, would decode wrong: refused)."""
        seen = plan.windows
        if len(seen) == self.attention_layers and all(
                self.windows.get(layer) == (size if _binds(size, self.max_length) else None)
                for layer, size in seen.items()):
            return
        label = _label(self.model.config, self.model, self.role)
        if len(seen) != self.attention_layers:
            raise SpecDecodeError(
                f"{label}: {len(seen)} of its {self.attention_layers} attention layers ran "
                "through specdecode's attention (the others bypass the attention interface); "
                "this model is not supported")
        wrong = {layer: size for layer, size in seen.items() if self.windows.get(layer) != (
            size if _binds(size, self.max_length) else None)}
        raise SpecDecodeError(
            f"{label}: its layers hand their attention other sliding windows ({wrong}) than its "
            f"config declares ({self.windows or 'none'}); not supported")
