"""``none``: proposes nothing, so every step is a plain decoding step (vanilla through the engine)."""

from __future__ import annotations

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.registry import register
from specdecode.types import Draft, Verdict


class NoDrafter:
    def propose(self, ctx: DraftContext) -> Draft:
        return Draft.empty()

    def observe(self, verdict: Verdict) -> None:
        pass


@register("none", options={})
def build_none(build: BuildContext) -> NoDrafter:
    return NoDrafter()
