"""Every drafter option in one table: its type, its bounds and who may set it.

A bound is absolute (a number) or relative to the run: ``"nodes"`` (the draft node cap:
``max_draft_nodes`` in the library, ``--max-draft-nodes`` in the server; ``NODE_CEILING`` when none
is known), ``"vocab"`` (the target's vocabulary), ``"layers-1"`` (the target's layer count minus
one). An option's upper bound is the smallest of its terms. ``request``: whether a client of the
server may set it per request; options that name files, pick or size a store shared by all requests
(``datastore``, ``cache_file``, ``hot``, ``max_depth`` of the suffix store...) are the process
owner's only.

``check_options(drafter, options, limits)`` is the one check: an unknown type or a value out of
range raises ``SpecDecodeError`` naming the drafter, the option and its bound; nothing is clamped.
``prepare`` (every ``generate`` / ``Scheduler`` request) calls it, and the server calls it with
``request=True`` on the HTTP side before a request reaches the engine thread. A registered drafter
without an entry here is not checked by the library and takes no per-request options in the server.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from specdecode.drafters.mix import DEFAULT_SOURCES
from specdecode.types import SAMPLING_MODES, SpecDecodeError

NODE_CEILING = 1024  # the "nodes" bound when no node cap is known
Term = int | float | str


@dataclass(frozen=True)
class Limits:
    """What relative bounds are relative to (None: unknown)."""

    nodes: int | None = None
    vocab: int | None = None
    layers: int | None = None

    def resolve(self, term: Term) -> tuple[float, str]:
        """(value, how a message names it) of one bound term."""
        if not isinstance(term, str):
            return term, str(term)
        if term == "nodes":
            if self.nodes is None:
                return NODE_CEILING, str(NODE_CEILING)
            return max(self.nodes, 1), f"{max(self.nodes, 1)} (the draft node cap)"
        if term == "vocab":
            return (math.inf, "") if self.vocab is None else (self.vocab, f"{self.vocab} (the "
                                                               f"vocabulary size)")
        if term == "layers-1":
            return (math.inf, "") if self.layers is None else (
                self.layers - 1, f"{self.layers - 1} (the target's layers minus one)")
        raise ValueError(f"unknown bound {term!r}")


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` int, float, bool, str ("text"), "names" (a '+'-joined string or a list
    of drafter names) or "owner" (any object: files, stores; never per request); ``low`` / ``high``
    the inclusive range of numbers; ``choices`` of a text option; ``request``: settable per
    request; ``owner_if``: per request only while that option is false (e.g. token-recycling's
    ``topk`` picks the shared table when ``hot``); ``nullable``: None means the default."""

    kind: str
    low: float | None = None
    high: tuple[Term, ...] = ()
    request: bool = True
    choices: tuple[str, ...] = ()
    owner_if: str | None = None
    nullable: bool = False


def _count(low: int = 1, *high: Term, request: bool = True, nullable: bool = False) -> Option:
    return Option("int", low, high, request, nullable=nullable)


def _owner(kind: str = "owner", low: float | None = None, *high: Term) -> Option:
    return Option(kind, low, high, request=False, nullable=True)


DEPTH = _count(1, "nodes")  # draft depth / chain length
NODES = _count(1, "nodes")  # node budget of one draft
TREE_TOPK = _count(1, 16, "vocab")  # children per expanded node: topk^2 candidates per level
DRAFT_TREE: dict[str, Option] = {
    "num_draft_tokens": DEPTH, "max_nodes": NODES, "topk": TREE_TOPK,
    "tree_width": _count(1, 16, "vocab"), "tree": Option("text", choices=("chain", "dynamic")),
    "num_drafts": _count(1, 16, "vocab"), "branch_depth": _count(1, "nodes"),
    "replacement": Option("bool"),
}
HEAD = {"head": _owner(), "draft_vocab": _owner("int", 0, "vocab")}

SPECS: dict[str, dict[str, Option]] = {
    "none": {},
    "ngram": {"num_draft_tokens": DEPTH, "min_n": _count(1, 16), "max_n": _count(1, 16)},
    "suffix": {"num_draft_tokens": DEPTH, "max_nodes": NODES,
               "alpha": Option("float", 0.0, (1000.0,)), "offset": Option("float", -1000.0, (1000.0,)),
               "min_prob": Option("float", 0.0, (1.0,)),
               "max_depth": _owner("int", 2, 4096), "cache_size": _owner("int", 0, 10**9),
               "cache_file": _owner(), "use_global": _owner("bool"), "store": _owner()},
    "sam": {"num_draft_tokens": DEPTH, "min_match": _count(1, 256), "corpus": _owner(),
            "corpus_tokens": _owner()},
    "token-recycling": {"num_draft_tokens": DEPTH, "max_nodes": NODES,
                        "topk": Option("int", 1, (64, "vocab"), owner_if="hot"),
                        "hot": _owner("bool")},
    "lookahead": {"num_draft_tokens": DEPTH, "window": _count(1, "nodes", nullable=True),
                  "max_ngrams": _count(0, "nodes"), "max_nodes": NODES,
                  "pool_size": _owner("int", 1, 10**8)},
    "draft-model": DRAFT_TREE,
    "layer-skip": {"num_layers": _count(1, "layers-1", nullable=True), **DRAFT_TREE},
    "eagle": {"num_draft_tokens": DEPTH, "topk": TREE_TOPK, "max_nodes": NODES, **HEAD},
    "medusa": {"max_nodes": NODES, **HEAD},
    "mix": {"sources": Option("names"), "max_nodes": NODES, "spine_nodes": _count(1, "nodes", nullable=True),
            "num_draft_tokens": _count(1, "nodes", nullable=True)},
    "rest": {"datastore": _owner(), "num_draft_tokens": DEPTH, "max_nodes": NODES,
             "max_candidates": _owner("int", 1, 10**6), "min_suffix": _count(1, 64),
             "max_suffix": _count(1, 64)},
    "oracle": {"continuation": _owner(), "num_draft_tokens": DEPTH},
    "grammar": {"num_draft_tokens": DEPTH},
}
# drafters that need a resource only the process owner can give (the rest are self-contained;
# eagle and medusa use the heads shipped for the demo target unless given one)
NEEDS: dict[str, str] = {"oracle": "continuation", "rest": "datastore",
                         "draft-model": "a draft model"}


def self_contained() -> tuple[str, ...]:
    """Drafters a server lets requests pick by default: declared here, needing no resource."""
    return tuple(sorted(set(SPECS) - set(NEEDS)))


# options of the request itself that travel with the drafter's (``generate``'s ``sampling``)
COMMON: dict[str, Option] = {"sampling": Option("text", choices=SAMPLING_MODES)}
MAX_SOURCES = 4  # drafters in one mix


def source_names(value: Any, where: str = "mix option sources") -> list[str]:
    """The drafter names of a ``sources`` value ('a+b' or a list), checked for shape."""
    if isinstance(value, str):
        names = value.split("+")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = list(value)
    else:
        raise SpecDecodeError(f"{where} must be names joined by '+' or a list of names, "
                              f"got {value!r}")
    names = [n.strip() for n in names if n.strip()]
    if len(names) > MAX_SOURCES:
        raise SpecDecodeError(f"{where} names {len(names)} drafters; at most {MAX_SOURCES}")
    return names


def _number(drafter: str, name: str, opt: Option, value: Any, limits: Limits) -> int | float:
    what = f"{drafter} option {name}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SpecDecodeError(f"{what} must be a{'n integer' if opt.kind == 'int' else ' number'}, "
                              f"got {value!r}")
    if not math.isfinite(value):
        raise SpecDecodeError(f"{what} must be finite, got {value!r}")
    if opt.kind == "int" and not isinstance(value, numbers.Integral):
        if not float(value).is_integer():
            raise SpecDecodeError(f"{what} must be an integer, got {value!r}")
        value = int(value)
    if opt.low is not None and value < opt.low:
        raise SpecDecodeError(f"{what} = {value} is out of range: it must be >= {opt.low:g}")
    bound, named = math.inf, ""
    for term in opt.high:
        v, n = limits.resolve(term)
        if v < bound:
            bound, named = v, n
    if value > bound:
        raise SpecDecodeError(f"{what} = {value} is out of range: at most {named}")
    return value


def _one(drafter: str, name: str, opt: Option, value: Any, limits: Limits) -> Any:
    if value is None and opt.nullable:
        return None
    if opt.kind in ("int", "float"):
        return _number(drafter, name, opt, value, limits)
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise SpecDecodeError(f"{drafter} option {name} must be true or false, got {value!r}")
    elif opt.kind == "text":
        if not isinstance(value, str) or (opt.choices and value not in opt.choices):
            raise SpecDecodeError(f"{drafter} option {name} must be one of "
                                  f"{', '.join(opt.choices)}, got {value!r}")
    elif opt.kind == "names":
        source_names(value, f"{drafter} option {name}")
    return value


def spec_of(drafter: str) -> dict[str, Option] | None:
    return SPECS.get(drafter)


def check_options(drafter: str, options: dict[str, Any], limits: Limits, *, request: bool = False,
                  allowed: frozenset[str] | None = None, owner: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """``options`` checked against the table (see the module docstring); returns them with
    integral numbers as ints. ``request``: a client's options (owner-only ones refused);
    ``allowed``: the drafters a mix may name; ``owner``: the owner's options of the same drafter
    (``owner_if`` reads them). A drafter without an entry passes unchecked unless ``request``."""
    spec = SPECS.get(drafter)
    if spec is None:
        if request and options:
            raise SpecDecodeError(f"drafter {drafter!r} takes no options per request")
        return dict(options)
    merged = {**(owner or {}), **options}
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in options.items():
        opt = spec.get(name) or COMMON.get(name)
        if opt is None:
            extra[name] = value
            continue
        if request and (not opt.request or (opt.owner_if and merged.get(opt.owner_if))):
            why = f" while {opt.owner_if} is set" if opt.owner_if and opt.request else ""
            raise SpecDecodeError(f"{drafter} option {name} cannot be set per request{why}: it is "
                                  f"the server's (options a request may set: "
                                  f"{', '.join(request_options(drafter))})")
        out[name] = _one(drafter, name, opt, value, limits)
    if drafter == "mix":
        sources = source_names(merged.get("sources", DEFAULT_SOURCES))
        bad = [s for s in sources if s == "mix" or (allowed is not None and s not in allowed)]
        if bad and request and ("sources" in options or "sources" not in (owner or {})):
            raise SpecDecodeError(f"mix source(s) {', '.join(bad)} not allowed on this server; "
                                  f"allowed: {', '.join(sorted((allowed or set()) - {'mix'}))}")
        for name, value in extra.items():  # options passed through to the sources
            takers = [s for s in sources if name in SPECS.get(s, {})]
            if not takers and request:
                raise SpecDecodeError(f"mix: no source takes option {name}")
            for s in takers:
                value = check_options(s, {name: value}, limits, request=request,
                                      owner=owner)[name]
            out[name] = value
    elif extra and request:
        raise SpecDecodeError(f"{drafter} option(s) {', '.join(extra)} cannot be set per request "
                              f"(options a request may set: "
                              f"{', '.join(request_options(drafter)) or 'none'})")
    else:
        out.update(extra)  # the factory reports unknown names
    return out


def request_options(drafter: str) -> list[str]:
    """Names a request may set for ``drafter`` (mix: also its sources' options)."""
    spec = SPECS.get(drafter, {})
    return sorted({n for n, o in {**spec, **COMMON}.items() if o.request})
