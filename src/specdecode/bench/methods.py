"""Benchmark methods: ours (through the engine), the oracle bound, and transformers' own.

A method spec is ``name`` or ``name:key=value:key=value`` (drafter options, ``policy``, and
``sampling``, the method's own sampling rule, else the run's), e.g.
``ngram:num_draft_tokens=3:max_n=4``, ``draft-model:tree=dynamic:policy=adaptive`` or
``draft-model:sampling=block``. Every method is timed the same way: one call, prefill included,
after warm-up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

import specdecode as sd
from specdecode.bench import vllm_peer
from specdecode.drafters.options import Limits
from specdecode.drafters.registry import REGISTRY, Needs, check_options, needs_of, sources_of
from specdecode.host import HostState
from specdecode.types import SpecDecodeError
from specdecode.verify import SAMPLING_MODES

HF_METHODS = ("hf-generate", "hf-pld", "hf-assisted")  # transformers' own generate


@dataclass
class Outcome:
    token_ids: list[int]
    wall_s: float
    accept_lengths: list[int] | None = None  # None where the method does not report steps
    drafted: int | None = None
    drafted_per_step: list[int] | None = None
    planned_per_step: list[int] | None = None  # the policy's depth per step (0: a plain step)
    counters: dict | None = None  # vLLM's per-answer speculation counters (no per-step lengths)


@dataclass
class Settings:
    """What every method of one run shares."""

    target: object
    draft: object | None
    max_new_tokens: int
    num_draft_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    sampling: str = "rejection"
    pad_token_id: int = 0
    datastore: str | None = None
    policy: str | None = None  # for methods without their own policy=...; None: the API default
    exact: bool | None = None  # the batch-invariant forward; None: on in half precision
    vllm: vllm_peer.Engine | None = None  # where vLLM methods find the model
    extra: dict = field(default_factory=dict)
    # Each method string is one host: it learns from its own earlier answers of this run (its
    # suffix store, hot tables, policy estimates), as a server would, never from another method's
    # answer to the same question.
    hosts: dict[str, HostState] = field(default_factory=dict)
    draft_models: dict[str, object] = field(default_factory=dict)  # loaded once per directory
    vllm_workers: dict[str, vllm_peer.Worker] = field(default_factory=dict)  # one per vLLM method
    constraint: dict | None = None  # this question's (the JSON workload): every method runs under it
    tokenizer: object = None  # for the constraint


def parse_spec(spec: str) -> tuple[str, dict]:
    name, *pairs = spec.split(":")
    options = {}
    for pair in filter(None, pairs):
        key, eq, value = pair.partition("=")
        if not eq:
            raise SpecDecodeError(f"method option {pair!r} in {spec!r} is not key=value")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return name.strip(), options


def is_lossless(spec: str) -> bool:
    """Ours are lossless by construction (and checked); transformers' and vLLM's are measured."""
    name = parse_spec(spec)[0]
    return name not in HF_METHODS and not vllm_peer.is_vllm(name)


# a method's options that are not its drafter's
METHOD_KEYS = ("policy", "sampling", "draft_model", "constrained")


def drafter_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in METHOD_KEYS}


def needs_answer(spec: str) -> bool:
    """Whether a method replays the vanilla answer (the oracle bound): it runs after vanilla."""
    name, options = parse_spec(spec)
    return name in REGISTRY and Needs.ANSWER in needs_of(name, drafter_options(options))


def needs_draft(spec: str) -> bool:
    name, options = parse_spec(spec)
    if name == "hf-assisted":
        return True
    if name not in REGISTRY:
        return False
    return Needs.DRAFT_MODEL in needs_of(name, options) and "draft_model" not in options


def check_specs(specs: list[str], has_draft: bool) -> None:
    from specdecode.policies import available_policies

    known = set(sd.available()) | {"vanilla", *HF_METHODS, *vllm_peer.VLLM_METHODS}
    for spec in specs:
        name, options = parse_spec(spec)
        if name not in known:
            raise SpecDecodeError(f"unknown method {name!r}; known: {', '.join(sorted(known))}")
        if vllm_peer.is_vllm(name):
            vllm_peer.speculative_config(name, options, 4)  # bad options fail before any work
            continue
        if "policy" in options and (name in HF_METHODS or
                                    options["policy"] not in available_policies()):
            raise SpecDecodeError(f"method {spec!r}: policy must be one of "
                                  f"{', '.join(available_policies())} (our methods only)")
        if options.get("sampling", SAMPLING_MODES[0]) not in SAMPLING_MODES or \
                ("sampling" in options and name in HF_METHODS):
            raise SpecDecodeError(f"method {spec!r}: sampling must be one of "
                                  f"{', '.join(SAMPLING_MODES)} (our methods only)")
        if needs_draft(spec) and not has_draft:
            raise SpecDecodeError(f"method {name!r} needs a draft model (--draft-model PATH); "
                                  "none is shipped for this target")
        if name in REGISTRY:  # names, types and bounds, before any work
            try:
                check_options(name, drafter_options(options), Limits())
            except SpecDecodeError as err:
                raise SpecDecodeError(f"method {spec!r}: {err}") from None
    if "vanilla" not in [parse_spec(s)[0] for s in specs]:
        raise SpecDecodeError("--methods must include vanilla (the baseline every method is "
                              "compared with)")


def method_options(spec: str, s: Settings, reference: list[int] | None) -> tuple[str, dict]:
    """(drafter name, options for ``generate``) of one of our methods, for one prompt (the oracle
    replays that prompt's ``reference``)."""
    name, options = parse_spec(spec)
    drafter = "none" if name == "vanilla" else name
    if options.pop("constrained", True) and s.constraint is not None:  # constrained=false: without
        options.update(constraint=s.constraint, tokenizer=s.tokenizer)
    table = REGISTRY[drafter].options
    if name not in ("vanilla", "none") and "num_draft_tokens" not in options \
            and ("num_draft_tokens" in table or any(
                "num_draft_tokens" in REGISTRY[d].options for d in sources_of(name, options))):
        options["num_draft_tokens"] = s.num_draft_tokens  # the draft depth shared with the oracle
    needs = needs_of(drafter, options)
    if Needs.DATASTORE in needs and "datastore" not in options:
        if s.datastore is None:
            raise SpecDecodeError(f"method {name!r} needs a datastore: --datastore DIR or "
                                  f"{name}:datastore=DIR (build one with `specdecode datastore`)")
        options["datastore"] = s.datastore
    if Needs.ANSWER in needs:
        if reference is None:
            raise SpecDecodeError(f"method {name!r} needs the vanilla output (run vanilla first)")
        options["continuation"] = reference
    options["host"] = s.hosts.setdefault(spec, HostState())
    if Needs.DRAFT_MODEL in needs:
        options["draft_model"] = draft_model(options.get("draft_model"), s)
    if s.policy is not None and "policy" not in options and name != "vanilla":
        options["policy"] = s.policy
    options.setdefault("sampling", s.sampling)
    return drafter, options


def draft_model(path, s: Settings):
    """The run's draft model (``--draft-model``), or the one a method names, loaded once."""
    if path is None:
        return s.draft
    param = next(s.target.parameters())
    key = f"{path}|{param.dtype}|{param.device}"
    if key not in s.draft_models:
        from specdecode.models import load_causal_lm

        s.draft_models[key] = load_causal_lm(str(path), what="draft model", dtype=param.dtype,
                                             device=param.device)
    return s.draft_models[key]


def run_ours(spec: str, s: Settings, prompt: list[int], reference: list[int] | None) -> Outcome:
    drafter, options = method_options(spec, s, reference)
    start = time.perf_counter()
    out = sd.generate(s.target, prompt, drafter=drafter, max_new_tokens=s.max_new_tokens,
                      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                      exact=s.exact, **options)
    wall = time.perf_counter() - start
    return Outcome(out.token_ids, wall, out.accept_lengths, out.stats.drafted,
                   [st.drafted for st in out.steps], [st.planned for st in out.steps])


@torch.inference_mode()
def run_hf(spec: str, s: Settings, prompt: list[int]) -> Outcome:
    name, options = parse_spec(spec)
    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new_tokens,
                  pad_token_id=s.pad_token_id)
    if s.temperature > 0:
        kwargs.update(do_sample=True, temperature=s.temperature, top_k=s.top_k or None,
                      top_p=s.top_p)
        torch.manual_seed(s.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if name == "hf-pld":
        kwargs["prompt_lookup_num_tokens"] = options.get("num_draft_tokens", s.num_draft_tokens)
    elif name == "hf-assisted":
        kwargs["assistant_model"] = s.draft
    start = time.perf_counter()
    out = s.target.generate(ids, **kwargs)
    wall = time.perf_counter() - start
    return Outcome(out[0, len(prompt):].tolist(), wall)


def run_vllm(spec: str, s: Settings, prompt: list[int]) -> Outcome:
    name, options = parse_spec(spec)
    if s.vllm is None:
        raise SpecDecodeError(f"method {spec!r} needs the vLLM engine settings")
    engine = vllm_peer.worker(spec, name, options, s.vllm, s.num_draft_tokens, s.vllm_workers)
    tokens, wall, counters = engine.generate(prompt, max_tokens=s.max_new_tokens,
                                             temperature=s.temperature, top_k=s.top_k,
                                             top_p=s.top_p, seed=s.seed)
    return Outcome(tokens, wall, counters=counters)


def run_method(spec: str, s: Settings, prompt: list[int], reference: list[int] | None) -> Outcome:
    name = parse_spec(spec)[0]
    if name in HF_METHODS:
        return run_hf(spec, s, prompt)
    if vllm_peer.is_vllm(name):
        return run_vllm(spec, s, prompt)
    return run_ours(spec, s, prompt, reference)
