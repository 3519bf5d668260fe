"""The decoding loop (docs/DESIGN.md §2), for a batch of requests: each step, every running request plans
and proposes its own draft, one target forward verifies all of them together, then each request
accepts (pure rule), keeps its accepted path in its cache row, tells its drafter and policy, and
emits, until its ``max_new_tokens`` or EOS. A single request is a batch of one (``run``). With the
``none`` drafter this is vanilla decoding: the oracle every test and benchmark compares against.

Requests never share anything inside a step but the forward: each has its own drafter, policy,
random stream (seeded per request) and cache row, and the target sees exactly its own keys, so a
request's output does not depend on what else is in the batch.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from specdecode.drafters.base import DraftContext, Drafter
from specdecode.models import TargetModel
from specdecode.policies.base import Budget, Policy, StepRecord
from specdecode.policies.fixed import FixedPolicy
from specdecode.sampling import TorchRandom
from specdecode.types import Draft, RunStats, SamplingParams, StepEvent, StepStats, TargetFeedback
from specdecode.verify import verify

log = logging.getLogger("specdecode")

DEFAULT_MAX_DRAFT_NODES = 64


@dataclass(eq=False)
class Sequence:
    """One request in the loop. ``tokens`` are its committed tokens (prompt, then output); its cache
    row holds all but the last (the pending token). ``stats`` is filled as it goes.

    Optional drafter hooks, declared rather than type-checked: ``feedback_topk`` (an int > 0:
    each verdict then carries the target's top-k ids at every verified row, see ``TargetFeedback``,
    and the first proposal those of the prompt), ``feedback_hidden`` (True: each proposal gets the
    target's features of the committed tokens it has not seen yet, ``DraftContext.hidden``) and
    ``finish(output)``, called once when the request ends, however it ends (cross-request stores
    learn there).

    ``policy`` (default ``fixed``) sets each step's budget; when it says 0 nodes the step is a plain
    step and the drafter is neither asked nor told (it catches up from ``ctx.tokens`` next time).
    A policy that declares a ``batch_size`` attribute has it set to the number of rows in flight
    before each ``plan``.

    ``constraint`` (optional, ``structured.ConstraintState``): the request's grammar state. It
    shapes each draft (``shape``: drops forbidden point-mass nodes, appends forced tokens, one mask
    per node), masks the logits before the rule (``mask_logits``) and advances only along the
    emitted tokens (``advance``); drafters see it as ``ctx.constraint``."""

    prompt: list[int]
    drafter: Drafter
    params: SamplingParams
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    max_draft_nodes: int = DEFAULT_MAX_DRAFT_NODES
    policy: Policy = field(default_factory=FixedPolicy)
    stats: RunStats = field(default_factory=RunStats)
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    finished: bool = False
    row: int = -1
    constraint: Any = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(62)
        self.rng = TorchRandom(self.seed)
        self.feedback_topk = int(getattr(self.drafter, "feedback_topk", 0) or 0)
        self.feedback_hidden = bool(getattr(self.drafter, "feedback_hidden", False))
        # which of the target's features: its final-normed states (-1), or layers' outputs
        self.features = tuple(getattr(self.drafter, "feature_layers", None) or (-1,)) \
            if self.feedback_hidden else ()
        self.hidden: list = []  # target features of committed tokens not yet given to the drafter
        self.prefill_topk = None
        self.warned = False
        self.start = time.perf_counter()
        # this step's: budget, proposed and verified draft, stats
        self.budget = Budget(0, 0)
        self.proposed = self.draft = Draft.empty()
        self.step = StepStats()

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]


class Batch:
    """The running requests on one target, one cache row each. ``add`` prefills a request (it joins
    at the next ``step``); ``step`` runs one verification step for all of them and returns their
    events; a request that finishes leaves the batch at once (its row is freed, its drafter's
    ``finish`` is called); ``remove`` takes one out early (abort)."""

    def __init__(self, target: TargetModel) -> None:
        self.target = target
        self.seqs: list[Sequence] = []  # seqs[r] owns cache row r

    def __len__(self) -> int:
        return len(self.seqs)

    def _need(self, seq: Sequence) -> int:
        """Cache slots ``seq`` may use: all its tokens plus one step's draft."""
        need = len(seq.tokens) + seq.max_new_tokens + seq.max_draft_nodes + 1
        if self.target.max_length is not None:
            need = min(need, self.target.max_length + seq.max_draft_nodes + 1)
        return need

    def reserve(self, joining: list[Sequence]) -> None:
        """Make room for ``joining`` at once (one allocation instead of one per request)."""
        if joining:
            self.target.reserve(len(self.seqs) + len(joining),
                                max(self._need(s) for s in joining))

    def add(self, *seqs: Sequence) -> None:
        """Prefill ``seqs`` (in one forward where the target can) and give each its row."""
        for seq in seqs:
            seq.row = self.target.add_row(self._need(seq))
            self.seqs.append(seq)
        start = time.perf_counter()
        todo = [seq for seq in seqs if len(seq.tokens) > 1]
        layers = _feature_union(todo)
        if todo:
            all_logits = self.target.prefill_rows([s.row for s in todo],
                                                  [s.tokens[:-1] for s in todo],
                                                  [not s.feedback_topk for s in todo], layers)
            for i, (seq, logits) in enumerate(zip(todo, all_logits)):
                if seq.feedback_hidden:
                    seq.hidden.append(_own_features(seq, layers, self.target.hidden[i]))
                if seq.feedback_topk:
                    seq.prefill_topk = logits.topk(min(seq.feedback_topk, logits.size(-1)),
                                                   dim=-1).indices
        for seq in seqs:  # a request waits for the prefill it joined with
            seq.stats.prefill_s = time.perf_counter() - start

    def remove(self, seq: Sequence) -> None:
        """Free ``seq``'s row now and tell its drafter the request ended."""
        if seq.row < 0:
            return
        moved = self.target.remove_row(seq.row)
        last = self.seqs.pop()
        if moved is not None:
            self.seqs[seq.row] = last
            last.row = seq.row
        seq.row = -1
        seq.finished = True
        seq.stats.wall_s = time.perf_counter() - seq.start
        finish = getattr(seq.drafter, "finish", None)
        if finish is not None:
            try:
                finish(seq.output)
            except Exception as err:  # noqa: BLE001 - a drafter bug never changes the output
                log.warning("drafter.finish failed (%s: %s)", type(err).__name__, err)

    def step(self) -> list[tuple[Sequence, StepEvent]]:
        """One verification step for every request in the batch."""
        events: list[tuple[Sequence, StepEvent]] = []
        done = [s for s in self.seqs if not _room(s, self.target.max_length)]
        for seq in done:  # nothing left to generate: finished without a forward
            events.append((seq, StepEvent([], StepStats(), finished=True, finish_reason="length")))
            self.remove(seq)
        if not self.seqs:
            return events
        for seq in self.seqs:
            _propose(seq, self.target, len(self.seqs))
        verify_start = time.perf_counter()
        layers = _feature_union(self.seqs)
        all_logits = self.target.step([s.tokens[-1] for s in self.seqs],
                                      [s.draft for s in self.seqs], hidden=layers)
        features = [_own_features(s, layers, f) for s, f in zip(self.seqs, self.target.hidden)] \
            if layers else [None] * len(self.seqs)
        verify_s = time.perf_counter() - verify_start
        tokens_in_forward = len(self.seqs) * max(len(s.draft) + 1 for s in self.seqs)
        for seq, logits, rows in zip(list(self.seqs), all_logits, features):
            event = _commit(seq, self.target, logits, verify_s, len(self.seqs), tokens_in_forward,
                            rows)
            events.append((seq, event))
        for seq, event in events:
            if event.finished and seq.row >= 0:
                self.remove(seq)
        return events


def _room(seq: Sequence, limit: int | None) -> int:
    """How many more tokens ``seq`` may emit (output budget and context)."""
    room = seq.max_new_tokens - seq.generated
    if limit is not None:
        room = min(room, limit - len(seq.tokens))
    return max(0, room)


def _propose(seq: Sequence, target: TargetModel, batch_size: int) -> None:
    """Plan and propose ``seq``'s draft for this step (a failing drafter: an empty draft)."""
    start = time.perf_counter()
    seq.step = step = StepStats()
    # Never draft past the output budget or the context: the bonus token fills the last slot.
    if hasattr(seq.policy, "batch_size"):
        seq.policy.batch_size = batch_size
    seq.budget = budget = _plan(seq.policy, seq.max_draft_nodes, _room(seq, target.max_length) - 1)
    seq.draft = seq.proposed = Draft.empty()
    if not budget.off:
        ctx = DraftContext(seq.tokens, len(seq.prompt), budget.nodes, budget.depth, seq.params,
                           seq.seed, seq.prefill_topk, budget.min_score)
        seq.prefill_topk = None
        ctx.constraint = seq.constraint
        if seq.feedback_hidden:
            ctx.hidden = torch.cat(seq.hidden) if seq.hidden else None
            seq.hidden = []
        try:
            draft = seq.drafter.propose(ctx).limited(budget.nodes, budget.depth)
            draft.validate(target.vocab_size)
            seq.proposed = draft
            draft = seq.policy.select(draft)
            if draft is not seq.proposed:  # a cut draft is checked again
                draft.validate(target.vocab_size)
            seq.draft = draft
        except Exception as err:  # noqa: BLE001 - any drafter failure falls back
            seq.draft = seq.proposed = Draft.empty()
            step.fallback = True
            if not seq.warned:
                log.warning("drafter failed (%s: %s); falling back to plain steps",
                            type(err).__name__, err)
                seq.warned = True
    if seq.constraint is not None:  # the grammar prunes, extends and masks the draft
        seq.draft = seq.constraint.shape(seq.draft, seq.max_draft_nodes,
                                         _room(seq, target.max_length) - 1)
    step.draft_s = time.perf_counter() - start


def _feature_union(seqs) -> tuple[int, ...]:
    """The target features any of ``seqs``' drafters wants (layer indices; () for none)."""
    return tuple(sorted({layer for seq in seqs for layer in seq.features}))


def _own_features(seq: Sequence, layers: tuple[int, ...], rows: torch.Tensor
                  ) -> torch.Tensor | None:
    """``seq``'s drafter's features out of the ``layers`` the target gave, in its own order."""
    if not seq.features:
        return None
    if seq.features == layers:
        return rows
    width = rows.shape[-1] // len(layers)
    return torch.cat([rows[..., layers.index(i) * width:(layers.index(i) + 1) * width]
                      for i in seq.features], -1)


def _commit(seq: Sequence, target: TargetModel, logits, verify_s: float, batch_size: int,
            tokens_in_forward: int, features=None) -> StepEvent:
    """Accept (pure rule), keep the accepted path in the row, feed back, emit."""
    start = time.perf_counter()
    step, draft, proposed = seq.step, seq.draft, not seq.budget.off
    step.verify_s = verify_s
    scores = logits if seq.constraint is None else seq.constraint.mask_logits(logits)
    verdict = verify(draft, scores, seq.params, seq.rng, seq.seed, base_position=len(seq.tokens))
    target.keep(seq.row, verdict.path)
    if seq.feedback_hidden and features is not None:  # the pending token's and the accepted path's
        seq.hidden.append(features[[0] + [i + 1 for i in verdict.path]])
    if seq.feedback_topk and proposed:  # computed once, from the logits this step already has
        verdict.feedback = TargetFeedback(
            [seq.tokens[-1]] + draft.tokens.tolist(),
            logits.topk(min(seq.feedback_topk, logits.size(-1)), dim=-1).indices)
    if proposed:
        try:
            seq.drafter.observe(verdict if seq.constraint is None
                                else seq.constraint.own_verdict(verdict, seq.feedback_topk))
        except Exception as err:  # noqa: BLE001
            step.fallback = True
            log.warning("drafter.observe failed (%s: %s)", type(err).__name__, err)

    # emit, honouring max_new_tokens and EOS inside the accepted tokens exactly
    new = verdict.tokens[:seq.max_new_tokens - seq.generated]
    reason = None
    for i, tok in enumerate(new):
        if tok in seq.eos_token_ids:
            new, reason = new[:i + 1], "eos"
            break
    seq.tokens.extend(new)
    if seq.constraint is not None:
        seq.constraint.advance(new)
    seq.generated += len(new)
    if reason is None and seq.generated >= seq.max_new_tokens:
        reason = "length"
    step.drafted, step.emitted = len(draft), len(new)
    step.accepted = min(verdict.num_accepted, len(new))
    step.other_s = time.perf_counter() - start
    step.planned = seq.budget.depth if proposed else 0
    _observe(seq.policy, seq.budget, seq.proposed, draft, verdict.num_accepted, step, batch_size,
             tokens_in_forward)
    seq.stats.add(step)
    seq.stats.wall_s = time.perf_counter() - seq.start
    return StepEvent(new, step, finished=reason is not None, finish_reason=reason)


def run(target: TargetModel, prompt: list[int], drafter: Drafter, params: SamplingParams, *,
        max_new_tokens: int, eos_token_ids: frozenset[int] = frozenset(),
        max_draft_nodes: int = DEFAULT_MAX_DRAFT_NODES, stats: RunStats | None = None,
        policy: Policy | None = None, constraint: Any = None) -> Iterator[StepEvent]:
    """Decode one request (a batch of one), yielding a ``StepEvent`` per verification step.
    ``prompt`` is non-empty and fits the target's context (the public API checks both); ``target``
    holds no other rows. ``stats`` is filled as it goes."""
    seq = Sequence(prompt, drafter, params, max_new_tokens, eos_token_ids, max_draft_nodes,
                   policy if policy is not None else FixedPolicy(),
                   stats if stats is not None else RunStats(), constraint=constraint)
    batch = Batch(target)
    batch.add(seq)
    try:
        while not seq.finished and seq.max_new_tokens > 0:
            for _, event in batch.step():
                yield event
    finally:
        batch.remove(seq)


def _plan(policy: Policy, max_nodes: int, max_depth: int) -> Budget:
    """The policy's budget, clamped to the engine's limits; a failing policy means a full budget
    (the behaviour of ``fixed``)."""
    if max_depth <= 0 or max_nodes <= 0:
        return Budget(0, 0)
    try:
        budget = policy.plan(max_nodes, max_depth)
        return Budget(max(0, min(int(budget.nodes), max_nodes)),
                      max(0, min(int(budget.depth), max_depth)), float(budget.min_score))
    except Exception as err:  # noqa: BLE001 - a policy bug costs speed, never correctness
        log.warning("policy.plan failed (%s: %s); drafting the full budget", type(err).__name__,
                    err)
        return Budget(max_nodes, max_depth)


def _observe(policy: Policy, budget: Budget, proposed: Draft, draft: Draft, accepted: int,
             step: StepStats, batch_size: int = 1, tokens_in_forward: int = 0) -> None:
    n = len(draft)
    depth = int(draft.depths().max()) if n else 0
    if proposed is not draft:  # ``select`` cut it
        proposed_depth = int(proposed.depths().max()) if len(proposed) else 0
    else:
        proposed_depth = depth
    record = StepRecord(
        budget=budget, drafted=n, depth=depth, accepted=accepted, draft_s=step.draft_s,
        verify_s=step.verify_s, other_s=step.other_s, tree=not draft.is_chain(),
        score_sum=None if draft.scores is None else float(draft.scores.sum()),
        proposed=len(proposed), proposed_depth=proposed_depth, batch_size=batch_size,
        batch_tokens=tokens_in_forward or n + 1)
    try:
        policy.observe(record)
    except Exception as err:  # noqa: BLE001
        log.warning("policy.observe failed (%s: %s)", type(err).__name__, err)
