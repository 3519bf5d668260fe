"""Core types shared by the engine, drafters, acceptance rules, CLI and benchmark (docs/DESIGN.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SpecDecodeError(ValueError):
    """Bad input detected before decoding starts; the message names the problem."""


# Sampling rules (``SamplingParams.mode``), every one lossless: the rule table in ``verify/`` has
# exactly these keys (checked when it is built). Under all but "coupled" the drafters that can
# sample draw their drafts from their processed distributions (``draft_probs``).
SAMPLING_MODES = ("rejection", "coupled", "block", "traversal", "spectr")
# The default rule: traversal verification (block verification on chains) accepts at least as much
# as token-level rejection sampling with the same draft, and measured more at temperature 1 (quick
# benchmark, demo pair: draft-model chain MAT 2.68 -> 2.89, 1.23x -> 1.32x; delayed tree 2.79 ->
# 3.13; EAGLE-2 tree 2.05 -> 2.20; docs/benchmarks/quick-rules-t1-cpu). Point-mass drafts use the
# point-mass rule under every mode.
DEFAULT_SAMPLING = "traversal"


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` means greedy (argmax).

    ``mode`` (``verify.SAMPLING_MODES``, default ``DEFAULT_SAMPLING``) is ``"rejection"``
    (Leviathan/Chen rejection sampling, recursive over tree siblings, with an engine RNG),
    ``"coupled"`` (noise keyed by ``(seed, absolute position)``: output bit-identical to vanilla),
    ``"block"`` (block verification of sampled chains), ``"traversal"`` (traversal verification of
    sampled trees and chains) or ``"spectr"`` (SpecTr's k-sequential rule over i.i.d. siblings); see
    ``verify/`` for each rule's fallback.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    mode: str = DEFAULT_SAMPLING

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise SpecDecodeError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise SpecDecodeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SpecDecodeError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.mode not in SAMPLING_MODES:
            raise SpecDecodeError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, "
                                  f"got {self.mode!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def sampled_drafts(self) -> bool:
        """Whether drafters able to sample should draw their drafts (with ``draft_probs``)."""
        return not self.greedy and self.mode != "coupled"


@dataclass
class Draft:
    """Candidate tokens as a tree. ``parents[i]`` is the index of node i's parent (-1: the last
    committed token), always smaller than i; a chain is ``[-1, 0, 1, ...]``.

    ``draft_probs`` [n, V] is the distribution node i was sampled from (processed like the
    target's); ``None`` means a deterministic proposal (point mass). ``sources`` names the drafter
    of each node in mixed trees. ``scores`` [n] (optional) is the drafter's own estimate that node i
    is accepted (the product of draft probabilities along its path): it never decreases from a
    node to its parent, and a policy may use it to keep only the nodes that pay (deterministic
    drafts only, see ``policies``).
    """

    tokens: torch.Tensor  # [n] long
    parents: torch.Tensor  # [n] long
    draft_probs: torch.Tensor | None = None
    sources: list[str] | None = None
    scores: torch.Tensor | None = None  # [n] float in [0, 1]

    @classmethod
    def chain(cls, tokens, draft_probs: torch.Tensor | None = None) -> Draft:
        t = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens,
                            dtype=torch.long).reshape(-1)
        return cls(t, torch.arange(-1, t.numel() - 1, dtype=torch.long), draft_probs)

    @classmethod
    def empty(cls) -> Draft:
        return cls.chain([])

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def is_chain(self) -> bool:
        """Every node's parent is the node before it (an empty draft is a chain)."""
        n = len(self)
        return n == 0 or torch.equal(self.parents, torch.arange(-1, n - 1))

    def depths(self) -> torch.Tensor:
        """Depth of each node (children of the root have depth 1)."""
        depth = torch.zeros(len(self), dtype=torch.long)
        parents = self.parents.tolist()
        for i, p in enumerate(parents):
            depth[i] = 1 if p < 0 else depth[p] + 1
        return depth

    def truncated(self, n: int) -> Draft:
        """The first n nodes (valid because parents precede children)."""
        probs = None if self.draft_probs is None else self.draft_probs[:n]
        sources = None if self.sources is None else self.sources[:n]
        scores = None if self.scores is None else self.scores[:n]
        return Draft(self.tokens[:n], self.parents[:n], probs, sources, scores)

    def limited(self, budget: int, max_depth: int) -> Draft:
        """At most ``budget`` nodes and depth ``max_depth`` (parents are re-indexed)."""
        draft = self.truncated(budget) if len(self) > budget else self
        if len(draft) == 0 or max_depth >= len(draft):
            return draft
        return draft.subset(draft.depths() <= max_depth)

    def subset(self, keep: torch.Tensor) -> Draft:
        """The nodes where ``keep`` [n] bool is true; every kept node's parent must be kept."""
        if bool(keep.all()):
            return self
        new_index = torch.cumsum(keep.long(), 0) - 1
        parents = torch.where(self.parents >= 0, new_index[self.parents.clamp(min=0)], -1)
        probs = None if self.draft_probs is None else self.draft_probs[keep]
        sources = None if self.sources is None else [s for s, k in zip(self.sources, keep) if k]
        scores = None if self.scores is None else self.scores[keep]
        return Draft(self.tokens[keep], parents[keep], probs, sources, scores)

    def validate(self, vocab_size: int) -> None:
        n = len(self)
        if self.parents.numel() != n:
            raise ValueError("draft tokens and parents differ in length")
        if n and (self.parents >= torch.arange(n)).any():
            raise ValueError("draft parents must precede their children")
        if n and (self.parents < -1).any():
            raise ValueError("draft parent index below -1")
        if n and ((self.tokens < 0) | (self.tokens >= vocab_size)).any():
            raise ValueError("draft token outside the vocabulary")
        if self.draft_probs is not None and tuple(self.draft_probs.shape) != (n, vocab_size):
            raise ValueError(f"draft_probs must be [{n}, {vocab_size}]")
        if self.scores is not None and tuple(self.scores.shape) != (n,):
            raise ValueError(f"draft scores must be [{n}]")


@dataclass
class TargetFeedback:
    """What the target itself predicted this step, for drafters that ask for it (a drafter declares
    ``feedback_topk = k > 0``; the engine then fills ``Verdict.feedback``; others pay nothing).

    Rows follow the verification forward: row 0 is the pending token (the last committed token
    before this step), row i + 1 is draft node i, rejected nodes included. ``row_tokens[r]`` is the
    input token of row r and ``topk_ids[r]`` the target's k most likely next tokens after it, best
    first (from the raw logits, so the same ids under greedy and sampling); the same for the prompt
    comes earlier, with the first proposal (``DraftContext.prefill_topk_ids``). The target's
    features travel the other way, with each proposal (``DraftContext.hidden``)."""

    row_tokens: list[int]
    topk_ids: torch.Tensor  # [n + 1, k] long


@dataclass
class Verdict:
    """Outcome of verifying one draft: the accepted path (node indices, root to leaf) and the
    tokens emitted this step (the accepted draft tokens, then one bonus/correction token).

    The acceptance rules fill the first three fields; ``feedback`` is added by the engine after the
    rule, only for drafters that declared ``feedback_topk``."""

    path: list[int]
    tokens: list[int]
    num_drafted: int
    feedback: TargetFeedback | None = None

    @property
    def num_accepted(self) -> int:
        return len(self.path)

    def translated(self, node_map: list[int], num_drafted: int, topk: int = 0) -> Verdict:
        """The verdict as a drafter sees it whose ``num_drafted`` nodes became nodes ``node_map``
        of the verified draft (-1: dropped; a ``mix`` source, a draft cut by the grammar): the
        accepted path in its own node indices, as far as it runs through them, and, if it asked for
        ``topk`` > 0 feedback, the feedback rows of its own nodes (None if any of its nodes was
        dropped: those rows were never verified)."""
        own = {m: i for i, m in enumerate(node_map) if m >= 0}
        path = []
        for node in self.path:
            if node not in own:
                break
            path.append(own[node])
        fb, feedback = self.feedback, None
        if topk > 0 and fb is not None and all(m >= 0 for m in node_map):
            rows = [0] + [m + 1 for m in node_map]
            feedback = TargetFeedback([fb.row_tokens[r] for r in rows], fb.topk_ids[rows, :topk])
        return Verdict(path, list(self.tokens), num_drafted, feedback)


@dataclass
class StepStats:
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    fallback: bool = False  # the drafter raised; this was a plain step
    planned: int = 0  # the depth the policy allowed (0: it chose a plain step)


@dataclass
class RunStats:
    """Totals over a generation (docs/DESIGN.md §5 metric names)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    wall_s: float = 0.0
    fallbacks: int = 0
    plain_steps: int = 0  # steps where the policy chose not to draft
    accepted_per_pos: list[int] = field(default_factory=list)

    def add(self, step: StepStats) -> None:
        self.steps += 1
        self.drafted += step.drafted
        self.accepted += step.accepted
        self.emitted += step.emitted
        self.draft_s += step.draft_s
        self.verify_s += step.verify_s
        self.other_s += step.other_s
        self.fallbacks += int(step.fallback)
        self.plain_steps += int(step.planned == 0)
        while len(self.accepted_per_pos) < step.accepted:
            self.accepted_per_pos.append(0)
        for i in range(step.accepted):
            self.accepted_per_pos[i] += 1

    @property
    def mat(self) -> float:
        """Mean accepted tokens per step (accepted draft tokens + 1); vanilla = 1.0."""
        return self.emitted / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.emitted / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "emitted": self.emitted, "mat": round(self.mat, 4),
                "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_s": round(self.tokens_per_s, 2), "wall_s": round(self.wall_s, 4),
                "prefill_s": round(self.prefill_s, 4), "draft_s": round(self.draft_s, 4),
                "verify_s": round(self.verify_s, 4), "other_s": round(self.other_s, 4),
                "fallbacks": self.fallbacks, "plain_steps": self.plain_steps,
                "accepted_per_pos": list(self.accepted_per_pos)}


@dataclass
class StepEvent:
    """One verification step as seen by ``stream``: the tokens it emitted and its stats."""

    tokens: list[int]
    stats: StepStats
    finished: bool = False
    finish_reason: str | None = None  # "eos" or "length"


@dataclass
class GenerationResult:
    token_ids: list[int]
    accept_lengths: list[int]
    stats: RunStats
    finish_reason: str | None = None
    steps: list[StepStats] = field(default_factory=list)  # per verification step, in order
