"""The EAGLE-3 draft head (Li, Wei, Zhang, Zhang, "EAGLE-3: Scaling up Inference Acceleration of
Large Language Models via Training-Time Test", 2025), on the target's features from a low, a middle
and a high layer.

- Input: the target's residual stream after three decoder layers (``feature_layers``, by default
  2, L / 2 and L - 3 as the paper's code takes them), concatenated and fused to the model width by
  ``fuse`` (``lift``). Deeper draft positions feed the head's own output instead (its hidden state
  stands in for the fused feature: the head never predicts the target's features, so no feature
  regression loss; training-time test teaches it to read its own outputs, ``train/eagle3.py``).
- One decoder layer whose attention reads [normed embedding of token t+1; normed feature of
  position t] (2H wide), RoPE, SwiGLU MLP; the residual stream is the feature.
- Read-out: its own norm and LM head over a reduced draft vocabulary (``vocab``: draft id -> target
  id, the tokens the training data uses most), mapped back to the target's ids; tokens outside it
  are never drafted (the target still verifies over its whole vocabulary: lossless).

Same calling convention as ``EagleHead`` (``forward(embeds, features, positions, visible,
past)``), so the ``eagle`` drafter runs either; ``lift`` and ``readout`` are where they differ.
"""

from __future__ import annotations

import torch
from torch import nn

from specdecode.models.heads import HEAD_BUILDERS, DraftVocab, RMSNorm, decoder_layer
from specdecode.types import SpecDecodeError


def default_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers of an ``num_layers``-layer target."""
    if num_layers < 4:
        return list(range(num_layers - 1)) or [0]
    return sorted({2 if num_layers > 5 else 0, num_layers // 2, num_layers - 3})


class Eagle3Head(nn.Module):
    """``forward(embeds, features, positions, visible, past)``: embeddings and head-space features
    [B, T, H] (``lift`` of the target's, or the head's own outputs), positions [B, T], ``visible``
    [B, T, P + T] over the ``past`` keys then the new ones; returns the new hidden states [B, T, H]
    and the T inputs' (keys, values). ``logits(hidden)``: [.., len(vocab)] draft-vocabulary logits."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 feature_layers: list[int], vocab: list[int], rope_theta: float = 10000.0,
                 eps: float = 1e-6) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise SpecDecodeError(f"hidden_size {hidden_size} is not a multiple of num_heads "
                                  f"{num_heads}")
        if not feature_layers or not vocab:
            raise SpecDecodeError("an EAGLE-3 head needs feature layers and a draft vocabulary")
        ids = sorted({int(i) for i in vocab})  # draft id d reads out target id ids[d]
        if len(ids) != len(vocab):
            raise SpecDecodeError("the draft vocabulary lists a token twice")
        self.config = {"kind": "eagle3", "hidden_size": hidden_size, "num_heads": num_heads,
                       "intermediate_size": intermediate_size,
                       "feature_layers": [int(i) for i in feature_layers],
                       "vocab": ids, "rope_theta": rope_theta, "eps": eps}
        self.feature_layers = tuple(int(i) for i in feature_layers)
        self.heads, self.head_dim, self.theta = num_heads, hidden_size // num_heads, rope_theta
        self.fuse = nn.Linear(len(feature_layers) * hidden_size, hidden_size, bias=False)
        self.embed_norm = RMSNorm(hidden_size, eps)
        self.feature_norm = RMSNorm(hidden_size, eps)
        self.qkv = nn.Linear(2 * hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = RMSNorm(hidden_size, eps)
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.norm = RMSNorm(hidden_size, eps)
        self.lm_head = nn.Linear(hidden_size, len(ids), bias=False)
        self.register_buffer("vocab", torch.tensor(ids), persistent=False)

    def lift(self, target_features: torch.Tensor) -> torch.Tensor:
        """The target's concatenated layer features [.., len(feature_layers) * H] -> [.., H]."""
        return self.fuse(target_features)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                visible: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x = torch.cat([self.embed_norm(embeds), self.feature_norm(features)], -1)
        return decoder_layer(self, x, features, positions, visible, past)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def readout(self, target_model, vocab: torch.Tensor | None = None) -> DraftVocab:
        """The drafter's read-out: this head's own LM head over its vocabulary, in target ids
        (``vocab``, a further subset, is not used: the head's vocabulary is already reduced)."""
        size = int(target_model.get_output_embeddings().weight.shape[0])
        if int(self.vocab.max()) >= size:
            raise SpecDecodeError(f"the EAGLE-3 head's vocabulary has ids up to "
                                  f"{int(self.vocab.max())}; this target has {size} tokens")
        return DraftVocab(self.lm_head.weight, self.vocab, size=size, norm=self.norm)


HEAD_BUILDERS["eagle3"] = lambda c: Eagle3Head(
    c["hidden_size"], c["num_heads"], c["intermediate_size"], c["feature_layers"], c["vocab"],
    c.get("rope_theta", 10000.0), c.get("eps", 1e-6))
