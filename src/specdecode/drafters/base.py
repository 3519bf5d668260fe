"""The drafter extension point: one Protocol, one registry.

A drafter instance serves one request (its state is never global). ``propose`` returns a ``Draft``
of at most ``ctx.budget`` nodes; ``observe`` receives the verdict of that draft. The engine never
looks at a drafter's type: anything with these two methods works, registered or not.

Optional, declared by the drafter and read by the engine with ``getattr``:
- ``feedback_topk: int``: when > 0, every verdict carries ``feedback`` (``TargetFeedback``): the
  target's top-k next-token ids at each verified row, rejected draft nodes included; and the first
  ``propose`` gets those of the prompt (``ctx.prefill_topk_ids``, from the prefill's logits), so a
  drafter can learn before its first draft. Drafters that do not declare it cost nothing extra.
- ``feedback_hidden: bool``: when True, every proposal gets ``ctx.hidden``: the target's features
  (last hidden states after the final norm, what its LM head reads) of the committed tokens the
  drafter has not been given yet, the prompt's with the first proposal. The target computes them
  in its prefill and verification forwards anyway; a plain step's come with the next proposal.
- ``finish(output: list[int])``: called once when the request ends. A store shared across requests
  (SuffixDecoding's global tree, Token Recycling's hot table) is an explicit object with a size
  bound, kept in the host's ``HostState`` (``BuildContext.host``: a Scheduler's, a model's, a
  benchmark method's; never a module global) and handed to the drafter by its factory; ``finish``
  is where it learns from the request.

A factory registers with its options and needs beside it (``registry.py``: ``register(name,
needs=..., options=...)``); ``prepare`` checks options there before calling the factory, and the
server lets a request set only what the registration allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from specdecode.host import HostState
from specdecode.types import Draft, SamplingParams, Verdict


@dataclass
class DraftContext:
    """What a drafter sees each step. ``tokens`` is the engine's list of committed tokens (prompt,
    then output); it only grows and must not be modified. ``budget`` caps the draft's node count
    and ``max_depth`` its depth (both already account for ``max_new_tokens`` and the context, and
    come from the request's policy). ``min_score``: a drafter that scores its nodes (``Draft.scores``)
    may stop expanding a node whose score is below it (the policy's estimate of what a node must be
    worth to pay for itself; 0 = no limit). A sampled draft may stop *after* keeping a token whose
    score is low, never drop a drawn token for its value."""

    tokens: list[int]
    num_prompt: int
    budget: int
    max_depth: int
    params: SamplingParams
    seed: int
    prefill_topk_ids: Any = None  # [len(prompt) - 1, k] tensor, first proposal of a feedback drafter
    min_score: float = 0.0
    # feature drafters: [m, H] target features of tokens[len(tokens) - 1 - m : len(tokens) - 1]
    # (every committed token's but the pending last one's, new since the last proposal), or None
    hidden: Any = None
    # structured output: the request's grammar state (``structured.ConstraintState``) or None; a
    # drafter may probe it (``push`` / ``ff_tokens`` / ``allowed``) and must ``reset_probe`` after
    constraint: Any = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt


@runtime_checkable
class Drafter(Protocol):
    def propose(self, ctx: DraftContext) -> Draft: ...

    def observe(self, verdict: Verdict) -> None: ...


@dataclass
class BuildContext:
    """What a drafter (or policy) factory may use: the target's adapter and model, an optional draft
    model, ``kind``, a key naming the request's shape, under which a policy may keep what it
    learned across requests, and ``host``, where stores shared across requests live
    (``specdecode/host.py``; never a module global)."""

    target: Any  # HFModel
    draft_model: Any | None = None
    kind: str = ""  # what requests of this shape share (target, drafter, options, sampling)
    host: HostState = field(default_factory=HostState)


__all__ = ["BuildContext", "DraftContext", "Drafter"]
