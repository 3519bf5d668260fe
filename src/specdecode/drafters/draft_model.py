"""``draft-model``: a smaller causal LM with the target's tokenizer drafts a chain of k tokens
(Leviathan et al., ICML 2023; Chen et al., 2023), optionally widened into a tree.

With ``tree_width`` w > 1 each chain position also offers the draft's next w - 1 most likely tokens
as leaf siblings (no extra draft forwards), so a k-chain becomes a k*w-node tree. The draft keeps its
own KV cache, trimmed to the accepted tokens after every verdict and topped up with the new
committed tokens at the next proposal (one forward over only those tokens).

Greedy: the chain is the draft's argmax. Coupled sampling: the draft's Gumbel-max under the same
keyed noise as the target (high agreement when the two distributions agree). Rejection sampling with
a chain: tokens sampled from the processed draft distribution, which travels as ``draft_probs``;
with a tree the proposal is deterministic (point-mass rule).
"""

from __future__ import annotations

import torch

from specdecode.drafters.base import BuildContext, DraftContext, register
from specdecode.models.hf import HFModel, load_causal_lm
from specdecode.sampling import TorchRandom, coupled_choice, processed_probs
from specdecode.types import Draft, SpecDecodeError, Verdict


class DraftModelDrafter:
    def __init__(self, model: HFModel, num_draft_tokens: int = 4, tree_width: int = 1) -> None:
        if num_draft_tokens < 1 or tree_width < 1:
            raise SpecDecodeError("num_draft_tokens and tree_width must be >= 1")
        self.model, self.k, self.width = model, num_draft_tokens, tree_width
        self.model.reset()
        self.rng: TorchRandom | None = None
        self.base = 0  # committed length when the last draft was made
        self.chain_nodes: list[int] = []

    def propose(self, ctx: DraftContext) -> Draft:
        width = self.width
        k = min(self.k, ctx.max_depth, ctx.budget // width)
        base = len(ctx.tokens)
        limit = self.model.max_length
        self.chain_nodes, self.base = [], self.model.length  # observe() then keeps the cache as is
        if k < 1 or (limit is not None and base + k > limit):
            return Draft.empty()
        params = ctx.params
        sampled = not params.greedy and params.mode == "rejection" and width == 1
        if sampled and self.rng is None:
            self.rng = TorchRandom(ctx.seed + 0x5EED)
        logits = self.model.extend(ctx.tokens[self.model.length:], last_only=True)[-1]
        tokens, parents, rows = [], [], []
        self.chain_nodes, self.base, prev = [], base, -1
        for depth in range(k):
            probs = None if params.greedy else processed_probs(logits, params)
            if probs is None:
                tok = int(logits.argmax())
            elif sampled:
                tok = self.rng.categorical(probs)
                rows.append(probs)
            elif params.mode == "coupled":
                tok = coupled_choice(probs[None], ctx.seed, [base + depth])[0]
            else:
                tok = int(probs.argmax())
            self.chain_nodes.append(len(tokens))
            tokens.append(tok)
            parents.append(prev)
            if width > 1:
                scores = logits if probs is None else probs
                for alt in torch.topk(scores, width).indices.tolist():
                    if alt != tok and len(tokens) - self.chain_nodes[-1] < width:
                        tokens.append(alt)
                        parents.append(prev)
            prev = self.chain_nodes[-1]
            if depth < k - 1:
                logits = self.model.extend([tok], last_only=True)[-1]
        draft_probs = torch.stack(rows) if sampled else None
        return Draft(torch.tensor(tokens), torch.tensor(parents), draft_probs)

    def observe(self, verdict: Verdict) -> None:
        on_chain = 0
        while on_chain < len(verdict.path) and on_chain < len(self.chain_nodes) \
                and verdict.path[on_chain] == self.chain_nodes[on_chain]:
            on_chain += 1
        fed = max(0, len(self.chain_nodes) - 1)  # the last chain token was never fed
        self.model.crop(self.base + min(on_chain, fed))


def check_vocab(target: HFModel, draft: HFModel) -> None:
    if draft.vocab_size != target.vocab_size:
        raise SpecDecodeError(f"draft model vocabulary ({draft.vocab_size}) differs from the "
                              f"target's ({target.vocab_size}); they must share a tokenizer")


@register("draft-model")
def build_draft_model(build: BuildContext, num_draft_tokens: int = 4,
                      tree_width: int = 1) -> DraftModelDrafter:
    if build.draft_model is None:
        raise SpecDecodeError("the draft-model drafter needs a draft model (draft_model=... or "
                              "--draft-model PATH)")
    draft = HFModel(load_causal_lm(build.draft_model, what="draft model"))
    check_vocab(build.target, draft)
    return DraftModelDrafter(draft, num_draft_tokens, tree_width)
