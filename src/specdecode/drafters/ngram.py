"""``ngram``: prompt lookup decoding (Saxena, "Prompt Lookup Decoding", 2023).

Find the longest suffix of the context, ``max_n`` down to ``min_n`` tokens, that occurred earlier in
prompt + output, and propose the tokens that followed its most recent earlier occurrence. An index
of n-gram -> last end position is updated incrementally with the new tokens only, so a step costs
O(new tokens x (max_n - min_n + 1)), never O(context).
"""

from __future__ import annotations

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import DEPTH, count
from specdecode.drafters.registry import register
from specdecode.types import Draft, SpecDecodeError, Verdict


class NgramDrafter:
    def __init__(self, num_draft_tokens: int = 5, min_n: int = 1, max_n: int = 3) -> None:
        if not 1 <= min_n <= max_n:
            raise SpecDecodeError(f"ngram needs 1 <= min_n <= max_n, got {min_n}, {max_n}")
        if num_draft_tokens < 1:
            raise SpecDecodeError("num_draft_tokens must be >= 1")
        self.k, self.min_n, self.max_n = num_draft_tokens, min_n, max_n
        self.last_end: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are indexed

    def _index(self, tokens: list[int], upto: int) -> None:
        """Index every n-gram that ends at a position in [self.indexed, upto)."""
        for end in range(self.indexed, upto):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self.last_end[tuple(tokens[end - n + 1:end + 1])] = end
        self.indexed = max(self.indexed, upto)

    def propose(self, ctx: DraftContext) -> Draft:
        tokens = ctx.tokens
        length = len(tokens)
        self._index(tokens, length - 1)  # never the current suffix itself
        k = min(self.k, ctx.budget, ctx.max_depth)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self.last_end.get(tuple(tokens[length - n:]))
            if end is not None:
                return Draft.chain(tokens[end + 1:end + 1 + k])
        return Draft.empty()

    def observe(self, verdict: Verdict) -> None:
        pass


@register("ngram", options={"num_draft_tokens": DEPTH, "min_n": count(1, 16),
                            "max_n": count(1, 16)})
def build_ngram(build: BuildContext, num_draft_tokens: int = 5, min_n: int = 1,
                max_n: int = 3) -> NgramDrafter:
    return NgramDrafter(num_draft_tokens, min_n, max_n)
