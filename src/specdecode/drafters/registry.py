"""The one place that knows every drafter: ``REGISTRY`` of ``DrafterSpec``.

A drafter file registers its factory with what it needs from the host and its options::

    @register("ngram", options={"num_draft_tokens": DEPTH, "min_n": count(1, 16)})
    def build_ngram(build: BuildContext, num_draft_tokens: int = 5, min_n: int = 1) -> ...

Every entry point reads this: ``prepare`` (``check_options`` then ``make_drafter``), the CLI's
``-o`` parsing and ``specdecode drafters``, the benchmark's method strings (which drafters need a
draft model, a datastore, the answer), the server's default allow-list (``self_contained``) and its
per-request checks (``check_options(..., request=True)``), and ``mix``'s sources. Plugins
(``specdecode.plugins``) register the same way and are seen by all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from specdecode.drafters.options import COMMON, Limits, Option, check_table, declare, source_names
from specdecode.types import SpecDecodeError

if TYPE_CHECKING:
    from specdecode.drafters.base import BuildContext, Drafter


class Needs:
    """What a drafter needs from the host, beyond the target."""

    NOTHING = "nothing"
    DRAFT_MODEL = "draft-model"  # a draft model (``draft_model=``, ``--draft-model``)
    DATASTORE = "datastore"  # a datastore the owner built (``datastore=DIR``)
    HEADS = "heads"  # heads trained for this target (the demo target ships its own)
    ANSWER = "answer"  # the answer itself (the oracle: benchmarks only)
    ALL = (NOTHING, DRAFT_MODEL, DATASTORE, HEADS, ANSWER)
    # what a server may offer to requests without the owner's say: no resource, or the heads the
    # target ships with (a request for another target's heads fails when the drafter is built)
    SELF_CONTAINED = frozenset({NOTHING, HEADS})


@dataclass(frozen=True)
class DrafterSpec:
    """One registered drafter. ``options``: every option with its type, default, bounds and whether
    a request may set it; ``sources``: the option naming other drafters (``mix``): their options
    pass through and their needs are this drafter's too."""

    name: str
    factory: Callable[..., Drafter]
    needs: str = Needs.NOTHING
    options: Mapping[str, Option] = field(default_factory=dict)
    sources: str | None = None

    @property
    def doc(self) -> str:
        """The first paragraph of the factory's module docs (else the factory's)."""
        import sys

        module = sys.modules.get(self.factory.__module__)
        text = (getattr(module, "__doc__", None) or self.factory.__doc__ or "").strip()
        return " ".join(text.split("\n\n")[0].split())


REGISTRY: dict[str, DrafterSpec] = {}
# the drafter of ``generate``, ``specdecode generate``, ``serve`` and the vLLM proposer when none is named
DEFAULT_DRAFTER = "ngram"


def register(name: str, *, needs: str = Needs.NOTHING, options: Mapping[str, Option] | None = None,
             sources: str | None = None) -> Callable[[Callable], Callable]:
    """Register ``factory(build: BuildContext, **options) -> Drafter`` under ``name`` with what it
    needs (``Needs``) and its options (defaults read from the factory)."""
    if needs not in Needs.ALL:
        raise ValueError(f"drafter {name!r}: needs must be one of {', '.join(Needs.ALL)}")

    def wrap(factory: Callable) -> Callable:
        table = declare(factory, options or {}, f"drafter {name!r}")
        REGISTRY[name] = DrafterSpec(name, factory, needs, table, sources)
        return factory

    return wrap


def available() -> list[str]:
    return sorted(REGISTRY)


def spec_of(name: str) -> DrafterSpec:
    if name not in REGISTRY:
        raise SpecDecodeError(f"unknown drafter {name!r}; available: {', '.join(available())}")
    return REGISTRY[name]


def sources_of(name: str, options: Mapping[str, Any]) -> list[str]:
    """The drafters a drafter runs: its sources (``mix``), else itself."""
    spec = spec_of(name)
    if spec.sources is None:
        return [name]
    return source_names(options.get(spec.sources, spec.options[spec.sources].default),
                        f"{name} option {spec.sources}")


def needs_of(name: str, options: Mapping[str, Any] | None = None) -> set[str]:
    """What ``name`` with ``options`` needs from the host (a mix: what its sources need)."""
    options = options or {}
    needs = {spec_of(name).needs}
    for source in sources_of(name, options):
        if source != name:
            needs |= needs_of(source, {})
    return needs - {Needs.NOTHING} or {Needs.NOTHING}


def drafters_needing(need: str) -> tuple[str, ...]:
    """Registered drafters whose own registration needs ``need`` (a ``Needs`` value), sorted."""
    return tuple(sorted(n for n, s in REGISTRY.items() if s.needs == need))


def self_contained() -> tuple[str, ...]:
    """Drafters a server lets requests pick by default: those that need nothing the owner must
    give (a mix is checked source by source against the same list when a request names it)."""
    return tuple(sorted(n for n, s in REGISTRY.items() if s.needs in Needs.SELF_CONTAINED))


def request_options(drafter: str) -> list[str]:
    """Names a request may set for ``drafter``."""
    spec = REGISTRY.get(drafter)
    table = {**(spec.options if spec else {}), **COMMON}
    return sorted(n for n, o in table.items() if o.request)


def check_options(drafter: str, options: Mapping[str, Any], limits: Limits, *,
                  request: bool = False, allowed: frozenset[str] | None = None,
                  owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``options`` of ``drafter`` checked against its registration: unknown names, types, bounds;
    returns them with integral numbers as ints. ``request``: a client's options (owner-only ones
    refused); ``allowed``: the drafters a mix may name; ``owner``: the owner's options of the same
    drafter (``owner_if`` reads them). Raises ``SpecDecodeError`` naming drafter, option, bound."""
    spec = spec_of(drafter)
    merged = {**(owner or {}), **options}
    out, extra = check_table(drafter, {**spec.options, **COMMON}, options, limits,
                             request=request, merged=merged)
    if spec.sources is None:
        if extra and request:
            raise SpecDecodeError(f"{drafter} option(s) {', '.join(extra)} cannot be set per "
                                  f"request (options a request may set: "
                                  f"{', '.join(request_options(drafter)) or 'none'})")
        if extra:
            raise SpecDecodeError(f"drafter {drafter!r} has no option(s) {', '.join(extra)}; "
                                  f"its options: {', '.join(spec.options) or 'none'}")
        return out
    sources = sources_of(drafter, merged)
    unknown = [s for s in sources if s not in REGISTRY]
    if unknown:
        raise SpecDecodeError(f"{drafter} source(s) {', '.join(unknown)}: not a registered "
                              f"drafter; available: {', '.join(available())}")
    bad = [s for s in sources if REGISTRY[s].sources is not None
           or (allowed is not None and s not in allowed)]
    if bad and (not request or spec.sources in options or spec.sources not in (owner or {})):
        if allowed is None:
            raise SpecDecodeError(f"{drafter} cannot take {', '.join(bad)} as a source (a drafter "
                                  "with sources cannot be its own source, nor another's)")
        raise SpecDecodeError(f"{drafter} source(s) {', '.join(bad)} not allowed on this server; "
                              f"allowed: {', '.join(sorted(allowed - {drafter}))}")
    for name, value in extra.items():  # options passed through to the sources
        takers = [s for s in sources if name in REGISTRY[s].options]
        if not takers:
            raise SpecDecodeError(f"{drafter}: no source takes option {name}")
        for source in takers:
            value = check_options(source, {name: value}, limits, request=request,
                                  owner=owner)[name]
        out[name] = value
    return out


def make_drafter(name: str, build: BuildContext, **options: Any) -> Drafter:
    """A fresh drafter for one request; unknown names and options raise ``SpecDecodeError``
    (``check_options`` checks types and bounds first where limits are known)."""
    spec = spec_of(name)
    unknown = [k for k in options if k not in spec.options]
    if unknown and spec.sources is None:
        raise SpecDecodeError(f"drafter {name!r} has no option(s) {', '.join(unknown)}; "
                              f"its options: {', '.join(spec.options) or 'none'}")
    return spec.factory(build, **options)
