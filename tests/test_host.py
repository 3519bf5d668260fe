"""Cross-request stores belong to a host (``specdecode/host.py``), never to the process: two
schedulers (two servers) or two models in one process do not see each other's stores."""

from __future__ import annotations

import copy

from helpers import tiny_model, vanilla

import specdecode as sd
from specdecode.drafters import suffix
from specdecode.drafters import token_recycling as tr
from specdecode.drafters.suffix_tree import SuffixStore
from specdecode.host import HostState, host_of

PROMPT = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]


def run_all(scheduler: sd.Scheduler, requests: list[dict]) -> list[list[int]]:
    ids = [scheduler.add_request(PROMPT, max_new_tokens=16, eos_token_id=[], **r)
           for r in requests]
    while scheduler.has_unfinished():
        scheduler.step()
    return [scheduler.release(i)[0] for i in ids]


def test_two_schedulers_keep_separate_stores_and_stay_lossless():
    models = [tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)]
    schedulers = [sd.Scheduler(m, max_batch_size=2) for m in models]
    requests = [{"drafter": "suffix"}, {"drafter": "token-recycling", "hot": True}]
    for model, scheduler in zip(models, schedulers):
        for tokens in run_all(scheduler, requests):
            assert tokens == vanilla(model, PROMPT, 16)
    stores = [s.host.peek(suffix.HOST_KEY) for s in schedulers]
    tables = [s.host.peek(tr.HOST_KEY) for s in schedulers]
    assert all(isinstance(st, SuffixStore) for st in stores) and stores[0] is not stores[1]
    assert tables[0] is not tables[1] and tables[0] is not None and tables[1] is not None
    for model, store in zip(models, stores):  # each learned its own target's outputs only
        assert store.sequences() == [vanilla(model, PROMPT, 16)]
    assert schedulers[0].host is not schedulers[1].host
    # plain generate calls use the model's own host, not a scheduler's
    for model in models:
        assert host_of(model).peek(suffix.HOST_KEY) is None
        sd.generate(model, PROMPT, drafter="suffix", max_new_tokens=4, eos_token_id=[])
        assert len(host_of(model).peek(suffix.HOST_KEY)) == 1
    assert host_of(models[0]) is not host_of(models[1])


def test_a_host_makes_each_store_once_and_a_copy_starts_empty():
    host = HostState()
    made = host.get("x", list)
    assert host.get("x", dict) is made and host.peek("y") is None
    assert copy.deepcopy(host).peek("x") is None
    host.clear()
    assert host.peek("x") is None
