"""``oracle``: proposes a given continuation (the vanilla output), for tests and for the benchmark's
physical bound (100% acceptance at the same draft budget)."""

from __future__ import annotations

from collections.abc import Sequence

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import DEPTH, owner_only
from specdecode.drafters.registry import Needs, register
from specdecode.types import Draft, SpecDecodeError, Verdict


class OracleDrafter:
    def __init__(self, continuation: Sequence[int], num_draft_tokens: int = 5) -> None:
        if num_draft_tokens < 1:
            raise SpecDecodeError("num_draft_tokens must be >= 1")
        self.continuation = [int(t) for t in continuation]
        self.k = num_draft_tokens

    def propose(self, ctx: DraftContext) -> Draft:
        start = ctx.num_generated
        k = min(self.k, ctx.budget, ctx.max_depth)
        return Draft.chain(self.continuation[start:start + k])

    def observe(self, verdict: Verdict) -> None:
        pass


@register("oracle", needs=Needs.ANSWER, options={"continuation": owner_only(),
                                                 "num_draft_tokens": DEPTH})
def build_oracle(build: BuildContext, continuation: Sequence[int] | None = None,
                 num_draft_tokens: int = 5) -> OracleDrafter:
    if continuation is None:
        raise SpecDecodeError("the oracle drafter needs continuation=<token ids to propose>")
    return OracleDrafter(continuation, num_draft_tokens)
