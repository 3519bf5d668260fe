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
from specdecode.sampling import TorchRandom
from specdecode.types import Draft, RunStats, SamplingParams, StepEvent, StepStats, TargetFeedback
from specdecode.verify import verify

log = logging.getLogger("specdecode")

DEFAULT_MAX_DRAFT_NODES = 64


def run(target: TargetModel, prompt: list[int], drafter: Drafter, params: SamplingParams, *,
        max_new_tokens: int, eos_token_ids: frozenset[int] = frozenset(),
        max_draft_nodes: int = DEFAULT_MAX_DRAFT_NODES, stats: RunStats | None = None,
        ) -> Iterator[StepEvent]:
    """Decode one request, yielding a ``StepEvent`` per verification step. ``prompt`` is non-empty
    and fits the target's context (the public API checks both). ``stats`` is filled as it goes.

    Two optional drafter hooks, declared rather than type-checked: ``feedback_topk`` (an int > 0:
    each verdict then carries the target's top-k ids at every verified row, see ``TargetFeedback``,
    and the first proposal those of the prompt)
    and ``finish(output)``, called once when the request ends, however it ends (cross-request stores
    learn there)."""
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
            ctx = DraftContext(tokens, len(prompt), max_draft_nodes, max_depth, params, seed,
                               prefill_topk)
            prefill_topk = None

            # 1. propose (a failing drafter costs speed, never correctness: plain step instead)
            try:
                draft = drafter.propose(ctx).limited(max_draft_nodes, max_depth)
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
            if feedback_topk:  # computed once, from the logits this step already has
                verdict.feedback = TargetFeedback(
                    [tokens[-1]] + draft.tokens.tolist(),
                    logits.topk(min(feedback_topk, logits.size(-1)), dim=-1).indices)

            # 5. drafter feedback
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
