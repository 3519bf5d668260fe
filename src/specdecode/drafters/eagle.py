"""``eagle``: an EAGLE draft head on the target's own features: EAGLE-1 (Li et al., ICML 2024;
``EagleHead``: the last layer's features, the target's LM head) or EAGLE-3 (Li et al., 2025;
``Eagle3Head``: a low, a middle and a high layer's features fused, its own reduced read-out;
preferred where both are shipped), drafting
EAGLE-2's dynamic tree (Li et al., EMNLP 2024) with ``dynamic_tree.build_tree``; with ``topk`` 1
(the default) that tree is a chain of the head's best tokens. On the demo target on 2 CPU cores
the chain measured fastest (quick Spec-Bench run, greedy, docs/benchmarks/quick-trained-greedy-cpu:
chain of 4 1.53x vs vanilla at MAT 3.13; topk 4 with 16 nodes 1.23x at MAT 3.39): every extra
node lengthens verification and the head's second choices are rarely right. Where extra nodes
verify almost free (GPUs), ``topk=4:max_nodes=16`` is the EAGLE-2 shape.

The head reads pairs (target feature f_t, embedding of token t+1) and predicts f_{t+1}; the target's
frozen LM head maps a predicted feature to next-token probabilities (``models/heads.py``). The
drafter keeps the head's KV cache over the committed tokens, built only from the target's true
features, which the engine hands over with each proposal (``feedback_hidden``): every committed
token's but the pending last one's. Drafting then runs the head on the last pair to get the
pending token's predicted feature (depth 1's distribution), and expands the tree depth by depth:
each expanded node is fed as (its parent's predicted feature, its token), seeing the committed
cache and its tree ancestors. The tree's nodes never enter the committed cache.

Proposals are deterministic top-k trees (point mass; greedy, coupled and point-mass rules), or,
under rejection sampling, children drawn from the head's processed distribution (recursive
rejection sampling), exactly as ``draft-model``'s dynamic tree. Options: ``head`` (a directory from
``specdecode train-drafter --kind eagle``; the shipped head with the demo target),
``num_draft_tokens`` (depth), ``topk`` (1: a chain of the head's best tokens, the default; > 1:
EAGLE-2's dynamic tree), ``max_nodes``, ``draft_vocab`` (read out only the N
tokens the corpus uses most, from the head's list; 0: the whole vocabulary; default: the list).
"""

from __future__ import annotations

import torch

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.dynamic_tree import build_tree
from specdecode.drafters.options import DEPTH, HEAD, NODES, TREE_TOPK
from specdecode.drafters.registry import Needs, register
from specdecode.models.heads import HOST_KEY, EagleHead, resolve_head, vocab_subset
from specdecode.sampling import TorchRandom, coupled_ranking
from specdecode.types import Draft, SpecDecodeError, Verdict


class EagleDrafter:
    """The head (``EagleHead`` or ``Eagle3Head``: ``lift`` maps the target's features into the
    head's input, ``readout`` gives its draft distribution, ``feature_layers`` says which of the
    target's features it reads) over the committed tokens, then a tree of its predictions."""

    feedback_hidden = True

    def __init__(self, target_model, head: EagleHead, num_draft_tokens: int = 5, topk: int = 1,
                 max_nodes: int = 16, vocab: torch.Tensor | None = None) -> None:
        if num_draft_tokens < 1 or topk < 1 or max_nodes < 1:
            raise SpecDecodeError("num_draft_tokens, topk and max_nodes must be >= 1")
        self.head, self.depth, self.topk, self.max_nodes = head, num_draft_tokens, topk, max_nodes
        self.feature_layers = head.feature_layers
        self.embed = target_model.get_input_embeddings()
        self.readout = head.readout(target_model, vocab)
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fed = 0  # tokens[1:fed + 1] are in the cache (pair t: feature of t - 1, token t)
        self.start = 0  # the first cached pair's token index
        self.root: torch.Tensor | None = None  # predicted feature of the pending token
        self.rng: TorchRandom | None = None

    @torch.inference_mode()
    def _catch_up(self, ctx: DraftContext) -> None:
        """Feed the head the pairs of the new features: (f_i, token i + 1)."""
        if ctx.hidden is None or len(ctx.hidden) == 0:
            return
        m = len(ctx.hidden)
        first = len(ctx.tokens) - 1 - m  # index of the first new feature's token
        if first != self.fed:  # features went missing (a step without us): start afresh
            self.past, self.start = None, first + 1
        tokens = torch.tensor(ctx.tokens[first + 1:first + 1 + m])
        positions = torch.arange(first + 1, first + 1 + m)
        cached = 0 if self.past is None else self.past[0].size(2)
        visible = torch.ones(m, cached + m, dtype=torch.bool)
        visible[:, cached:] = torch.ones(m, m, dtype=torch.bool).tril()
        out, (k, v) = self.head(self.embed(tokens)[None], self.head.lift(ctx.hidden)[None],
                                positions[None], visible[None], self.past)
        self.past = (k, v) if self.past is None else (torch.cat([self.past[0], k], 2),
                                                      torch.cat([self.past[1], v], 2))
        self.fed, self.root = first + m, out[0, -1]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Draft:
        self._catch_up(ctx)
        depth = min(self.depth, ctx.max_depth)
        if self.root is None or self.fed != len(ctx.tokens) - 1 or depth < 1 or ctx.budget < 1:
            return Draft.empty()
        base, params = len(ctx.tokens), ctx.params
        coupled = not params.greedy and params.mode == "coupled"
        cached = self.past[0].size(2)
        feats: list[torch.Tensor] = []  # predicted feature of each expanded tree node
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        slot: dict[int, int] = {}  # tree node -> index in keys / values / feats

        def rank(features: torch.Tensor, positions: list[int]) -> torch.Tensor:
            probs = self.readout.probs(features, params)
            return coupled_ranking(probs, ctx.seed, positions) if coupled else probs

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            if frontier == [-1]:
                return rank(self.root[None], [base])
            done = len(feats)  # tree nodes already fed
            visible = torch.zeros(len(frontier), cached + done + len(frontier), dtype=torch.bool)
            visible[:, :cached] = True
            positions, inputs = [], []
            for row, node in enumerate(frontier):
                visible[row, cached + done + row] = True
                ancestor, level = parents[node], 1
                inputs.append(self.root if ancestor < 0 else feats[slot[ancestor]])
                while ancestor >= 0:
                    visible[row, cached + slot[ancestor]] = True
                    ancestor, level = parents[ancestor], level + 1
                positions.append(base - 1 + level)
                slot[node] = done + row
            past = self.past
            if keys:
                past = (torch.cat([past[0], *keys], 2), torch.cat([past[1], *values], 2))
            ids = torch.tensor([tokens[n] for n in frontier])
            out, (k, v) = self.head(self.embed(ids)[None], torch.stack(inputs)[None],
                                    torch.tensor([positions]), visible[None], past)
            keys.append(k)
            values.append(v)
            feats.extend(out[0])
            return rank(out[0], [p + 1 for p in positions])

        sampled = params.sampled_drafts
        if sampled and self.rng is None:
            self.rng = TorchRandom(ctx.seed + 0xEA61E)
        tree = build_tree(expand, topk=self.topk, depth=depth,
                          max_nodes=min(self.max_nodes, ctx.budget), min_score=ctx.min_score,
                          rng=self.rng if sampled else None)
        if not tree.tokens:
            return Draft.empty()
        return Draft(torch.tensor(tree.tokens), torch.tensor(tree.parents), tree.rows,
                     scores=torch.tensor(tree.scores, dtype=torch.float64))

    def observe(self, verdict: Verdict) -> None:
        """Nothing to do: the accepted tokens' true features come with the next proposal."""


@register("eagle", needs=Needs.HEADS, options={"num_draft_tokens": DEPTH, "topk": TREE_TOPK,
                                               "max_nodes": NODES, **HEAD})
def build_eagle(build: BuildContext, head=None, num_draft_tokens: int = 5,
                topk: int = 1, max_nodes: int = 16, draft_vocab: int | None = None
                ) -> EagleDrafter:
    module, config = resolve_head("eagle", head, build.target.model, build.host.get(HOST_KEY, dict))
    vocab = vocab_subset(config, draft_vocab, build.target.vocab_size)
    return EagleDrafter(build.target.model, module, num_draft_tokens, topk, max_nodes, vocab)
