"""``ConstraintState``: one request's matcher (an llguidance ``LLMatcher``) over a compiled
``Constraint``. Each step the engine calls ``shape(draft)`` (walk the tree depth-first with consume /
rollback: one mask per node; drop the point-mass nodes the grammar forbids; append the tokens the
grammar forces, a single legal token each, as point-mass chains after every leaf),
``mask_logits(logits)`` before the rule, ``own_verdict`` to hand the drafter a verdict in its own
node indices, and ``advance`` with the emitted tokens: the committed state moves only along
accepted tokens.

Sampled drafts (``draft_probs``) are never pruned: dropping a drawn token changes the
distribution. A forbidden sampled node has target probability 0, so every rule rejects it; the
rows under it are left unmasked (any distribution after an impossible prefix gives the same
output distribution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from specdecode.types import Draft, SpecDecodeError, Verdict

if TYPE_CHECKING:
    from specdecode.structured.constraint import Constraint


class ConstraintState:
    """One request's grammar state (see the module docstring). The matcher holds the committed
    output; probes (``shape``, drafters' ``push``) go deeper and always roll back to it."""

    def __init__(self, constraint: Constraint, eos_token_ids: frozenset[int],
                 jump_forward: bool) -> None:
        self.constraint = constraint
        self.matcher = constraint.proto.deep_copy()
        if self.matcher.is_error():
            raise SpecDecodeError(f"grammar failed to start: {self.matcher.get_error()}")
        self.vocab = constraint.vocab_size
        self.eos = constraint.eos_token_id
        self.eos_ids = sorted({t for t in eos_token_ids if 0 <= t < self.vocab} | {self.eos})
        self.jump_forward = jump_forward
        self.probe: list[int] = []  # tokens consumed past the committed state
        self.masks: torch.Tensor | None = None  # this step's [n + 1, vocab] bool
        self.node_map: list[int] = []  # proposed node -> shaped node (-1: pruned)
        self.num_proposed = 0
        self.forced = 0  # tokens appended because the grammar forced them (all steps)

    # -- the matcher --------------------------------------------------------------------------
    def allowed(self) -> torch.Tensor:
        """Bool [vocab] of the tokens legal at the probe's state; EOS ids follow the grammar's
        EOS (legal only where the grammar may end)."""
        raw = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        legal = torch.from_numpy(np.unpackbits(raw, bitorder="little")[:self.vocab].astype(bool))
        if self.matcher.is_error():
            raise RuntimeError(f"grammar state error: {self.matcher.get_error()}")
        legal[self.eos_ids] = bool(legal[self.eos])
        return legal

    def push(self, tokens: list[int]) -> int:
        """Consume as many of ``tokens`` as are legal at the probe's state; returns the count."""
        if not tokens:
            return 0
        n = int(self.matcher.try_consume_tokens(list(tokens)))
        self.probe.extend(tokens[:n])
        return n

    def ff_tokens(self) -> list[int]:
        """The grammar's forced continuation at the probe's state (canonical tokenization)."""
        if self.matcher.is_stopped():
            return []
        return [t for t in self.matcher.compute_ff_tokens() if t not in self.eos_ids]

    def reset_probe(self) -> None:
        if self.probe:
            self.matcher.rollback(len(self.probe))
            self.probe = []

    def _goto(self, path: list[int]) -> None:
        common = 0
        for a, b in zip(self.probe, path):
            if a != b:
                break
            common += 1
        if common < len(self.probe):
            self.matcher.rollback(len(self.probe) - common)
            del self.probe[common:]
        rest = path[common:]
        if rest:
            if not self.matcher.consume_tokens(rest):
                raise RuntimeError(f"grammar refused a legal path: {self.matcher.get_error()}")
            self.probe.extend(rest)

    # -- the engine's hooks -------------------------------------------------------------------
    def shape(self, draft: Draft, max_nodes: int, max_depth: int) -> Draft:
        """Prune forbidden point-mass nodes, append forced chains, compute every row's mask."""
        tokens, parents = draft.tokens.tolist(), draft.parents.tolist()
        sampled = draft.draft_probs is not None
        keep: list[int] = []  # proposed indices kept, in order
        new_parents: list[int] = []
        paths: list[list[int] | None] = []  # a kept node's token path (None: impossible prefix)
        depth: list[int] = []
        self.node_map = []
        self.num_proposed = len(tokens)
        masks = [self.allowed()]
        try:
            for i, (tok, par) in enumerate(zip(tokens, parents)):
                mpar = -1 if par < 0 else self.node_map[par]
                if par >= 0 and mpar < 0:
                    self.node_map.append(-1)
                    continue
                ppath = [] if mpar < 0 else paths[mpar]
                pmask = masks[mpar + 1]
                legal = ppath is not None and pmask is not None and tok < self.vocab \
                    and bool(pmask[tok])  # ids past the tokenizer (LM-head padding): illegal
                if not legal and not sampled:
                    self.node_map.append(-1)
                    continue
                self.node_map.append(len(keep))
                keep.append(i)
                new_parents.append(mpar)
                depth.append(1 if mpar < 0 else depth[mpar] + 1)
                if legal and tok not in self.eos_ids:  # rows after EOS are never emitted
                    paths.append(ppath + [tok])
                    self._goto(paths[-1])
                    masks.append(self.allowed())
                else:
                    paths.append(None)
                    masks.append(None)
            extra_tokens: list[int] = []
            extra_parents: list[int] = []
            if self.jump_forward:
                has_child = set(new_parents)
                leaves = [j for j in range(len(keep)) if j not in has_child] or [-1]
                if not keep:
                    leaves = [-1]
                for leaf in leaves:
                    node, path = leaf, [] if leaf < 0 else paths[leaf]
                    d = 0 if leaf < 0 else depth[leaf]
                    while path is not None and len(keep) + len(extra_tokens) < max_nodes \
                            and d < max_depth:
                        legal = masks[node + 1]
                        if legal is None or int(legal.sum()) != 1:
                            break
                        tok = int(legal.nonzero()[0, 0])
                        if tok in self.eos_ids:
                            break
                        extra_tokens.append(tok)
                        extra_parents.append(node)
                        node = len(keep) + len(extra_tokens) - 1
                        path = path + [tok]
                        paths.append(path)
                        d += 1
                        depth.append(d)
                        self._goto(path)
                        masks.append(self.allowed())
        finally:
            self.reset_probe()
        self.forced += len(extra_tokens)
        full = torch.ones(self.vocab, dtype=torch.bool)
        self.masks = torch.stack([full if m is None else m for m in masks])
        if len(keep) == len(tokens) and not extra_tokens:
            return draft
        return _rebuild(draft, keep, new_parents, extra_tokens, extra_parents)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [n + 1, W] with every illegal token at -inf (columns past the tokenizer's
        vocabulary too)."""
        assert self.masks is not None and self.masks.size(0) == logits.size(0)
        width = logits.size(-1)
        legal = self.masks[:, :width]
        if width > legal.size(1):
            legal = torch.cat([legal, legal.new_zeros(legal.size(0), width - legal.size(1))], 1)
        return logits.masked_fill(~legal.to(logits.device), float("-inf"))

    def own_verdict(self, verdict: Verdict, topk: int = 0) -> Verdict:
        """The verdict in the proposed draft's node indices (the path stops at the first node the
        drafter did not propose)."""
        if self.node_map == list(range(self.num_proposed)) and \
                verdict.num_drafted == self.num_proposed:
            return verdict
        return verdict.translated(self.node_map, self.num_proposed, topk)

    def advance(self, tokens: list[int]) -> None:
        """Commit emitted tokens to the grammar state."""
        self.masks = None
        ends = next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
        ok = not tokens[:ends] or self.matcher.consume_tokens(list(tokens[:ends]))
        if ok and ends < len(tokens):  # any EOS id ends it (consume_tokens refuses EOS once
            ok = self.matcher.consume_token(self.eos)  # the grammar is complete)
        if not ok:
            raise RuntimeError(f"grammar refused an emitted token: {self.matcher.get_error()}")

    def is_accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


def _rebuild(draft: Draft, keep: list[int], parents: list[int], extra: list[int],
             extra_parents: list[int]) -> Draft:
    idx = torch.tensor(keep, dtype=torch.long)
    tokens = torch.cat([draft.tokens[idx], torch.tensor(extra, dtype=torch.long)])
    all_parents = torch.tensor(parents + extra_parents, dtype=torch.long)
    probs = None
    if draft.draft_probs is not None:  # appended nodes are point masses: one-hot rows
        onehot = torch.zeros(len(extra), draft.draft_probs.size(1), dtype=draft.draft_probs.dtype)
        if extra:
            onehot[torch.arange(len(extra)), torch.tensor(extra)] = 1.0
        probs = torch.cat([draft.draft_probs[idx], onehot])
    sources = None
    if draft.sources is not None:
        sources = [draft.sources[i] for i in keep] + ["grammar"] * len(extra)
    scores = None
    if draft.scores is not None:
        kept = draft.scores[idx].tolist()
        for p in extra_parents:  # a forced token is accepted whenever its parent is
            kept.append(1.0 if p < 0 else kept[p])
        scores = torch.tensor(kept, dtype=draft.scores.dtype)
    return Draft(tokens, all_parents, probs, sources, scores)
