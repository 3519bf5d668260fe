"""Where a method's output leaves vanilla's, and whether that was a near-tie.

A lossless method is token-identical to vanilla. Where one is not (a lossy peer, or our methods run
with ``--no-exact`` in half precision, where a token's logits depend on how many tokens share its
forward), the report says where the first differing token is and how far apart the target's two
best logits were at that position (vanilla's prefix, one plain forward in the model's dtype): a
margin of a rounding step or two is a numerical near-tie, a large margin is a real error.
"""

from __future__ import annotations

import statistics

import torch

NEAR_TIE = 0.25  # logits closer than this count as a near-tie (bf16 rounds logits ~16 to 0.125)


def first_divergence(reference: list[int], tokens: list[int]) -> int | None:
    """The first position where ``tokens`` differs from ``reference`` (a length difference counts
    at the shorter one's end); None when they are equal."""
    for i, (a, b) in enumerate(zip(reference, tokens)):
        if a != b:
            return i
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))


@torch.no_grad()
def top2_margin(model, prompt: list[int], prefix: list[int]) -> float:
    """The gap between the target's two largest next-token logits after ``prompt + prefix``."""
    param = next(model.parameters())
    ids = torch.tensor([list(prompt) + list(prefix)], device=param.device)
    logits = model(input_ids=ids).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def divergence(model, prompt: list[int], reference: list[int], tokens: list[int]
               ) -> dict | None:
    """``{"position", "margin"}`` of the first token where ``tokens`` leaves ``reference``."""
    at = first_divergence(reference, tokens)
    if at is None:
        return None
    return {"position": at, "margin": round(top2_margin(model, prompt, reference[:at]), 4)}


def summarize(found: list[dict]) -> dict | None:
    """Median first-divergence position and margin, and how many were near-ties."""
    if not found:
        return None
    return {"count": len(found),
            "position_median": statistics.median(d["position"] for d in found),
            "margin_median": round(statistics.median(d["margin"] for d in found), 4),
            "near_ties": sum(d["margin"] < NEAR_TIE for d in found)}
