"""The target-feedback channel: a drafter that declares ``feedback_topk`` sees the target's top-k ids
at every verified row (rejected nodes included), and for the prompt with its first proposal; others
get nothing; ``finish``
is called once with the output, however the request ends."""

from __future__ import annotations

import torch
from helpers import fixed_policy as sd
from helpers import make_prompts, tiny_model, vanilla
from helpers.drafters import OraclePrefixTree

from specdecode.types import Draft, Verdict


class Recorder(OraclePrefixTree):
    """Oracle-prefix trees (accepted and rejected nodes), recording what the engine hands back."""

    def __init__(self, reference, vocab, seed, topk):
        super().__init__(reference, vocab, seed)
        self.feedback_topk = topk
        self.steps: list[tuple[list[int], Draft, Verdict]] = []
        self.finished: list[list[int]] = []
        self.prefill: list = []

    def propose(self, ctx):
        draft = super().propose(ctx)
        self.steps.append((list(ctx.tokens), draft, None))
        self.prefill.append(ctx.prefill_topk_ids)
        return draft

    def observe(self, verdict):
        tokens, draft, _ = self.steps[-1]
        self.steps[-1] = (tokens, draft, verdict)

    def finish(self, output):
        self.finished.append(list(output))


@torch.no_grad()
def next_topk(model, context: list[int], k: int) -> list[int]:
    logits = model(input_ids=torch.tensor([context])).logits[0, -1]
    return logits.topk(k).indices.tolist()


def test_feedback_rows_are_the_targets_topk_at_every_node():
    model = tiny_model("llama")
    k = 3
    for i, prompt in enumerate(make_prompts(6, seed=3)[1:]):
        reference = vanilla(model, prompt, 16)
        rec = Recorder(reference, 96, seed=i, topk=k)
        out = sd.generate(model, prompt, drafter=rec, max_new_tokens=16, eos_token_id=[])
        assert out.token_ids == reference
        rejected_rows = 0
        for step, (context, draft, verdict) in enumerate(rec.steps):
            fb = verdict.feedback
            assert fb is not None and fb.topk_ids.shape == (len(draft) + 1, k)
            assert fb.row_tokens == [context[-1]] + draft.tokens.tolist()
            parents = draft.parents.tolist()
            for row in range(len(draft) + 1):
                path, node = [], row - 1
                while node >= 0:
                    path.append(int(draft.tokens[node]))
                    node = parents[node]
                assert fb.topk_ids[row].tolist() == next_topk(model, context + path[::-1], k)
            rejected_rows += len(draft) - len(verdict.path)
            prefill = rec.prefill[step]  # the prompt's rows come with the first proposal only
            if step == 0:
                assert prefill.shape == (len(prompt) - 1, k)
                for j in range(len(prompt) - 1):
                    assert prefill[j].tolist() == next_topk(model, prompt[:j + 1], k)
            else:
                assert prefill is None
        assert rejected_rows > 0  # rejected nodes were really reported
        assert rec.finished == [reference]


def test_no_feedback_unless_declared_and_finish_on_early_stop():
    model = tiny_model("qwen2")
    prompt = make_prompts(3)[2]
    reference = vanilla(model, prompt, 12)
    rec = Recorder(reference, 96, seed=0, topk=0)
    sd.generate(model, prompt, drafter=rec, max_new_tokens=12, eos_token_id=[])
    assert all(v.feedback is None for _, _, v in rec.steps)
    assert all(p is None for p in rec.prefill)
    # a stream abandoned after two steps still ends the request
    rec = Recorder(reference, 96, seed=0, topk=2)
    events = sd.stream(model, prompt, drafter=rec, max_new_tokens=12, eos_token_id=[])
    got = next(events).tokens + next(events).tokens
    events.close()
    assert rec.finished == [got]
