"""specdecode's model-free drafters as vLLM proposers (``speculative_config`` method
``custom_class``), so vLLM's engine (batching, paged KV cache, tensor / pipeline / data parallel)
verifies drafts that specdecode proposes.

    from vllm import LLM
    llm = LLM(model=DIR, speculative_config={
        "method": "custom_class", "model": "specdecode.integrations.vllm.SuffixProposer",
        "num_speculative_tokens": 8})

vLLM builds the class with its ``VllmConfig`` and, after every step, calls
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)`` with one entry
per batch row: the tokens the row just emitted and its committed tokens. We keep one specdecode
drafter per request, keyed by vLLM's request id (read from the calling model runner's input
batch; where that is not available, by row, a row whose tokens stop extending what it held being a
new request), tell it what was accepted, and free it (calling its ``finish``, so SuffixDecoding's
cross-request tree learns) when its request leaves the batch. vLLM verifies chains: a drafter that
proposes a tree gives its best path (highest summed node scores, else first children).

Drafter options: the class attribute ``options`` of a subclass, or the environment variable
``SPECDECODE_VLLM_OPTIONS`` (a JSON object), set where vLLM's workers start. vLLM imports this
module in its worker process; nothing here imports vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

from specdecode.drafters import BuildContext, DraftContext, Drafter, check_options, make_drafter
from specdecode.drafters.options import Limits
from specdecode.drafters.registry import DEFAULT_DRAFTER
from specdecode.types import Draft, SamplingParams, SpecDecodeError, Verdict

log = logging.getLogger("specdecode.vllm")


@dataclass
class _Target:
    """What model-free drafter factories read from the target."""

    vocab_size: int
    max_length: int | None = None


@dataclass
class _Request:
    drafter: Drafter
    tokens: list[int]
    num_prompt: int
    last_draft: list[int] = field(default_factory=list)


def best_path(draft: Draft) -> list[int]:
    """The draft's tokens along one root-to-leaf path: the chain itself; for a tree, the path with
    the highest sum of node scores (its expected accepted length) when the drafter scores nodes,
    else first children all the way down."""
    n = len(draft)
    if n == 0 or draft.is_chain():
        return draft.tokens.tolist()
    parents = draft.parents.tolist()
    if draft.scores is not None:
        scores = draft.scores.tolist()
        total = [0.0] * n
        for i, p in enumerate(parents):
            total[i] = scores[i] + (total[p] if p >= 0 else 0.0)
        node = max(range(n), key=lambda i: (total[i], -i))
    else:
        node, children = -1, {}
        for i, p in enumerate(parents):
            children.setdefault(p, i)  # the first child of each node
        while node in children:
            node = children[node]
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    tokens = draft.tokens.tolist()
    return [tokens[i] for i in reversed(path)]


class SpecdecodeProposer:
    """A vLLM proposer running one specdecode drafter per request (see the module docstring).
    Subclasses set ``drafter`` (a registered name) and optionally ``options``."""

    drafter = DEFAULT_DRAFTER
    options: dict[str, Any] = {}
    instances: weakref.WeakSet = weakref.WeakSet()  # live proposers of this process (for tests)

    def __init__(self, vllm_config: Any) -> None:
        SpecdecodeProposer.instances.add(self)
        spec = vllm_config.speculative_config
        model = vllm_config.model_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(getattr(model, "max_model_len", 0) or 0) or None
        vocab = int(model.get_vocab_size()) if hasattr(model, "get_vocab_size") else \
            int(model.hf_config.vocab_size)
        self.build = BuildContext(target=_Target(vocab, self.max_model_len))
        self.drafter_options = dict(self.options)
        extra = os.environ.get("SPECDECODE_VLLM_OPTIONS")
        if extra:
            try:
                self.drafter_options.update(json.loads(extra))
            except json.JSONDecodeError as err:
                raise SpecDecodeError(f"SPECDECODE_VLLM_OPTIONS is not JSON: {err}") from None
        self.drafter_options.setdefault("num_draft_tokens", self.k)
        self.drafter_options = check_options(self.drafter, self.drafter_options,
                                             Limits(vocab=vocab))  # types and bounds
        make_drafter(self.drafter, self.build, **self.drafter_options)  # bad options fail now
        self.requests: dict[Any, _Request] = {}
        self.params = SamplingParams()
        self.proposed_tokens = 0

    # -- vLLM's interface -------------------------------------------------------------------
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: Any,
                token_ids_cpu: Any, slot_mappings: Any = None, **_: Any) -> list[list[int]]:
        rows = len(sampled_token_ids)
        ids = _runner_request_ids(rows)
        out: list[list[int]] = []
        seen = set()
        for row in range(rows):
            key = ids[row] if ids is not None else ("row", row)
            seen.add(key)
            sampled = [int(t) for t in sampled_token_ids[row]]
            n = int(num_tokens_no_spec[row])
            if not sampled or n <= 0:
                out.append([])  # a partial prefill: nothing to draft yet
                continue
            tokens = token_ids_cpu[row, :n].tolist()
            out.append(self._propose_row(key, tokens, sampled, ids is None))
        for key in [k for k in self.requests if k not in seen]:
            self._finish(key)
        return out

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM calls this when it loads the target; model-free drafters need nothing."""

    # -- one row ------------------------------------------------------------------------------
    def _propose_row(self, key: Any, tokens: list[int], sampled: list[int], by_row: bool) -> list[int]:
        req = self.requests.get(key)
        if req is not None and by_row and tokens[:len(req.tokens)] != req.tokens:
            self._finish(key)  # the row now holds another request
            req = None
        if req is None:
            drafter = make_drafter(self.drafter, self.build, **self.drafter_options)
            req = self.requests[key] = _Request(drafter, tokens, max(1, len(tokens) - len(sampled)))
        elif req.last_draft:
            accepted = max(0, min(len(sampled) - 1, len(req.last_draft)))
            try:
                req.drafter.observe(Verdict(list(range(accepted)), sampled, len(req.last_draft)))
            except Exception as err:  # noqa: BLE001 - a drafter bug costs speed, never output
                log.warning("drafter.observe failed (%s: %s)", type(err).__name__, err)
        req.tokens = tokens
        room = self.k if self.max_model_len is None else min(self.k,
                                                             self.max_model_len - len(tokens) - 1)
        req.last_draft = []
        if room <= 0:
            return []
        ctx = DraftContext(tokens=tokens, num_prompt=req.num_prompt, budget=room, max_depth=room,
                           params=self.params, seed=0)
        try:
            req.last_draft = best_path(req.drafter.propose(ctx))[:room]
        except Exception as err:  # noqa: BLE001 - no draft this step: vLLM decodes plainly
            log.warning("drafter.propose failed (%s: %s)", type(err).__name__, err)
        self.proposed_tokens += len(req.last_draft)
        return list(req.last_draft)

    def _finish(self, key: Any) -> None:
        req = self.requests.pop(key)
        finish = getattr(req.drafter, "finish", None)
        if finish is not None:
            try:
                finish(req.tokens[req.num_prompt:])
            except Exception as err:  # noqa: BLE001
                log.warning("drafter.finish failed (%s: %s)", type(err).__name__, err)


def _runner_request_ids(rows: int) -> list[Any] | None:
    """vLLM's request ids of the batch rows, from the model runner that called ``propose`` (its
    ``input_batch.req_ids``); None if the caller is not shaped like that (then rows stand in)."""
    frame = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            return None
        runner = frame.f_locals.get("self")
        ids = getattr(getattr(runner, "input_batch", None), "req_ids", None)
        if isinstance(ids, list) and len(ids) >= rows:
            return list(ids[:rows])
        frame = frame.f_back
    return None


class NgramProposer(SpecdecodeProposer):
    """specdecode's ``ngram`` (prompt lookup) drafter."""

    drafter = "ngram"


class SuffixProposer(SpecdecodeProposer):
    """specdecode's ``suffix`` (SuffixDecoding) drafter, its cross-request tree per worker."""

    drafter = "suffix"


class SamProposer(SpecdecodeProposer):
    """specdecode's ``sam`` (suffix automaton) drafter."""

    drafter = "sam"


# The drafters vLLM runs through this module, each with its proposer class: the benchmark's
# ``vllm-specdecode-<drafter>`` methods (``bench/vllm_peer.py``) and ``vllm_bench``'s rows.
PROPOSERS: dict[str, type[SpecdecodeProposer]] = {
    proposer.drafter: proposer for proposer in (NgramProposer, SuffixProposer, SamProposer)}


def proposer_path(drafter: str) -> str:
    """What vLLM's ``speculative_config["model"]`` names for ``drafter``'s proposer."""
    return f"{__name__}.{PROPOSERS[drafter].__name__}"
