"""Draft models cut from the target itself: a few of its decoder layers on its own embedding and
(tied) LM head, then distilled to the target (``specdecode train-drafter --kind distill
--draft-layers 0,1,2,3``; on SmolLM2 its first layers were the best start of the cuts probed).
Starting from the target's layers gives the draft the target's token representations for free;
only the layers and the final norm train, so only they are stored
(``head.safetensors`` + ``head.json``, kind ``draft``, like the trained heads): the embedding is
read from the target when the draft is loaded, and the draft loads only against the weights it was
cut from (``models.heads.probe_matches``).

``head.json`` also lists the tokens the corpus uses most (``draft_vocab``): the draft-model drafter
reads out only those (``HFModel(vocab=...)``), since a 49k-token LM head otherwise costs about as
much as a few of the draft's layers (SmolLM2, 4 layers: 5.2 ms per draft token, 3.5 ms reading
out 8,192 tokens). The target still verifies over its whole vocabulary, so outputs do not change.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from specdecode.models.heads import (
    CONFIG_FILE,
    HEAD_FILE,
    probe_matches,
    shipped_dir,
    weights_probe,
)
from specdecode.types import SpecDecodeError

KIND = "draft"
SHIPPED = Path(__file__).resolve().parent.parent / "heads"  # heads/<model>/draft


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``"0,1,2,29"`` (or ``"-1"`` for the last) as sorted distinct layer indices of the target."""
    try:
        picked = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise SpecDecodeError(f"--draft-layers must be comma-separated layer indices, got "
                              f"{text!r}") from None
    picked = sorted({p % num_layers if -num_layers <= p < 0 else p for p in picked})
    if not picked or picked[0] < 0 or picked[-1] >= num_layers:
        raise SpecDecodeError(f"--draft-layers {text!r}: the target has layers 0..{num_layers - 1}")
    if len(picked) >= num_layers:
        raise SpecDecodeError("--draft-layers picks every layer of the target: a draft must be "
                              "smaller")
    return picked


def cut_draft(target_model, layers: list[int]):
    """A causal LM of the target's class with only ``layers`` (copies), the target's embedding,
    final norm and LM head (tied as the target's are). The embedding and LM head are frozen: they
    are the target's, read from it again when the draft is loaded."""
    from transformers import AutoModelForCausalLM

    inner = getattr(target_model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise SpecDecodeError("a draft can be cut only from a decoder-only model with "
                              "model.layers and model.embed_tokens (Llama-family)")
    config = copy.deepcopy(target_model.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    param = next(target_model.parameters())
    draft = AutoModelForCausalLM.from_config(config, dtype=param.dtype).to(param.device)
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(inner.embed_tokens.weight)
        draft.model.norm.load_state_dict(inner.norm.state_dict())
        for mine, index in zip(draft.model.layers, layers):
            mine.load_state_dict(inner.layers[index].state_dict())
        head = draft.get_output_embeddings()
        if head.weight is not draft.model.embed_tokens.weight:  # an untied LM head: the target's
            head.weight.copy_(target_model.get_output_embeddings().weight)
    for weight in (draft.model.embed_tokens.weight, draft.get_output_embeddings().weight):
        weight.requires_grad_(False)
    draft.config.draft_layers = list(layers)
    return draft.eval()


def trained_state(draft) -> dict[str, torch.Tensor]:
    """What training changed: every weight but the embedding (and the LM head tied to it)."""
    skip = {"model.embed_tokens.weight", "lm_head.weight"}
    return {k: v for k, v in draft.state_dict().items() if k not in skip}


def save_cut_draft(draft, out: Path, target_model, vocab: list[int] | None, extra: dict) -> None:
    """Store the trained part of a cut draft, tied to ``target_model``'s weights."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in trained_state(draft).items()}
    save_file(state, str(out / HEAD_FILE))
    config = {"kind": KIND, "layers": list(draft.config.draft_layers),
              "target": {"hidden_size": int(draft.config.hidden_size),
                         "vocab_size": int(draft.model.embed_tokens.weight.shape[0])},
              "target_probe": weights_probe(target_model), **extra}
    if vocab:
        config["draft_vocab"] = [int(i) for i in vocab]
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def load_cut_draft(directory: Path | str, target_model):
    """The draft stored by ``save_cut_draft``, rebuilt on ``target_model`` (in its dtype, on its
    device), with ``config.draft_vocab`` set from the stored list."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights = directory / CONFIG_FILE, directory / HEAD_FILE
    if not config_file.exists() or not weights.exists():
        raise SpecDecodeError(f"no cut draft in {str(directory)!r} (expected {CONFIG_FILE} and "
                              f"{HEAD_FILE})")
    config = json.loads(config_file.read_text())
    if config.get("kind") != KIND:
        raise SpecDecodeError(f"{str(directory)!r} holds a {config.get('kind')!r} head, not a "
                              f"draft model")
    if not probe_matches(config.get("target_probe"), target_model):
        raise SpecDecodeError(f"the draft in {str(directory)!r} was cut from other weights than "
                              f"this target's")
    draft = cut_draft(target_model, [int(i) for i in config["layers"]])
    param = next(draft.parameters())
    state = {k: v.to(param.dtype) for k, v in load_file(str(weights)).items()}
    missing = set(trained_state(draft)) - set(state)
    if missing:
        raise SpecDecodeError(f"the draft in {str(directory)!r} lacks {sorted(missing)[:3]}")
    draft.load_state_dict(state, strict=False)
    draft.config.draft_vocab = config.get("draft_vocab") or None
    return draft


def shipped_draft(target_model):
    """The draft shipped for ``target_model`` (``heads/<model>/draft``), loaded, or None."""
    directory = shipped_dir(SHIPPED, KIND, target_model)
    return None if directory is None else load_cut_draft(directory, target_model)
