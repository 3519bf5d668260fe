"""Continuous batching: requests join and leave between steps; every running request advances one
verification step per ``step()``, all verified by one target forward (``engine.Batch``).

Every row's output is exactly what ``generate`` gives for that prompt alone: the engine gives each
row its own cache slots, positions, mask, drafter, policy and random stream (tests:
``tests/test_batch_rows.py``).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from specdecode.api import prepare
from specdecode.engine import Batch, Sequence
from specdecode.host import HostState
from specdecode.models import BatchTarget, load_causal_lm
from specdecode.types import GenerationResult, RunStats, SpecDecodeError, StepStats


@dataclass
class RequestEvent:
    """What one step did for one request: the tokens it emitted (possibly none) and its stats."""

    request_id: int
    tokens: list[int]
    stats: StepStats
    finished: bool = False
    finish_reason: str | None = None  # "eos", "length" or "abort"


class Scheduler:
    """Serve many requests on one target with up to ``max_batch_size`` in flight.

    ``add_request(prompt, **options)`` takes ``generate``'s options (drafter, sampling, policy...),
    checks them at once (``SpecDecodeError``) and queues the request; ``step()`` admits queued
    requests while there is room (prefilled together), runs one verification step for every running
    request and returns their events; a finished request leaves at once (its cache row is freed
    and the next queued request can take it); ``abort(id)`` ends one early. ``defaults`` are
    options applied to every request unless it overrides them."""

    def __init__(self, model, *, max_batch_size: int = 8, trust_remote_code: bool = False,
                 dtype=None, device=None, exact: bool | None = None, **defaults: Any) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise SpecDecodeError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        self.model = load_causal_lm(model, what="target model",
                                    trust_remote_code=trust_remote_code, dtype=dtype, device=device)
        self.target = BatchTarget(self.model, exact=exact)
        self.batch = Batch(self.target)
        self.max_batch_size = max_batch_size
        self.defaults = defaults
        self.host = HostState()  # this scheduler's cross-request stores (specdecode/host.py)
        self.waiting: deque[tuple[int, Sequence]] = deque()
        self.ids: dict[Sequence, int] = {}
        self.sequences: dict[int, Sequence] = {}
        self.reasons: dict[int, str | None] = {}
        self._next = itertools.count()

    def add_request(self, prompt, **options: Any) -> int:
        """Queue one request; returns its id. Options as ``generate``'s."""
        req = prepare(self.model, prompt, target=self.target,
                      **{"host": self.host, **self.defaults, **options})
        seq = Sequence(req.prompt, req.drafter, req.params, req.max_new_tokens,
                       req.eos_token_ids, req.max_draft_nodes, req.policy, RunStats(),
                       constraint=req.constraint)
        rid = next(self._next)
        self.ids[seq] = rid
        self.sequences[rid] = seq
        self.waiting.append((rid, seq))
        return rid

    @property
    def num_running(self) -> int:
        return len(self.batch)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or len(self.batch) > 0

    def step(self) -> list[RequestEvent]:
        """Admit what fits, then one verification step for every running request."""
        events: list[RequestEvent] = []
        room = self.max_batch_size - len(self.batch)
        self.batch.reserve([seq for _, seq in itertools.islice(self.waiting, max(0, room))])
        joining = []
        while self.waiting and len(self.batch) + len(joining) < self.max_batch_size:
            rid, seq = self.waiting.popleft()
            seq.start = time.perf_counter()  # latency counts from admission; queueing is separate
            if seq.max_new_tokens == 0:
                self.reasons[rid] = "length"
                events.append(RequestEvent(rid, [], StepStats(), True, "length"))
                continue
            joining.append(seq)
        self.batch.add(*joining)  # prefilled together
        if not len(self.batch):
            return events
        for seq, event in self.batch.step():
            rid = self.ids[seq]
            if event.finished:
                self.reasons[rid] = event.finish_reason
            events.append(RequestEvent(rid, event.tokens, event.stats, event.finished,
                                       event.finish_reason))
        return events

    def abort(self, request_id: int) -> bool:
        """End a queued or running request now (its row is freed); False if it already ended."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.finished:
            return False
        for i, (rid, _) in enumerate(self.waiting):
            if rid == request_id:
                del self.waiting[i]
                seq.finished = True
                break
        else:
            self.batch.remove(seq)
        self.reasons[request_id] = "abort"
        return True

    def release(self, request_id: int) -> tuple[list[int], RunStats, str | None]:
        """A finished (or aborted) request's output, stats and finish reason; the scheduler
        forgets it."""
        seq = self.sequences.pop(request_id)
        if not seq.finished:
            self.sequences[request_id] = seq
            raise SpecDecodeError(f"request {request_id} has not finished")
        self.ids.pop(seq, None)
        return seq.output, seq.stats, self.reasons.pop(request_id, None)


def generate_batch(model, prompts, *, batch_size: int = 8, progress=None,
                   **options: Any) -> list[GenerationResult]:
    """``generate`` for many prompts, ``batch_size`` in flight at a time (continuous batching:
    a finished request's place goes to the next prompt at once). Results come in prompt order and
    each equals ``generate(model, prompt, **options)`` for its prompt (greedy and coupled sampling:
    the same tokens; rejection sampling: the same distribution, and the same tokens for the same
    seed). ``progress``: an optional callable given the number of requests finished so far.
    ``constraint``: one for every prompt, or a list with one per prompt (None: that row is
    unconstrained)."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise SpecDecodeError("prompts must be a list of prompts (each a list of token ids)")
    prompts = list(prompts)
    constraints = options.pop("constraint", None)
    if not isinstance(constraints, (list, tuple)):
        constraints = [constraints] * len(prompts)
    elif len(constraints) != len(prompts):
        raise SpecDecodeError(f"constraint: a list needs one per prompt ({len(prompts)}), got "
                              f"{len(constraints)}")
    place = {k: options.pop(k) for k in ("dtype", "device", "exact", "trust_remote_code")
             if k in options}
    scheduler = Scheduler(model, max_batch_size=batch_size, **place)
    ids = [scheduler.add_request(p, constraint=c, **options)  # every prompt checked first
           for p, c in zip(prompts, constraints)]
    steps: dict[int, list[StepStats]] = {rid: [] for rid in ids}
    accept: dict[int, list[int]] = {rid: [] for rid in ids}
    done = 0
    while scheduler.has_unfinished():
        for event in scheduler.step():
            if scheduler.sequences[event.request_id].max_new_tokens:  # as ``generate``'s steps
                steps[event.request_id].append(event.stats)
            if event.tokens:
                accept[event.request_id].append(len(event.tokens))
            if event.finished:
                done += 1
                if progress is not None:
                    progress(done)
    results = []
    for rid in ids:
        tokens, stats, reason = scheduler.release(rid)
        results.append(GenerationResult(token_ids=tokens, accept_lengths=accept[rid], stats=stats,
                                        finish_reason=reason, steps=steps[rid]))
    return results
