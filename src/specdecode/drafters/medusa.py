"""``medusa``: Medusa-1 heads (Cai et al., ICML 2024) on the frozen target's last feature, drafting a
static sparse tree.

Head d (1..K) reads the feature of the last committed token that has one (the token before the
pending one: the engine hands features over with each proposal, ``feedback_hidden``) and predicts
the token d places after the pending one. The tree is fixed: a list of paths of ranks, (i1, ..., id)
meaning head 1's i1-th best token, then head 2's i2-th best, ... (Medusa's "sparse tree"). The
trainer picks the paths that maximise the expected accepted length from the heads' measured top-k
accuracies on held-out text (the product of the accuracies along a path, as the paper does) and
stores them with the heads; heads without a tree get one from a generic prior. Nodes carry scores
(the product of the heads' probabilities along their path), so policies can prune.

Top-k proposals are deterministic (point mass: greedy, coupled and point-mass rules are lossless);
under coupled sampling each depth ranks by the target's keyed noise, as ``draft-model`` does.
Options: ``head`` (a directory from ``specdecode train-drafter --kind medusa``; the shipped one
with the demo target), ``max_nodes``, ``draft_vocab`` (as ``eagle``'s: a reduced read-out).
"""

from __future__ import annotations

import torch

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import HEAD, NODES
from specdecode.drafters.registry import Needs, register
from specdecode.models.heads import HOST_KEY, DraftVocab, MedusaHeads, resolve_head, vocab_subset
from specdecode.sampling import coupled_ranking
from specdecode.types import Draft, SpecDecodeError, Verdict


def static_tree(accuracy: list[list[float]], max_nodes: int) -> list[list[int]]:
    """The ``max_nodes`` paths of ranks with the highest product of per-depth top-rank accuracies
    (``accuracy[d][i]``: how often head d + 1's (i + 1)-th token is the right one), closed under
    prefixes, best first (so any leading slice of the list is itself a tree)."""
    paths: list[list[int]] = []
    frontier = [([i], accuracy[0][i]) for i in range(len(accuracy[0]))]
    while frontier and len(paths) < max_nodes:
        best = max(range(len(frontier)), key=lambda j: (frontier[j][1], -len(frontier[j][0])))
        path, score = frontier.pop(best)
        paths.append(path)
        depth = len(path)
        if depth < len(accuracy):
            frontier += [(path + [i], score * accuracy[depth][i])
                         for i in range(len(accuracy[depth]))]
    return paths


def prior_tree(num_heads: int, max_nodes: int, topk: int = 4) -> list[list[int]]:
    """A generic tree for heads without measured accuracies: accuracy falling with depth and rank."""
    prior = [[0.6 ** (d + 1) / (i + 1) for i in range(topk)] for d in range(num_heads)]
    return static_tree(prior, max_nodes)


class MedusaDrafter:
    feedback_hidden = True

    def __init__(self, heads: MedusaHeads, tree: list[list[int]], max_nodes: int = 16,
                 vocab: torch.Tensor | None = None) -> None:
        if max_nodes < 1:
            raise SpecDecodeError("max_nodes must be >= 1")
        if not tree or any(not p or len(p) > len(heads.blocks) for p in tree):
            raise SpecDecodeError("the Medusa tree needs paths of 1 to num_heads ranks")
        self.heads, self.tree, self.max_nodes = heads, tree, max_nodes
        weights = heads.readout_weights()
        self.readout = DraftVocab(weights[0], vocab)
        self.weights = [self.readout.trim(w) for w in weights]
        self.last: torch.Tensor | None = None  # feature of the token before the pending one

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        if ctx.hidden is not None and len(ctx.hidden):
            self.last = ctx.hidden[-1]
        if self.last is None or ctx.budget < 1 or ctx.max_depth < 1:
            return Draft.empty()
        paths = [p for p in self.tree if len(p) <= ctx.max_depth][:min(self.max_nodes, ctx.budget)]
        depth = max(len(p) for p in paths)
        base, params = len(ctx.tokens), ctx.params
        rows = [self.readout.probs(self.last + torch.nn.functional.silu(block(self.last))[None],
                                   params, weight)
                for block, weight in zip(self.heads.blocks[:depth], self.weights)]
        probs = torch.cat(rows)  # [depth, V]
        if not params.greedy and params.mode == "coupled":
            probs = coupled_ranking(probs, ctx.seed, list(range(base, base + depth)))
        width = 1 + max(i for p in paths for i in p)
        top_p, top_ids = torch.topk(probs.double(), min(width, probs.size(-1)), dim=-1)
        index = {(): -1}
        tokens, parents, scores = [], [], []
        for path in paths:
            parent = index.get(tuple(path[:-1]))
            d, rank = len(path) - 1, path[-1]
            if parent is None or rank >= top_ids.size(1):
                continue  # not closed under prefixes (a hand-made tree): skip the node
            index[tuple(path)] = len(tokens)
            tokens.append(int(top_ids[d, rank]))
            parents.append(parent)
            scores.append((scores[parent] if parent >= 0 else 1.0) * float(top_p[d, rank]))
        draft = Draft(torch.tensor(tokens), torch.tensor(parents),
                      scores=torch.tensor(scores, dtype=torch.float64))
        keep = [False] * len(tokens)  # below the policy's bar: cut, with every descendant
        for i, (parent, score) in enumerate(zip(parents, scores)):
            keep[i] = score >= ctx.min_score and (parent < 0 or keep[parent])
        return draft.subset(torch.tensor(keep, dtype=torch.bool))

    def observe(self, verdict: Verdict) -> None:
        """Nothing to learn: the next feature comes with the next proposal."""


@register("medusa", needs=Needs.HEADS, options={"max_nodes": NODES, **HEAD})
def build_medusa(build: BuildContext, head=None, max_nodes: int = 16,
                 draft_vocab: int | None = None) -> MedusaDrafter:
    module, config = resolve_head("medusa", head, build.target.model,
                                  build.host.get(HOST_KEY, dict))
    tree = config.get("tree") or prior_tree(len(module.blocks), 64)
    vocab = vocab_subset(config, draft_vocab, build.target.vocab_size)
    return MedusaDrafter(module, tree, max_nodes, vocab)
