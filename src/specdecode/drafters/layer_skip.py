"""``layer-skip``: self-speculation with the target's first L layers, its final norm and its LM head
(no extra weights; the early-exit drafter of LayerSkip, Elhoushi et al., ACL 2024, and of Draft &
Verify, Zhang et al., ACL 2024, without their training or layer search).

The shallow model is a view: its modules are the target's own (shared weights, no copy); only the
decoder-layer list is shortened. It drafts like ``draft-model`` (a chain, or a dynamic tree with
``tree="dynamic"``) with its own KV cache.
"""

from __future__ import annotations

import copy

import torch

from specdecode.drafters.base import BuildContext, register
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.models.hf import HFModel
from specdecode.types import SpecDecodeError


def _layer_list(model: torch.nn.Module, count: int) -> tuple[list[str], torch.nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name.split("."), module
    raise SpecDecodeError("layer-skip could not find the target's decoder layer list")


def shallow_view(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A copy of ``model``'s module tree sharing every weight, with only ``num_layers`` layers."""
    config = model.config
    total = config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise SpecDecodeError(f"layer-skip num_layers must be in [1, {total - 1}] for this "
                              f"{total}-layer target, got {num_layers}")
    path, layers = _layer_list(model, total)
    small_config = copy.copy(config)
    small_config.num_hidden_layers = num_layers
    if getattr(small_config, "layer_types", None):
        small_config.layer_types = list(config.layer_types[:num_layers])
    root = copy.copy(model)
    root._modules = dict(model._modules)
    copied = [root]
    for part in path[:-1]:
        child = copy.copy(copied[-1]._modules[part])
        child._modules = dict(child._modules)
        copied[-1]._modules[part] = child
        copied.append(child)
    copied[-1]._modules[path[-1]] = torch.nn.ModuleList(list(layers)[:num_layers])
    for module in copied:  # only the copies: the shared modules keep the target's config
        if getattr(module, "config", None) is config:
            module.config = small_config
    return root


@register("layer-skip")
def build_layer_skip(build: BuildContext, num_layers: int | None = None,
                     num_draft_tokens: int = 4, tree_width: int = 1, tree: str = "chain",
                     topk: int = 4, max_nodes: int = 12) -> DraftModelDrafter:
    model = build.target.model
    if num_layers is None:
        num_layers = max(1, model.config.num_hidden_layers // 2)
    return DraftModelDrafter(HFModel(shallow_view(model, num_layers)), num_draft_tokens,
                             tree_width, tree, topk, max_nodes)
