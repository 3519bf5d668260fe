"""Public API: ``generate`` and ``stream``. Every argument is checked here, before decoding starts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from specdecode.drafters import BuildContext, Drafter, make_drafter
from specdecode.drafters.options import Limits
from specdecode.drafters.registry import DEFAULT_DRAFTER, check_options
from specdecode.engine import DEFAULT_MAX_DRAFT_NODES, run
from specdecode.host import HostState, host_of
from specdecode.models import BatchTarget, load_causal_lm
from specdecode.policies import Policy, make_policy
from specdecode.types import (
    DEFAULT_SAMPLING,
    GenerationResult,
    RunStats,
    SamplingParams,
    SpecDecodeError,
    StepEvent,
)

# The policy of every request that names none (a constant: whoever wants another passes policy=).
# "adaptive" (policies/adaptive.py): drafting never costs more than it saves by its own estimate,
# on every CPU class (SmolLM2 quick set, AVX2 path: eagle 0.92x fixed, 1.03x adaptive; suffix
# 1.24x / 1.25x; docs/cpus.md). Known loss: the demo pair's draft-model chains (1.11x fixed, 1.02x
# adaptive; docs/benchmarks.md).
DEFAULT_POLICY = "adaptive"


@dataclass
class Request:
    """A fully checked request, ready for the engine."""

    target: BatchTarget
    prompt: list[int]
    drafter: Drafter
    params: SamplingParams
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    max_draft_nodes: int
    policy: Policy | None = None
    constraint: Any = None  # structured.ConstraintState (this request's own grammar state)


def _prompt_ids(input_ids: Any, vocab_size: int, max_length: int | None) -> list[int]:
    if hasattr(input_ids, "keys") and "input_ids" in input_ids:  # a tokenizer's BatchEncoding
        input_ids = input_ids["input_ids"]
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.size(0) == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise SpecDecodeError(f"input_ids must be 1-D (one request), got shape "
                                  f"{tuple(input_ids.shape)}")
        ids = input_ids.tolist()
    elif isinstance(input_ids, (list, tuple)) and all(isinstance(t, int) for t in input_ids):
        ids = list(input_ids)
    else:
        raise SpecDecodeError("input_ids must be a list of ints or a 1-D tensor of token ids")
    if not ids:
        raise SpecDecodeError("input_ids is empty: give at least one prompt token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise SpecDecodeError(f"token id {bad[0]} is outside the model's vocabulary "
                              f"(size {vocab_size})")
    if max_length is not None and len(ids) >= max_length:
        raise SpecDecodeError(f"prompt has {len(ids)} tokens but the model's context is "
                              f"{max_length} tokens; shorten the prompt")
    return ids


def _eos_ids(model, eos_token_id) -> frozenset[int]:
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def _request_kind(model, drafter, options: dict, params: SamplingParams) -> str:
    """A key for requests that should share what a policy learned: same target object, drafter,
    options (objects by identity) and sampling."""
    name = drafter if isinstance(drafter, str) else type(drafter).__name__
    opts = sorted((k, repr(v) if isinstance(v, (int, float, str, bool, type(None)))
                   else f"<{type(v).__name__} {id(v)}>") for k, v in options.items())
    return f"{id(model)}|{name}|{opts}|{params.temperature}|{params.top_k}|{params.top_p}|" \
           f"{params.mode}"


def prepare(model, input_ids, *, drafter: str | Drafter = DEFAULT_DRAFTER, draft_model=None,
            max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, seed: int | None = None, eos_token_id=None,
            sampling: str = DEFAULT_SAMPLING, max_draft_nodes: int = DEFAULT_MAX_DRAFT_NODES,
            policy: str | Policy | None = None, policy_options: dict | None = None,
            trust_remote_code: bool = False, target: BatchTarget | None = None,
            dtype=None, device=None, exact: bool | None = None, constraint: Any = None,
            tokenizer: Any = None, jump_forward: bool | None = None, host: HostState | None = None,
            **drafter_options: Any) -> Request:
    """Check every argument and build the engine's inputs; raises ``SpecDecodeError``.

    ``input_ids``: a list of ints, a 1-D tensor (or [1, n]), or a tokenizer's output with
    ``input_ids``. ``target``: the scheduler's shared target over ``model`` (default: a new one).
    ``dtype`` / ``device``: how a ``model`` given as a source (directory, .gguf, preset, Hub id) is
    loaded (``models.sources.auto_dtype`` by default); a loaded model must already be in them.
    ``constraint``: structured output (``structured.compile_constraint``: ``{"json": schema}``,
    ``{"json_object": True}``, ``{"regex": ...}``, ``{"grammar": lark}`` with ``tokenizer``, or a
    compiled ``Constraint``); ``jump_forward`` (default: on unless ``drafter="none"``) appends the
    tokens the grammar forces to every draft.
    ``exact``: the batch-invariant forward (default: on in half precision, ``models/exact.py``).
    ``host``: where stores shared across requests live (a ``Scheduler``'s own; default: the
    model's, ``host.host_of``)."""
    params = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                            seed=seed, mode=sampling)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SpecDecodeError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_draft_nodes < 0:
        raise SpecDecodeError(f"max_draft_nodes must be >= 0, got {max_draft_nodes}")
    if target is None:
        hf = load_causal_lm(model, what="target model", trust_remote_code=trust_remote_code,
                            dtype=dtype, device=device)
        target = BatchTarget(hf, exact=exact)
    else:  # the shared target: it must be what was asked
        if dtype is not None or device is not None:
            load_causal_lm(target.model, what="target model", dtype=dtype, device=device)
        if exact is not None and bool(exact) != target.exact:
            raise SpecDecodeError(f"this target runs with exact={target.exact}; exact={exact} "
                                  "needs another target (e.g. another Scheduler)")
    hf = target.model
    host = host_of(hf) if host is None else host
    prompt = _prompt_ids(input_ids, target.vocab_size, target.max_length)
    limits = Limits(vocab=target.vocab_size,
                    layers=getattr(hf.config, "num_hidden_layers", None))
    if isinstance(drafter, str):  # names, types and bounds (the registration), then the factory
        drafter_options = check_options(drafter, drafter_options, limits)
        drafter_obj = make_drafter(drafter, BuildContext(target=target, draft_model=draft_model,
                                                         host=host), **drafter_options)
    elif hasattr(drafter, "propose") and hasattr(drafter, "observe"):
        if drafter_options:
            raise SpecDecodeError("drafter options apply to registered drafter names only")
        drafter_obj = drafter
    else:
        raise SpecDecodeError(f"drafter must be a registered name or a Drafter, got "
                              f"{type(drafter).__name__}")
    build = BuildContext(target=target, draft_model=draft_model, host=host,
                         kind=_request_kind(hf, drafter, drafter_options, params))
    if policy is None:  # plain decoding never drafts: no cost curve to measure for it
        policy = "fixed" if drafter == "none" else DEFAULT_POLICY
    if isinstance(policy, str):
        policy_obj = make_policy(policy, build, limits, **(policy_options or {}))
    elif all(hasattr(policy, m) for m in ("plan", "select", "observe")):
        if policy_options:
            raise SpecDecodeError("policy_options apply to registered policy names only")
        policy_obj = policy
    else:
        raise SpecDecodeError(f"policy must be a registered name or a Policy, got "
                              f"{type(policy).__name__}")
    eos = _eos_ids(hf, eos_token_id)
    state = None
    if constraint is not None:
        from specdecode.structured import compile_constraint
        compiled = compile_constraint(constraint, tokenizer)
        jump = drafter != "none" if jump_forward is None else bool(jump_forward)
        state = compiled.start(eos, jump_forward=jump)
        eos = eos | {compiled.eos_token_id}  # the grammar ends with its tokenizer's EOS
    return Request(target, prompt, drafter_obj, params, max_new_tokens, eos, max_draft_nodes,
                   policy_obj, state)


def stream_request(req: Request, stats: RunStats | None = None) -> Iterator[StepEvent]:
    return run(req.target, req.prompt, req.drafter, req.params, max_new_tokens=req.max_new_tokens,
               eos_token_ids=req.eos_token_ids, max_draft_nodes=req.max_draft_nodes, stats=stats,
               policy=req.policy, constraint=req.constraint)


def stream(model, input_ids, **kwargs: Any) -> Iterator[StepEvent]:
    """Like ``generate`` but yields one ``StepEvent`` (new tokens + step stats) per step. Arguments
    are checked when this is called, before the first step."""
    return stream_request(prepare(model, input_ids, **kwargs))


def generate(model, input_ids, **kwargs: Any) -> GenerationResult:
    """Speculative decoding of one prompt; the output equals vanilla decoding's (greedy: the same
    tokens; sampling: the same distribution, or the same tokens with ``sampling="coupled"``).

    ``model``: a loaded transformers causal LM or a source (local directory, .gguf file, the
    ``smollm2-135m`` preset, a Hub id). ``input_ids``: list of ints
    or 1-D tensor. Keyword arguments: ``drafter`` (registered name or Drafter, default "ngram"),
    ``draft_model``, ``max_new_tokens`` (128), ``temperature`` (0 = greedy), ``top_k``, ``top_p``,
    ``seed``, ``eos_token_id`` (default: the model's), ``sampling`` ("traversal" by default,
    "rejection", "coupled", "block" or "spectr": ``SAMPLING_MODES``),
    ``max_draft_nodes``, ``dtype`` / ``device`` (for a ``model`` given as a path, a .gguf, the
    ``smollm2-135m`` / ``gemma3-270m`` presets or a Hub id), ``exact``, ``policy`` (how much to
    draft each step: ``DEFAULT_POLICY`` ("adaptive") by default, plain decoding "fixed"; "fixed",
    "heuristic", or a Policy object; ``policy_options`` for a named one), ``constraint`` +
    ``tokenizer`` (structured output, see ``prepare``), and the drafter's
    own options (e.g. ``num_draft_tokens``).
    """
    req = prepare(model, input_ids, **kwargs)
    stats = RunStats()
    tokens: list[int] = []
    accept_lengths: list[int] = []
    steps = []
    reason = None
    for event in stream_request(req, stats):
        tokens.extend(event.tokens)
        steps.append(event.stats)
        if event.tokens:
            accept_lengths.append(len(event.tokens))
        reason = event.finish_reason or reason
    return GenerationResult(token_ids=tokens, accept_lengths=accept_lengths, stats=stats,
                            finish_reason=reason, steps=steps)
