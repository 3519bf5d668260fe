"""``grammar``: drafts what the request's grammar says comes next (structured output only).

A chain, built on the grammar state the engine hands over (``ctx.constraint``): the grammar's
forced continuation (llguidance's fast-forward tokens: the canonical tokenization of the bytes the
grammar forces, e.g. a JSON key and its quotes), and where the grammar leaves a choice, the legal
token that most often followed the last token so far in this request's own text (prompt included:
a schema in the prompt names the keys and values the output repeats). The chain stops at the first
choice with no such token, at EOS, or at the budget. A deterministic (point-mass) proposal; without
a constraint it proposes nothing. Mix it with others (``mix`` with ``sources=grammar+suffix``).

The engine already appends the tokens that are the only legal one (jump-forward); this drafter
goes further: canonical multi-token runs and guesses at choice points, all verified as usual.

Options: ``num_draft_tokens`` (chain length, default 16).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import DEPTH
from specdecode.drafters.registry import register
from specdecode.types import Draft, Verdict


class GrammarDrafter:
    def __init__(self, num_draft_tokens: int) -> None:
        self.num_draft_tokens = num_draft_tokens
        self.follow: dict[int, Counter] = defaultdict(Counter)  # token -> next-token counts
        self.seen = 0  # tokens of the context already counted

    def _learn(self, tokens: list[int]) -> None:
        for i in range(max(1, self.seen), len(tokens)):
            self.follow[tokens[i - 1]][tokens[i]] += 1
        self.seen = len(tokens)

    def propose(self, ctx: DraftContext) -> Draft:
        state = ctx.constraint
        if state is None:
            return Draft.empty()
        self._learn(ctx.tokens)
        budget = min(ctx.budget, ctx.max_depth, self.num_draft_tokens)
        out: list[int] = []
        last = ctx.tokens[-1]
        try:
            while len(out) < budget:
                forced = state.ff_tokens()[:budget - len(out)]
                if forced:
                    took = state.push(forced)
                    out += forced[:took]
                    if took < len(forced) or not took:
                        break
                    last = out[-1]
                    continue
                legal = state.allowed()
                guess = next((t for t, _ in self.follow.get(last, Counter()).most_common()
                              if t < legal.numel() and legal[t] and t not in state.eos_ids),
                             None)
                if guess is None or not state.push([guess]):
                    break
                out.append(guess)
                last = guess
        finally:
            state.reset_probe()
        return Draft.chain(out)

    def observe(self, verdict: Verdict) -> None:
        pass


@register("grammar", options={"num_draft_tokens": DEPTH})
def build_grammar(build: BuildContext, num_draft_tokens: int = 16) -> GrammarDrafter:
    return GrammarDrafter(num_draft_tokens)
