"""The decoding loop (DESIGN.md §2): prefill, then propose -> one target forward -> accept -> keep ->
observe, until ``max_new_tokens`` or EOS. With the ``none`` drafter this is vanilla decoding: the
oracle every test and benchmark compares against.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator

from specdecode.drafters.base import DraftContext, Drafter
from specdecode.models.hf import TargetModel
from specdecode.policies.base import Budget, Policy, StepRecord
from specdecode.policies.fixed import FixedPolicy
from specdecode.sampling import TorchRandom
from specdecode.types import Draft, RunStats, SamplingParams, StepEvent, StepStats, TargetFeedback
from specdecode.verify import verify

log = logging.getLogger("specdecode")

DEFAULT_MAX_DRAFT_NODES = 64


def run(target: TargetModel, prompt: list[int], drafter: Drafter, params: SamplingParams, *,
        max_new_tokens: int, eos_token_ids: frozenset[int] = frozenset(),
        max_draft_nodes: int = DEFAULT_MAX_DRAFT_NODES, stats: RunStats | None = None,
        policy: Policy | None = None) -> Iterator[StepEvent]:
    """Decode one request, yielding a ``StepEvent`` per verification step. ``prompt`` is non-empty
    and fits the target's context (the public API checks both). ``stats`` is filled as it goes.

    Two optional drafter hooks, declared rather than type-checked: ``feedback_topk`` (an int > 0:
    each verdict then carries the target's top-k ids at every verified row, see ``TargetFeedback``,
    and the first proposal those of the prompt)
    and ``finish(output)``, called once when the request ends, however it ends (cross-request stores
    learn there).

    ``policy`` (default ``fixed``) sets each step's budget; when it says 0 nodes the step is a plain
    step and the drafter is neither asked nor told (it catches up from ``ctx.tokens`` next time)."""
    policy = policy if policy is not None else FixedPolicy()
    stats = stats if stats is not None else RunStats()
    start = time.perf_counter()
    seed = params.seed if params.seed is not None else random.getrandbits(62)
    rng = TorchRandom(seed)
    tokens = list(prompt)  # committed tokens; the cache holds all but the last (the pending one)
    feedback_topk = int(getattr(drafter, "feedback_topk", 0) or 0)
    prefill_topk = None
    target.reset()
    if len(tokens) > 1:
        logits = target.extend(tokens[:-1], last_only=not feedback_topk)
        if feedback_topk:
            prefill_topk = logits.topk(min(feedback_topk, logits.size(-1)), dim=-1).indices
    stats.prefill_s = time.perf_counter() - start
    limit = target.max_length
    warned = False
    generated = 0
    try:
        while generated < max_new_tokens:
            step_start = time.perf_counter()
            step = StepStats()
            room = (limit - len(tokens)) if limit is not None else max_new_tokens
            if room <= 0:
                yield StepEvent([], step, finished=True, finish_reason="length")
                break
            # Never draft past the output budget or the context: the bonus token fills the last slot.
            max_depth = min(max_new_tokens - generated, room) - 1
            budget = _plan(policy, max_draft_nodes, max_depth)
            proposed = not budget.off

            # 1. propose (a failing drafter costs speed, never correctness: plain step instead)
            draft = proposed_draft = Draft.empty()
            if proposed:
                ctx = DraftContext(tokens, len(prompt), budget.nodes, budget.depth, params, seed,
                                   prefill_topk, budget.min_score)
                prefill_topk = None
                try:
                    draft = drafter.propose(ctx).limited(budget.nodes, budget.depth)
                    draft.validate(target.vocab_size)
                    proposed_draft = draft
                    draft = policy.select(draft)
                    if draft is not proposed_draft:  # a cut draft is checked again
                        draft.validate(target.vocab_size)
                except Exception as err:  # noqa: BLE001 - any drafter failure falls back
                    draft, step.fallback = Draft.empty(), True
                    if not warned:
                        log.warning("drafter failed (%s: %s); falling back to plain steps",
                                    type(err).__name__, err)
                        warned = True
            verify_start = time.perf_counter()
            step.draft_s = verify_start - step_start

            # 2. one target forward over the pending token and every draft node
            logits = target.forward_tree(tokens[-1], draft)
            accept_start = time.perf_counter()
            step.verify_s = accept_start - verify_start

            # 3. accept (pure function), 4. keep only the accepted path in the cache
            verdict = verify(draft, logits, params, rng, seed, base_position=len(tokens))
            target.keep(verdict.path, len(draft))
            if feedback_topk and proposed:  # computed once, from the logits this step already has
                verdict.feedback = TargetFeedback(
                    [tokens[-1]] + draft.tokens.tolist(),
                    logits.topk(min(feedback_topk, logits.size(-1)), dim=-1).indices)

            # 5. drafter feedback
            if proposed:
                try:
                    drafter.observe(verdict)
                except Exception as err:  # noqa: BLE001
                    step.fallback = True
                    log.warning("drafter.observe failed (%s: %s)", type(err).__name__, err)

            # 6. emit, honouring max_new_tokens and EOS inside the accepted tokens exactly
            new = verdict.tokens[:max_new_tokens - generated]
            reason = None
            for i, tok in enumerate(new):
                if tok in eos_token_ids:
                    new, reason = new[:i + 1], "eos"
                    break
            tokens.extend(new)
            generated += len(new)
            if reason is None and generated >= max_new_tokens:
                reason = "length"
            step.drafted, step.emitted = len(draft), len(new)
            step.accepted = min(verdict.num_accepted, len(new))
            step.other_s = time.perf_counter() - accept_start
            step.planned = budget.depth if proposed else 0
            _observe(policy, budget, proposed_draft, draft, verdict.num_accepted, step)
            stats.add(step)
            stats.wall_s = time.perf_counter() - start
            yield StepEvent(new, step, finished=reason is not None, finish_reason=reason)
            if reason is not None:
                break
    finally:
        stats.wall_s = time.perf_counter() - start
        finish = getattr(drafter, "finish", None)
        if finish is not None:
            try:
                finish(tokens[len(prompt):])
            except Exception as err:  # noqa: BLE001 - a drafter bug never changes the output
                log.warning("drafter.finish failed (%s: %s)", type(err).__name__, err)


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
             step: StepStats) -> None:
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
        proposed=len(proposed), proposed_depth=proposed_depth)
    try:
        policy.observe(record)
    except Exception as err:  # noqa: BLE001
        log.warning("policy.observe failed (%s: %s)", type(err).__name__, err)
