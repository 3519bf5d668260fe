"""Trained drafter heads that read the target's features (its last hidden states): their networks,
and saving / loading them (``head.safetensors`` in fp16 + ``head.json``).

- ``EagleHead`` follows EAGLE-1 (Li et al., "EAGLE: Speculative Sampling Requires Rethinking
  Feature Uncertainty", ICML 2024): ``fc`` maps [embedding of token t+1; feature f_t] to the model
  width, then one pre-norm decoder layer (RoPE self-attention + SwiGLU MLP) predicts the feature
  f_{t+1}; the target's own (frozen) LM head turns it into token probabilities. It runs
  autoregressively over features, with its own KV cache.
- ``MedusaHeads`` follows Medusa-1 (Cai et al., "Medusa: Simple LLM Inference Acceleration
  Framework with Multiple Decoding Heads", ICML 2024): head d (1..K) is a residual SiLU block and
  its own LM head on f_t, predicting token t+1+d; the target is frozen.

The target's embeddings and LM head are never stored here: heads are loaded against a target
(``resolve_head``: a directory, a module, or the head shipped for the target, kept in the host) and
read out through its LM head, over the whole vocabulary or a reduced one (``DraftVocab``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from specdecode.models.adopt import attention_window, check_window, context_length
from specdecode.sampling import draft_distribution
from specdecode.types import SpecDecodeError

HEAD_FILE, CONFIG_FILE = "head.safetensors", "head.json"
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "heads"  # heads/<model>/<kind>
HOST_KEY = "heads"  # the host's loaded heads: (kind, directory, mtime, dtype, device) -> (head, config)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` [B, heads, T, d] at ``positions`` [B, T] (halves
    rotated, as Llama does)."""
    half = x.size(-1) // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = positions.float()[:, None, :, None] * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def decoder_layer(head: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                  positions: torch.Tensor, visible: torch.Tensor,
                  past: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The draft heads' decoder layer (``head``'s ``qkv``, ``out``, ``mlp_norm``, ``gate_up``,
    ``down``): RoPE self-attention of the inputs ``x`` [B, T, *] over the ``past`` keys then their
    own (``visible``), added to ``residual`` [B, T, H], then the SwiGLU MLP. Returns the new
    hidden states and the T inputs' (keys, values)."""
    b, t, h = residual.shape
    q, k, v = head.qkv(x).view(b, t, 3, head.heads, head.head_dim).unbind(2)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))
    q, k = rotary(q, positions, head.theta), rotary(k, positions, head.theta)
    new = (k, v)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
    hidden = residual + head.out(attn.transpose(1, 2).reshape(b, t, h))
    gate, up = head.gate_up(head.mlp_norm(hidden)).chunk(2, -1)
    return hidden + head.down(nn.functional.silu(gate) * up), new


class EagleHead(nn.Module):
    """One EAGLE-1 draft layer. ``forward(embeds, features, positions, visible, past)``: inputs
    [B, T, H] (token embeddings and the features they follow), absolute positions [B, T],
    ``visible`` [B, T, P + T] (bool: which of the ``past`` keys then the new ones each input sees)
    and ``past`` (keys, values) [B, heads, P, d] or None. Returns the predicted features [B, T, H]
    and the new (keys, values) of the T inputs."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 rope_theta: float = 10000.0, eps: float = 1e-6) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise SpecDecodeError(f"hidden_size {hidden_size} is not a multiple of num_heads "
                                  f"{num_heads}")
        self.config = {"kind": "eagle", "hidden_size": hidden_size, "num_heads": num_heads,
                       "intermediate_size": intermediate_size, "rope_theta": rope_theta,
                       "eps": eps}
        self.heads, self.head_dim, self.theta = num_heads, hidden_size // num_heads, rope_theta
        self.fc = nn.Linear(2 * hidden_size, hidden_size)
        self.attn_norm = RMSNorm(hidden_size, eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = RMSNorm(hidden_size, eps)
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                visible: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x = self.fc(torch.cat([embeds, features], -1))
        return decoder_layer(self, self.attn_norm(x), x, positions, visible, past)

    feature_layers = None  # the target's final-normed last hidden states

    def lift(self, target_features: torch.Tensor) -> torch.Tensor:
        return target_features

    def readout(self, target_model, vocab: torch.Tensor | None = None) -> DraftVocab:
        """Through the target's own LM head, over ``vocab`` (None: the whole vocabulary)."""
        return DraftVocab(target_model.get_output_embeddings().weight, vocab)


class MedusaHeads(nn.Module):
    """K Medusa-1 heads: ``forward(features [..., H])`` -> logits [K, ..., V]; head d predicts
    the token d + 1 places after the one the target's own head predicts. With ``tied``, every head
    reads out through the target's own LM head (``tie``; frozen, never saved): only the residual
    blocks are trained and stored, a few MB where K vocabulary-sized matrices would be hundreds
    (a large vocabulary's read-out is most of an untied head)."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int,
                 tied: bool = False) -> None:
        super().__init__()
        self.config = {"kind": "medusa", "hidden_size": hidden_size, "vocab_size": vocab_size,
                       "num_heads": num_heads, **({"tied": True} if tied else {})}
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        self.tied = tied
        self.shared: torch.Tensor | None = None  # tied: the target's LM head weight
        if not tied:
            self.lm_heads = nn.ModuleList(nn.Linear(hidden_size, vocab_size, bias=False)
                                          for _ in range(num_heads))
        for block in self.blocks:  # a block starts as the identity (Medusa's zero init)
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def init_from(self, lm_head: nn.Module) -> None:
        """Every head's LM head starts as the target's (Medusa-1)."""
        with torch.no_grad():
            for head in self.lm_heads:
                head.weight.copy_(lm_head.weight)

    def tie(self, lm_head: nn.Module) -> None:
        """Tied heads: read out through ``lm_head`` (the target's; a plain tensor here, so it is
        neither trained nor saved)."""
        self.shared = lm_head.weight.detach()

    def readout_weights(self) -> list[torch.Tensor]:
        """Each head's read-out matrix [V, H]."""
        if self.tied:
            if self.shared is None:
                raise SpecDecodeError("tied Medusa heads need the target's LM head (tie())")
            return [self.shared] * len(self.blocks)
        return [head.weight for head in self.lm_heads]

    def forward(self, features: torch.Tensor, weights: list[torch.Tensor] | None = None
                ) -> torch.Tensor:
        """``weights``: read-out matrices to use instead of ``readout_weights()`` (e.g. rows for
        a subset of the vocabulary)."""
        weights = self.readout_weights() if weights is None else weights
        return torch.stack([nn.functional.linear(features + nn.functional.silu(block(features)),
                                                 weight.to(features.dtype))
                            for block, weight in zip(self.blocks, weights)])


def head_target_info(target_model) -> dict:
    """What a head must match in its target."""
    emb = target_model.get_input_embeddings().weight
    return {"hidden_size": int(emb.shape[1]), "vocab_size": int(emb.shape[0])}


PROBE_VALUES = 256


def weights_probe(target_model) -> list[float]:
    """``PROBE_VALUES`` input-embedding values spread over the matrix, in fp32: what ties a head to
    the weights it was trained on (the same model in another dtype matches within rounding)."""
    flat = target_model.get_input_embeddings().weight.detach().flatten()
    step = max(1, flat.numel() // PROBE_VALUES)
    return [round(float(v), 6) for v in flat[::step][:PROBE_VALUES].float().cpu()]


def probe_matches(probe: list[float] | None, target_model) -> bool:
    """Whether ``probe`` (from a head's config) was taken from ``target_model``'s weights (1% and
    1e-3 tolerance: bf16 and fp16 copies of the same weights match, other models do not)."""
    if not probe:
        return False
    mine = torch.tensor(weights_probe(target_model))
    theirs = torch.tensor(probe, dtype=torch.float32)
    return mine.shape == theirs.shape and bool(torch.allclose(mine, theirs, rtol=1e-2, atol=1e-3))


def shipped_dir(root: Path, kind: str, target_model) -> Path | None:
    """The ``root/<model>/<kind>`` directory whose ``head.json`` probe matches ``target_model``'s
    weights (``probe_matches``: never one trained for another model), or None."""
    for config_file in sorted(Path(root).glob(f"*/{kind}/{CONFIG_FILE}")):
        try:
            probe = json.loads(config_file.read_text()).get("target_probe")
        except (OSError, ValueError):
            continue
        if probe_matches(probe, target_model):
            return config_file.parent
    return None


def save_head(head: nn.Module, out: Path, target_model, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(out / HEAD_FILE))
    config = {**head.config, "target": head_target_info(target_model),
              "target_probe": weights_probe(target_model), **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def load_head(directory: Path | str, kind: str, target_model) -> tuple[nn.Module, dict]:
    """A head saved by ``save_head``, in fp32, checked against ``target_model``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() or not (directory / HEAD_FILE).exists():
        raise SpecDecodeError(f"no {kind} head in {str(directory)!r} (expected {CONFIG_FILE} and "
                              f"{HEAD_FILE}; train one with `specdecode train-drafter --kind "
                              f"{kind}`)")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("kind") != kind and not (kind, config.get("kind")) == ("eagle", "eagle3"):
        raise SpecDecodeError(f"{str(directory)!r} holds a {config.get('kind')!r} head, not {kind!r}")
    wanted = head_target_info(target_model)
    if config.get("target", {}) | wanted != config.get("target", {}):
        raise SpecDecodeError(f"the {kind} head in {str(directory)!r} was trained for a target with "
                              f"{config.get('target')}; this target has {wanted}")
    head = build_head(config)
    head.load_state_dict({k: v.float() for k, v in load_file(str(directory / HEAD_FILE)).items()})
    if getattr(head, "tied", False):
        head.tie(target_model.get_output_embeddings())
    return head.eval(), config


def shipped_head_dir(kind: str, target_model) -> Path | None:
    """The shipped head of ``kind`` for ``target_model``, else None: the demo target's, or one in
    ``SHIPPED_HEADS/<model>/<kind>`` whose weights probe matches this target's weights
    (``probe_matches``: never a head trained for another model)."""
    from specdecode.demo import demo_dir

    source = getattr(target_model, "name_or_path", "") or ""
    demo = demo_dir()
    try:
        is_demo = Path(source).resolve() == (demo / "target").resolve()
    except OSError:
        is_demo = False
    if is_demo:
        return demo / kind if (demo / kind).is_dir() else None
    return shipped_dir(SHIPPED_HEADS, kind, target_model)


def resolve_head(kind: str, head, target_model, loaded: dict | None = None):
    """(head module, config) from ``head``: a directory, a head module (tests), or None (the head
    shipped for this target, ``shipped_head_dir``); in the target's dtype. Heads loaded from a
    directory are kept in ``loaded`` (the host's ``HOST_KEY`` dict, read-only once loaded) and
    shared by its requests. A windowed target or a head whose config declares a window is refused
    (``check_head``)."""
    loaded = {} if loaded is None else loaded
    param = next(target_model.parameters())
    if isinstance(head, torch.nn.Module):
        check_head(kind, head.config, target_model)
        return head.to(dtype=param.dtype, device=param.device).eval(), head.config
    directory = head if head is not None else (  # the eagle drafter: an EAGLE-3 head first
        kind == "eagle" and shipped_head_dir("eagle3", target_model)) or shipped_head_dir(
        kind, target_model)
    if directory is None:
        raise SpecDecodeError(f"the {kind} drafter needs a head trained for this target: "
                              f"{kind}:head=DIR (train one with `specdecode train-drafter --kind "
                              f"{kind} --target ... --out DIR`); heads are built in for the "
                              f"demo target and the models under {SHIPPED_HEADS} only")
    directory = Path(directory).resolve()
    weights = directory / HEAD_FILE
    stamp = weights.stat().st_mtime if weights.exists() else 0
    key = (kind, str(directory), stamp, param.dtype, str(param.device))
    if key not in loaded:
        module, config = load_head(directory, kind, target_model)
        check_head(kind, config, target_model)
        loaded[key] = (module.to(dtype=param.dtype, device=param.device), config)
    return loaded[key]


def check_head(kind: str, config: dict, target_model) -> None:
    """``SpecDecodeError`` for a target whose windows the planned attention does not follow
    (``models.adopt.check_window``) or a head config that declares a window of its own (the heads
    here attend to every earlier position)."""
    check_window(target_model.config, target_model, "the target model")
    own = {"max_position_embeddings": context_length(target_model.config), **config}
    window = attention_window(SimpleNamespace(**own))
    if window is not None:
        raise SpecDecodeError(
            f"the {kind} head declares a sliding window ({window or 'unknown'} tokens): the heads "
            "here attend to every earlier position, so a head config with a window is not "
            "supported")


class DraftVocab:
    """A head's read-out over a reduced vocabulary (VocabTrim, Goel et al. 2025; FR-Spec, Zhao et
    al. 2025): logits only for ``vocab`` (the tokens the corpus uses most, listed by the trainer:
    ``vocab_subset``), the rest probability 0, so a vocabulary-sized projection stops dominating a
    small head's cost. Drafts only; the target still verifies over its whole vocabulary (lossless)."""

    def __init__(self, weight: torch.Tensor, vocab: torch.Tensor | None, size: int | None = None,
                 norm: nn.Module | None = None) -> None:
        """``weight``: the whole vocabulary's read-out, trimmed here to ``vocab``; or, given
        ``size`` (the target's vocabulary), the read-out of ``vocab``'s rows already (a head's
        own LM head). ``norm``: applied to the features first."""
        self.size = weight.shape[0] if size is None else size
        self.vocab, self.norm = vocab, norm
        self.weight = weight if vocab is None or size is not None else weight[vocab].contiguous()

    def probs(self, features: torch.Tensor, params, weight: torch.Tensor | None = None
              ) -> torch.Tensor:
        """[n, V] draft probabilities (processed like the target's when sampling)."""
        if self.norm is not None:
            features = self.norm(features)
        logits = torch.nn.functional.linear(features, self.weight if weight is None else weight)
        small = draft_distribution(logits, params)
        if self.vocab is None:
            return small
        full = small.new_zeros(small.shape[0], self.size)
        return full.index_copy_(1, self.vocab, small)

    def trim(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.vocab is None else weight[self.vocab].contiguous()


def vocab_subset(config: dict, size: int | None, vocab_size: int) -> torch.Tensor | None:
    """The first ``size`` ids of the head's most-used-token list (None: all of it; 0 or a head
    without a list: the whole vocabulary)."""
    ids = config.get("draft_vocab")
    if not ids or size == 0:
        return None
    if size is not None and size < 1:
        raise SpecDecodeError(f"draft_vocab must be >= 0, got {size}")
    ids = [int(i) for i in ids[:size] if 0 <= int(i) < vocab_size]
    return torch.tensor(sorted(ids)) if ids and len(ids) < vocab_size else None


# head kind -> its builder from a saved config (models/eagle3.py adds "eagle3" when imported, which
# the models package does)
HEAD_BUILDERS: dict[str, object] = {
    "eagle": lambda c: EagleHead(c["hidden_size"], c["num_heads"], c["intermediate_size"],
                                 c.get("rope_theta", 10000.0), c.get("eps", 1e-6)),
    "medusa": lambda c: MedusaHeads(c["hidden_size"], c["vocab_size"], c["num_heads"],
                                    bool(c.get("tied", False))),
}


def build_head(config: dict) -> nn.Module:
    if config.get("kind") not in HEAD_BUILDERS:
        raise SpecDecodeError(f"unknown head kind {config.get('kind')!r} (known: "
                              f"{', '.join(sorted(HEAD_BUILDERS))})")
    return HEAD_BUILDERS[config["kind"]](config)
