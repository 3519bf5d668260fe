"""The option machinery every drafter and policy registration uses: ``Option`` (type, default,
bounds, who may set it), ``Limits`` (what relative bounds are relative to), the shared option
blocks (``DEPTH``, ``NODES``, ``DRAFT_TREE``...) and ``check_value``. The tables themselves live
beside their factories: each drafter file registers its factory with its options
(``drafters/registry.py``), each policy file likewise (``policies/base.py``).

A bound is absolute (a number) or relative to the run: ``"nodes"`` (the draft node cap:
``max_draft_nodes`` in the library, ``--max-draft-nodes`` in the server; ``NODE_CEILING`` when none
is known), ``"vocab"`` (the target's vocabulary), ``"layers-1"`` (the target's layer count minus
one). An option's upper bound is the smallest of its terms. ``request``: whether a client of the
server may set it per request; options that name files, pick or size a store shared by all requests
(``datastore``, ``cache_file``, ``hot``, ``max_depth`` of the suffix store...) are the process
owner's only. A value out of range raises ``SpecDecodeError`` naming the drafter, the option and its
bound; nothing is clamped.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from specdecode.types import SpecDecodeError
from specdecode.verify import SAMPLING_MODES

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
    default: Any = None  # the factory's own default, filled in by ``declare``
    required: bool = False  # the factory has no default: the host must give it

    def describe(self) -> str:
        """``int in [1, 8 | nodes], request`` for listings."""
        text = self.kind + (f" in [{self.low:g}, {' | '.join(str(h) for h in self.high)}]"
                            if self.low is not None and self.high else
                            f" >= {self.low:g}" if self.low is not None else "")
        if self.choices:
            text += f" ({'/'.join(self.choices)})"
        return text + (", per request" if self.request and not self.owner_if else
                       f", per request unless {self.owner_if}" if self.request else ", owner only")


def count(low: int = 1, *high: Term, request: bool = True, nullable: bool = False) -> Option:
    """An int option in [low, min(high...)]."""
    return Option("int", low, high, request, nullable=nullable)


def owner_only(kind: str = "owner", low: float | None = None, *high: Term) -> Option:
    """An option only the process owner may set (files, stores, store sizes)."""
    return Option(kind, low, high, request=False, nullable=True)


DEPTH = count(1, "nodes")  # draft depth / chain length
NODES = count(1, "nodes")  # node budget of one draft
TREE_TOPK = count(1, 16, "vocab")  # children per expanded node: topk^2 candidates per level
DRAFT_TREE: dict[str, Option] = {
    "num_draft_tokens": DEPTH, "max_nodes": NODES, "topk": TREE_TOPK,
    "tree_width": count(1, 16, "vocab"), "tree": Option("text", choices=("chain", "dynamic")),
    "num_drafts": count(1, 16, "vocab"), "branch_depth": count(1, "nodes"),
    "replacement": Option("bool"),
}
HEAD: dict[str, Option] = {"head": owner_only(), "draft_vocab": owner_only("int", 0, "vocab")}

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


def check_value(drafter: str, name: str, opt: Option, value: Any, limits: Limits) -> Any:
    """``value`` of option ``name`` of ``drafter`` checked (integral numbers become ints)."""
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


def declare(factory: Callable, table: Mapping[str, Option], what: str) -> dict[str, Option]:
    """``table`` with each option's default read from ``factory``'s signature, once, when it
    registers. Every parameter of the factory (but the first, the ``BuildContext``, and a
    ``**options`` it passes on) must have an entry: a developer error fails at import."""
    params = list(inspect.signature(factory).parameters.values())[1:]
    out = dict(table)
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if p.name not in out:
            raise TypeError(f"{what}: parameter {p.name!r} has no option entry")
        empty = p.default is inspect.Parameter.empty
        out[p.name] = replace(out[p.name], default=None if empty else p.default, required=empty)
    return out


def check_table(owner: str, table: Mapping[str, Option], values: Mapping[str, Any],
                limits: Limits, *, request: bool = False,
                merged: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checked values, values with no entry in ``table``) of ``values`` for ``owner`` (e.g.
    "ngram", "policy adaptive"); ``request``: refuse the owner-only ones (``merged``: every value
    in force, which ``owner_if`` reads)."""
    merged = values if merged is None else merged
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in values.items():
        opt = table.get(name)
        if opt is None:
            extra[name] = value
            continue
        if request and (not opt.request or (opt.owner_if and merged.get(opt.owner_if))):
            why = f" while {opt.owner_if} is set" if opt.owner_if and opt.request else ""
            settable = sorted(n for n, o in table.items() if o.request)
            raise SpecDecodeError(f"{owner} option {name} cannot be set per request{why}: it is "
                                  f"the server's (options a request may set: "
                                  f"{', '.join(settable) or 'none'})")
        out[name] = check_value(owner, name, opt, value, limits)
    return out, extra
