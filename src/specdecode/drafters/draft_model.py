"""``draft-model``: a smaller causal LM with the target's tokenizer drafts a chain of k tokens
(Leviathan et al., ICML 2023; Chen et al., 2023), or a dynamic tree (EAGLE-2, Li et al., 2024).

Chain (``tree="chain"``): greedy drafts the draft's argmax; coupled sampling its Gumbel-max under
the same keyed noise as the target; the other sampling rules (rejection, block, traversal, spectr:
``SamplingParams.sampled_drafts``) sample from the processed draft distribution, which travels as
``draft_probs``. With ``tree_width`` w > 1 each chain position also offers the draft's next w - 1
most likely tokens as leaf siblings (no extra draft forwards).

Delayed tree expansion (``num_drafts`` k > 1; Thomas, Kitanovski, Goldblum, Pal, arXiv
2602.16994): the chain branches at depth ``branch_depth`` into k children drawn i.i.d. (with
``replacement=False`` without replacement, each child's ``draft_probs`` row then excluding its
earlier siblings), each continued as a chain. Multi-draft rules gain most deep in the tree, where
draft and target diverge; a branch depth fixed before drafting keeps it exact. Verify it with
``sampling="traversal"`` (or ``spectr`` / ``rejection``); under greedy / coupled sampling the
branches are the top-k children (point masses).

Dynamic tree (``tree="dynamic"``): ``dynamic_tree.build_tree`` expands, depth by depth, the
``topk`` best nodes by path probability with their ``topk`` likeliest children (one draft forward
per depth over the expanded nodes, with a tree mask on the draft's cache), then keeps the best
``max_nodes``. Under greedy the children are the draft's top-k; under coupled sampling the top-k of
softmax(log q + g) with the target's keyed Gumbel noise g (the draft's own coupled choice first):
deterministic proposals (greedy / coupled rules). Under the other sampling rules they are drawn
from the processed draft distribution, independently (their ``draft_probs``; recursive rejection
sampling, traversal or SpecTr), the budget spent while drawing and no drawn node dropped. Depth is
``min(num_draft_tokens, ctx.max_depth)``, the node budget ``min(max_nodes, ctx.budget)``, and nodes
scoring below ``ctx.min_score`` are not expanded.

Every draft carries ``scores`` (the product of the draft probabilities along each node's path), so
a policy can keep only the nodes that pay. The draft keeps its own KV cache, trimmed to the accepted
tokens after every verdict and topped up with the new committed tokens at the next proposal.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specdecode.drafters.base import BuildContext
from specdecode.drafters.model_drafting import DRAFT_OPTIONS, DraftModelDrafter
from specdecode.drafters.registry import Needs, register
from specdecode.models import HFModel, load_causal_lm
from specdecode.models.heads import vocab_subset
from specdecode.models.layer_draft import shipped_draft
from specdecode.types import SpecDecodeError


def check_vocab(target: HFModel, draft: HFModel) -> None:
    if draft.vocab_size != target.vocab_size:
        raise SpecDecodeError(f"draft model vocabulary ({draft.vocab_size}) differs from the "
                              f"target's ({target.vocab_size}); they must share a tokenizer")


SHIPPED_KEY = "shipped_draft"  # the host's draft cut for its target: (dtype, device) -> model


def shipped_or_none(build: BuildContext):
    """The draft shipped for the target (``models/layer_draft.py``), loaded once per host."""
    param = next(build.target.model.parameters())
    loaded = build.host.get(SHIPPED_KEY, dict)
    key = (param.dtype, str(param.device))
    if key not in loaded:
        loaded[key] = shipped_draft(build.target.model)
    return loaded[key]


def reduced_vocab(model, size: int | None, vocab_size: int) -> torch.Tensor | None:
    """The draft's reduced read-out: the first ``size`` ids of its ``config.draft_vocab`` list
    (None: the whole list; 0 or no list: the whole vocabulary)."""
    return vocab_subset({"draft_vocab": getattr(model.config, "draft_vocab", None)}, size,
                        vocab_size)


@register("draft-model", needs=Needs.DRAFT_MODEL, options=DRAFT_OPTIONS)
def build_draft_model(build: BuildContext, num_draft_tokens: int = 4, tree_width: int = 1,
                      tree: str = "chain", topk: int = 4, max_nodes: int = 12, num_drafts: int = 1,
                      branch_depth: int = 1, replacement: bool = True,
                      draft_vocab: int | None = None) -> DraftModelDrafter:
    source = build.draft_model
    if source is None:
        source = shipped_or_none(build)
    if source is None:
        raise SpecDecodeError("the draft-model drafter needs a draft model (draft_model=... or "
                              "--draft-model PATH); none is shipped for this target")
    # a path loads in the target's dtype, on its device; a loaded draft is used as it is
    on_target = {} if not isinstance(source, (str, Path)) else {
        "dtype": build.target.dtype, "device": build.target.device}
    model = load_causal_lm(source, what="draft model", **on_target)
    draft = HFModel(model, reduced_vocab(model, draft_vocab, build.target.vocab_size))
    check_vocab(build.target, draft)
    return DraftModelDrafter(draft, num_draft_tokens, tree_width, tree, topk, max_nodes,
                             num_drafts, branch_depth, replacement)
