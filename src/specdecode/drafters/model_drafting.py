"""Drafting with a causal LM over the target's vocabulary, with its own KV cache: the chain, the
delayed tree and the dynamic tree that ``draft-model`` (a separate draft model) and ``layer-skip``
(a shallow view of the target) both draft (the methods: ``drafters/draft_model.py``). Registers no
drafter: ``DRAFT_OPTIONS`` is the option table the two registrations share, its defaults read from
``DraftModelDrafter``.
"""

from __future__ import annotations

import torch

from specdecode.drafters.base import DraftContext
from specdecode.drafters.dynamic_tree import build_tree
from specdecode.drafters.options import DRAFT_TREE, declare, owner_only
from specdecode.models import HFModel
from specdecode.sampling import TorchRandom, coupled_choice, coupled_ranking, draft_distribution
from specdecode.types import Draft, SpecDecodeError, Verdict

TREES = ("chain", "dynamic")


class DraftModelDrafter:
    """Drafts with ``model`` (an ``HFModel``: a draft model, or a shallow view of the target) the
    shapes ``drafters/draft_model.py`` describes, keeping the model's cache over the committed
    tokens."""

    def __init__(self, model: HFModel, num_draft_tokens: int = 4, tree_width: int = 1,
                 tree: str = "chain", topk: int = 4, max_nodes: int = 12, num_drafts: int = 1,
                 branch_depth: int = 1, replacement: bool = True) -> None:
        if min(num_draft_tokens, tree_width, topk, max_nodes, num_drafts, branch_depth) < 1:
            raise SpecDecodeError("num_draft_tokens, tree_width, topk, max_nodes, num_drafts and "
                                  "branch_depth must be >= 1")
        if num_drafts > 1 and (tree != "chain" or tree_width > 1):
            raise SpecDecodeError("num_drafts branches a chain (delayed tree expansion): use it "
                                  "with tree=chain and without tree_width")
        if tree not in TREES:
            raise SpecDecodeError(f"tree must be one of {', '.join(TREES)}, got {tree!r}")
        if tree == "dynamic" and tree_width > 1:
            raise SpecDecodeError("tree_width widens chains; a dynamic tree takes topk and "
                                  "max_nodes instead (drop tree_width or use tree=chain)")
        self.model, self.k, self.width = model, num_draft_tokens, tree_width
        self.tree, self.topk, self.max_nodes = tree, topk, max_nodes
        self.num_drafts, self.branch_depth, self.replacement = num_drafts, branch_depth, replacement
        self.model.reset()
        self.rng: TorchRandom | None = None
        self.base = 0  # committed length when the last draft was made
        self.chain_tokens: list[int] = []  # the chain's tokens, fed to the cache but the last

    def propose(self, ctx: DraftContext) -> Draft:
        self.chain_tokens, self.base = [], self.model.length  # observe() then keeps the cache as is
        limit = self.model.max_length
        depth = min(self.k, ctx.max_depth)
        if depth < 1 or ctx.budget < 1 or (limit is not None and len(ctx.tokens) + depth > limit):
            return Draft.empty()
        logits = self.model.extend(ctx.tokens[self.model.length:], last_only=True)[-1]
        self.base = len(ctx.tokens)  # the draft cache holds every committed token
        if self.tree == "dynamic":
            return self._dynamic(ctx, logits, depth)
        if self.num_drafts > 1:
            return self._delayed(ctx, logits, depth)
        return self._chain(ctx, logits, min(depth, ctx.budget // self.width))

    def _chain(self, ctx: DraftContext, logits: torch.Tensor, k: int) -> Draft:
        params, width, base = ctx.params, self.width, len(ctx.tokens)
        if k < 1:
            return Draft.empty()
        sampled = params.sampled_drafts and width == 1
        if sampled and self.rng is None:
            self.rng = TorchRandom(ctx.seed + 0x5EED)
        tokens, parents, rows, scores = [], [], [], []
        prev, score = -1, 1.0
        for depth in range(k):
            probs = draft_distribution(logits, params)
            if params.greedy:
                tok = int(logits.argmax())
            elif sampled:
                tok = self.rng.categorical(probs)
                rows.append(probs)
            elif params.mode == "coupled":
                tok = coupled_choice(probs[None], ctx.seed, [base + depth])[0]
            else:
                tok = int(probs.argmax())
            parent_score, score = score, score * float(probs[tok])
            node = len(tokens)
            self.chain_tokens.append(tok)
            tokens.append(tok)
            parents.append(prev)
            scores.append(score)
            if width > 1:
                for alt in torch.topk(probs, width).indices.tolist():
                    if alt != tok and len(tokens) - node < width:
                        tokens.append(alt)
                        parents.append(prev)
                        scores.append(parent_score * float(probs[alt]))
            prev = node
            # stop after *keeping* a token whose path score is below what pays (lossless: the
            # decision to go on never drops a drawn token)
            if depth == k - 1 or score < ctx.min_score:
                break
            logits = self.model.extend([tok], last_only=True)[-1]
        draft_probs = torch.stack(rows) if sampled else None
        return Draft(torch.tensor(tokens), torch.tensor(parents), draft_probs,
                     scores=torch.tensor(scores, dtype=torch.float64))

    def _expander(self, ctx: DraftContext, root_logits: torch.Tensor):
        """``expand(frontier, tokens, parents)`` for tree drafts: the rows choosing the children of
        each frontier node (one draft forward per call over the frontier, with a tree mask on the
        draft's cache; the caller crops the tree nodes away at the end)."""
        base = self.base
        slot: dict[int, int] = {}  # tree node -> its cache index
        coupled = not ctx.params.greedy and ctx.params.mode == "coupled"

        def rank(logits: torch.Tensor, positions: list[int]) -> torch.Tensor:
            """Rows choosing and scoring the children at absolute ``positions``."""
            probs = draft_distribution(logits, ctx.params)
            return coupled_ranking(probs, ctx.seed, positions) if coupled else probs

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            if frontier == [-1]:
                return rank(root_logits[None], [base])
            start = self.model.length
            visible = torch.zeros(len(frontier), start + len(frontier), dtype=torch.bool)
            visible[:, :base] = True
            positions = []
            for row, node in enumerate(frontier):
                visible[row, start + row] = True
                ancestor, level = parents[node], 1
                while ancestor >= 0:
                    visible[row, slot[ancestor]] = True
                    ancestor, level = parents[ancestor], level + 1
                positions.append(base - 1 + level)
                slot[node] = start + row
            logits = self.model.forward_nodes([tokens[n] for n in frontier], positions, visible)
            return rank(logits, [p + 1 for p in positions])

        return expand

    def _dynamic(self, ctx: DraftContext, root_logits: torch.Tensor, depth: int) -> Draft:
        base = self.base
        expand = self._expander(ctx, root_logits)
        sampled = ctx.params.sampled_drafts
        if sampled and self.rng is None:
            self.rng = TorchRandom(ctx.seed + 0x5EED)
        try:
            tree = build_tree(expand, topk=self.topk, depth=depth,
                              max_nodes=min(self.max_nodes, ctx.budget), min_score=ctx.min_score,
                              rng=self.rng if sampled else None)
        finally:
            self.model.crop(base)  # the tree nodes leave the cache; the committed tokens stay
        if not tree.tokens:
            return Draft.empty()
        return Draft(torch.tensor(tree.tokens), torch.tensor(tree.parents), tree.rows,
                     scores=torch.tensor(tree.scores, dtype=torch.float64))

    def _delayed(self, ctx: DraftContext, root_logits: torch.Tensor, depth: int) -> Draft:
        """Delayed tree expansion: a chain down to ``branch_depth``, where ``num_drafts`` children
        are drawn (``_draw``: i.i.d. or without replacement; the top ones under greedy / coupled),
        each continued as a chain. How many nodes each level gets is decided before drawing it (budget
        ``ctx.budget``); drafting stops after a level whose every node scores below
        ``ctx.min_score``, no drawn node dropped."""
        base = self.base
        expand = self._expander(ctx, root_logits)
        sampled = ctx.params.sampled_drafts
        if sampled and self.rng is None:
            self.rng = TorchRandom(ctx.seed + 0x5EED)
        tokens: list[int] = []
        parents: list[int] = []
        rows: list[torch.Tensor] = []
        scores: list[float] = []
        frontier = [-1]
        try:
            for level in range(1, depth + 1):
                width = self.num_drafts if level == self.branch_depth else 1
                if not frontier or len(tokens) + width * len(frontier) > ctx.budget:
                    break
                new = []
                for node, row in zip(frontier, expand(frontier, tokens, parents)):
                    if sampled:
                        drawn, row_of = self._draw(row, width)
                    else:
                        top = torch.topk(row, min(width, row.numel()))
                        drawn = [t for p, t in zip(top.values.tolist(), top.indices.tolist()) if p > 0]
                        row_of = [row] * len(drawn)
                    for tok, own in zip(drawn, row_of):
                        new.append(len(tokens))
                        tokens.append(tok)
                        parents.append(node)
                        rows.append(own)
                        scores.append((scores[node] if node >= 0 else 1.0) * float(row[tok]))
                frontier = new
                if max(scores[i] for i in frontier) < ctx.min_score:
                    break
        finally:
            self.model.crop(base)  # the tree nodes leave the cache; the committed tokens stay
        if not tokens:
            return Draft.empty()
        return Draft(torch.tensor(tokens), torch.tensor(parents),
                     torch.stack(rows) if sampled else None,
                     scores=torch.tensor(scores, dtype=torch.float64))

    def _draw(self, row: torch.Tensor, count: int) -> tuple[list[int], list[torch.Tensor]]:
        """``count`` children from ``row`` and the row each was drawn from: i.i.d., or without
        replacement (then fewer when the row runs out of tokens)."""
        if self.replacement:
            return [self.rng.categorical(row) for _ in range(count)], [row] * count
        drawn, rows, left = [], [], row
        for _ in range(count):
            total = float(left.sum())
            if total <= 0.0:
                break
            left = left / total
            drawn.append(self.rng.categorical(left))
            rows.append(left)
            left = left.clone()
            left[drawn[-1]] = 0.0
        return drawn, rows

    def observe(self, verdict: Verdict) -> None:
        # compare tokens, not node indices: a policy may have re-indexed the draft (Draft.subset)
        chain = self.chain_tokens
        accepted = verdict.tokens[:verdict.num_accepted]
        on_chain = 0
        while on_chain < min(len(accepted), len(chain)) and accepted[on_chain] == chain[on_chain]:
            on_chain += 1
        fed = max(0, len(chain) - 1)  # the last chain token was never fed
        self.model.crop(self.base + min(on_chain, fed))


# the drafter's options (defaults from its signature), and the draft model's reduced read-out
# (``draft_vocab``, which the draft-model factory reads)
DRAFT_OPTIONS = declare(DraftModelDrafter, {**DRAFT_TREE, "draft_vocab": owner_only("int", 0, "vocab")},
                        "DraftModelDrafter")
