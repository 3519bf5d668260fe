"""``mix``: one draft tree from several drafters under one node budget.

The shape follows GOOSE (anisotropic trees: a deep spine of context matches, wide shallow branches
from an adjacency table; "GOOSE", 2025) and Hierarchy Drafting (sources queried in order of
locality): the first source drafts first, with up to ``spine_nodes`` nodes; each next source drafts
with the budget that is left, and its nodes are merged into the same trie (a node whose root path is
already in the tree is shared, never duplicated). ``Draft.sources`` names the source that first
proposed each node.

Every source keeps working as if it were alone: after the verdict it receives a translated verdict
(``Verdict.translated``) whose path and feedback rows are in its own node indices (the accepted
path as far as it runs through its own nodes). A source that raises is skipped for that step; the
others still draft.

Options: ``sources`` (names joined by ``+``, e.g. ``suffix+token-recycling``; any registered
drafters, ``draft-model`` included), ``max_nodes`` (total budget), ``spine_nodes`` (the first
source's share, default half), ``num_draft_tokens`` (depth, passed to every source that takes it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from specdecode.drafters.base import BuildContext, DraftContext, Drafter
from specdecode.drafters.options import NODES, Option, count
from specdecode.drafters.registry import REGISTRY, make_drafter, register
from specdecode.types import Draft, SpecDecodeError, Verdict

log = logging.getLogger("specdecode")


@dataclass
class Merged:
    """A merged draft and, per source, the merged index of each of its nodes (-1 if dropped)."""

    draft: Draft
    node_maps: list[list[int]]


def merge_drafts(parts: list[tuple[str, Draft]], budget: int) -> Merged:
    """Merge drafts into one trie of at most ``budget`` nodes, in order: all of the first draft's
    nodes that fit, then the second's, ... A node is kept only if its parent was kept."""
    tokens: list[int] = []
    parents: list[int] = []
    sources: list[str] = []
    child_of: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    maps = []
    for name, draft in parts:
        node_map = []
        for tok, par in zip(draft.tokens.tolist(), draft.parents.tolist()):
            mparent = -1 if par < 0 else node_map[par]
            if par >= 0 and mparent < 0:  # its parent was dropped
                node_map.append(-1)
                continue
            key = (mparent, tok)
            node = child_of.get(key)
            if node is None and len(tokens) < budget:
                node = len(tokens)
                child_of[key] = node
                tokens.append(tok)
                parents.append(mparent)
                sources.append(name)
            node_map.append(-1 if node is None else node)
        maps.append(node_map)
    draft = Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                  None, sources)
    return Merged(draft, maps)


class MixDrafter:
    def __init__(self, sources: list[tuple[str, Drafter]], max_nodes: int, spine_nodes: int) -> None:
        self.sources = sources
        self.max_nodes, self.spine_nodes = max_nodes, spine_nodes
        self.feedback_topk = max(int(getattr(d, "feedback_topk", 0) or 0) for _, d in sources)
        # features go to every source (a feature drafter left out of a step starts afresh later)
        self.feedback_hidden = any(getattr(d, "feedback_hidden", False) for _, d in sources)
        # the target features the sources read (an EAGLE-3 head: its layers' outputs; EAGLE-1 and
        # Medusa: the final-normed states, -1), asked for once; each source gets its own columns
        wants = [tuple(getattr(d, "feature_layers", None) or (-1,))
                 if getattr(d, "feedback_hidden", False) else () for _, d in sources]
        self.feature_layers = tuple(dict.fromkeys(i for w in wants for i in w)) or None
        self.columns = [[self.feature_layers.index(i) for i in w] if w else None for w in wants]
        self.last: tuple[Merged, list[int], list[bool]] | None = None

    def _hidden(self, hidden, source: int):
        """``hidden`` ([m, len(feature_layers) * H]) cut to source ``source``'s own features."""
        columns = self.columns[source]
        if hidden is None or columns is None or columns == list(range(len(self.feature_layers))):
            return hidden
        width = hidden.shape[-1] // len(self.feature_layers)
        return torch.cat([hidden[..., c * width:(c + 1) * width] for c in columns], -1)

    def propose(self, ctx: DraftContext) -> Draft:
        budget = min(self.max_nodes, ctx.budget)
        parts: list[tuple[str, Draft]] = []
        asked: list[bool] = []  # which sources proposed this step (only they observe its verdict)
        merged = merge_drafts(parts, budget)
        for i, (name, drafter) in enumerate(self.sources):
            share = min(self.spine_nodes, budget) if i == 0 else budget - len(merged.draft)
            asked.append(share > 0)
            if share <= 0:
                parts.append((name, Draft.empty()))
                continue
            topk = int(getattr(drafter, "feedback_topk", 0) or 0)
            prefill = ctx.prefill_topk_ids
            sub = replace(ctx, budget=share, prefill_topk_ids=None if prefill is None or not topk
                          else prefill[:, :topk], hidden=self._hidden(ctx.hidden, i))
            try:
                draft = drafter.propose(sub).limited(share, ctx.max_depth)
            except Exception as err:  # noqa: BLE001 - one failing source never stops the others
                log.warning("mix source %s failed (%s: %s)", name, type(err).__name__, err)
                draft = Draft.empty()
            parts.append((name, draft))
            merged = merge_drafts(parts, budget)
        if len(merged.node_maps) < len(parts):  # the last sources were skipped: no nodes to merge
            merged.node_maps += [[] for _ in range(len(parts) - len(merged.node_maps))]
        self.last = (merged, [len(d) for _, d in parts], asked)
        return merged.draft

    def observe(self, verdict: Verdict) -> None:
        if self.last is None:
            return
        merged, sizes, asked = self.last
        for (name, drafter), node_map, size, proposed in zip(self.sources, merged.node_maps, sizes,
                                                             asked):
            if not proposed:
                continue
            own = verdict.translated(node_map, size, int(getattr(drafter, "feedback_topk", 0) or 0))
            try:
                drafter.observe(own)
            except Exception as err:  # noqa: BLE001
                log.warning("mix source %s observe failed (%s: %s)", name, type(err).__name__, err)

    def finish(self, output: list[int]) -> None:
        for _, drafter in self.sources:
            finish = getattr(drafter, "finish", None)
            if finish is not None:
                finish(output)


def _source_options(name: str, options: dict) -> dict:
    return {k: v for k, v in options.items() if k in REGISTRY[name].options}


DEFAULT_SOURCES = "suffix+token-recycling"


@register("mix", sources="sources", options={
    "sources": Option("names"), "max_nodes": NODES, "spine_nodes": count(1, "nodes", nullable=True),
    "num_draft_tokens": count(1, "nodes", nullable=True)})
def build_mix(build: BuildContext, sources: str | list[str] = DEFAULT_SOURCES,
              max_nodes: int = 8, spine_nodes: int | None = None,
              num_draft_tokens: int | None = None, **source_options) -> MixDrafter:
    names = sources.split("+") if isinstance(sources, str) else list(sources)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise SpecDecodeError("mix needs sources=name+name (e.g. suffix+token-recycling)")
    nested = [n for n in names if n in REGISTRY and REGISTRY[n].sources is not None]
    if nested:
        raise SpecDecodeError(f"mix cannot take {', '.join(nested)} as a source (a drafter with "
                              "sources cannot be its own source, nor another's)")
    if max_nodes < 1:
        raise SpecDecodeError(f"mix max_nodes must be >= 1, got {max_nodes}")
    spine = max_nodes // 2 if spine_nodes is None else spine_nodes
    if not 1 <= spine <= max_nodes:
        raise SpecDecodeError(f"mix spine_nodes must be in [1, max_nodes], got {spine}")
    shared = dict(source_options)
    if num_draft_tokens is not None:
        shared["num_draft_tokens"] = num_draft_tokens
    built = []
    for name in names:
        if name not in REGISTRY:
            raise SpecDecodeError(f"mix source {name!r} is not a registered drafter")
        built.append((name, make_drafter(name, build, **_source_options(name, shared))))
    unused = [k for k in source_options
              if not any(k in REGISTRY[n].options for n in names)]
    if unused:
        raise SpecDecodeError(f"mix: no source takes option(s) {', '.join(unused)}")
    return MixDrafter(built, max_nodes, spine)
