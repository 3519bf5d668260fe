"""The OpenAI-compatible server, driven by the official ``openai`` client against a server this
module starts on 127.0.0.1 and a free port (demo pair, max batch 8).

Every answer is checked against ``specdecode.generate`` run alone on a separately loaded copy of
the target (the server's engine thread owns its model): greedy outputs equal vanilla's text and
token count; seeded sampling equals ``generate`` with the same seed."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import resource
import threading
import time

import httpx
import openai
import pytest
from helpers import fixed_policy as sd
from helpers.live_server import start_server

from specdecode.chat import chat_prompt
from specdecode.demo import load_demo
from specdecode.server import ServerConfig

pytestmark = pytest.mark.e2e  # a live server

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
           "Summarize the following text: the quick brown fox jumps over the lazy dog.",
           "Question: what is two plus two? Answer:", "In 1905, Albert Einstein"]
DRAFTERS = ["none", "ngram", "suffix", "token-recycling", "lookahead", "draft-model", "sam", "mix"]


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def server(demo):
    srv, thread = start_server(ServerConfig(max_batch_size=8, policy="fixed"))  # as sd's
    yield srv
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def reference(demo, ids, max_tokens, drafter="none", **options):
    result = sd.generate(demo.target, ids, drafter=drafter, draft_model=demo.draft,
                         max_new_tokens=max_tokens, **options)
    return demo.tokenizer.decode(result.token_ids, skip_special_tokens=True), len(result.token_ids)


def prompt_ids(demo, text):
    return demo.tokenizer(text, add_special_tokens=True)["input_ids"]


def wait_idle(server, timeout=10.0):
    """The engine holds no request: nothing running or queued, no sinks, no remembered ids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = server.state.worker.scheduler
        if (not server.state.worker.sinks and not s.has_unfinished() and not s.sequences
                and server.state.worker.commands.empty()):
            return
        time.sleep(0.02)
    s = server.state.worker.scheduler
    raise AssertionError(f"engine not idle: running {s.num_running}, waiting {s.num_waiting}, "
                         f"sequences {len(s.sequences)}, sinks {len(server.state.worker.sinks)}")


def stream_text(chunks, chat=False):
    parts, reason, usage = [], None, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append((choice.delta.content if chat else choice.text) or "")
            reason = choice.finish_reason or reason
    return "".join(parts), reason, usage


@pytest.mark.parametrize("drafter", ["ngram", "suffix", "draft-model"])
def test_completions_equal_generate(demo, server, client, drafter):
    for text in PROMPTS[:3]:
        expected, n = reference(demo, prompt_ids(demo, text), 40)
        spec = {"drafter": drafter, "num_draft_tokens": 4}
        resp = client.completions.create(model="specdecode-demo", prompt=text, max_tokens=40,
                                         temperature=0, extra_body={"speculative": spec})
        assert resp.choices[0].text == expected
        assert resp.usage.completion_tokens == n
        assert resp.usage.prompt_tokens == len(prompt_ids(demo, text))
        assert resp.choices[0].finish_reason in ("length", "stop")
        stats = resp.usage.model_extra["speculative"]
        assert stats["drafter"] == drafter and stats["steps"] >= 1
        streamed, reason, usage = stream_text(client.completions.create(
            model="specdecode-demo", prompt=text, max_tokens=40, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"speculative": spec}))
        assert streamed == expected and reason == resp.choices[0].finish_reason
        assert usage.completion_tokens == n
    wait_idle(server)


def test_chat_equals_generate(demo, server, client):
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Write a short poem about the sea."}]
    expected, n = reference(demo, chat_prompt(demo.tokenizer, messages), 48)
    resp = client.chat.completions.create(model="specdecode-demo", messages=messages,
                                          max_tokens=48, temperature=0)
    assert resp.choices[0].message.content == expected and resp.usage.completion_tokens == n
    assert resp.choices[0].message.role == "assistant"
    streamed, reason, _ = stream_text(client.chat.completions.create(
        model="specdecode-demo", messages=messages, max_tokens=48, temperature=0, stream=True,
        extra_body={"speculative": {"drafter": "suffix", "policy": "adaptive"}}), chat=True)
    assert streamed == expected and reason == resp.choices[0].finish_reason


def test_seeded_sampling_equals_generate(demo, client):
    """Rejection sampling: the same seed and drafter give ``generate``'s tokens; coupled sampling
    gives vanilla's tokens whatever the drafter."""
    ids = prompt_ids(demo, PROMPTS[0])
    sampling = dict(temperature=0.8, top_k=50, seed=1234)
    coupled, _ = reference(demo, ids, 32, sampling="coupled", **sampling)
    for drafter in ("ngram", "draft-model"):
        expected, _ = reference(demo, ids, 32, drafter=drafter, **sampling)
        resp = client.completions.create(
            model="specdecode-demo", prompt=PROMPTS[0], max_tokens=32, temperature=0.8, seed=1234,
            extra_body={"top_k": 50, "speculative": {"drafter": drafter}})
        assert resp.choices[0].text == expected
        resp = client.completions.create(
            model="specdecode-demo", prompt=PROMPTS[0], max_tokens=32, temperature=0.8, seed=1234,
            extra_body={"top_k": 50, "speculative": {"drafter": drafter, "sampling": "coupled"}})
        assert resp.choices[0].text == coupled


def test_stop_strings_cut_exactly(demo, client):
    full, _ = reference(demo, prompt_ids(demo, PROMPTS[1]), 60)
    stop = full[25:29]
    assert stop.strip(), full
    cut = full[:full.find(stop)]
    ids = sd.generate(demo.target, prompt_ids(demo, PROMPTS[1]), drafter="none",
                      max_new_tokens=60).token_ids
    fewest = next(k for k in range(1, len(ids) + 1)
                  if stop in demo.tokenizer.decode(ids[:k], skip_special_tokens=True))
    for stream in (False, True):
        kwargs = dict(model="specdecode-demo", prompt=PROMPTS[1], max_tokens=60, temperature=0,
                      stop=["@@never@@", stop], extra_body={"speculative": {"drafter": "ngram"}})
        if stream:
            text, reason, usage = stream_text(client.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs))
        else:
            resp = client.completions.create(**kwargs)
            text, reason, usage = resp.choices[0].text, resp.choices[0].finish_reason, resp.usage
        assert text == cut and reason == "stop"
        assert usage.completion_tokens == fewest


def test_32_concurrent_streams_with_mixed_drafters(demo, server, client):
    jobs = [(PROMPTS[i % len(PROMPTS)], DRAFTERS[i % len(DRAFTERS)], 24 + 4 * (i % 5))
            for i in range(32)]
    expected = {(p, m): reference(demo, prompt_ids(demo, p), m) for p, _, m in jobs}

    def run(job):
        prompt, drafter, max_tokens = job
        return stream_text(client.completions.create(
            model="specdecode-demo", prompt=prompt, max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"speculative": {"drafter": drafter}}))

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    for (prompt, drafter, max_tokens), (text, _, usage) in zip(jobs, results):
        want, n = expected[(prompt, max_tokens)]
        assert text == want, (prompt, drafter)
        assert usage.completion_tokens == n
        assert usage.model_extra["speculative"]["drafter"] == drafter
    wait_idle(server)


def test_cancelled_streams_free_their_rows(demo, server, client):
    """Eight long streams are dropped mid-way: the engine then holds nothing (no row, no queued
    request, no remembered id), and eight new requests all run at once (full batch)."""
    # vanilla, 2000 tokens each: running them out would take far longer than the wait below
    streams = [client.completions.create(model="specdecode-demo", prompt=PROMPTS[1 + i % 5],
                                         max_tokens=2000, temperature=0, stream=True,
                                         extra_body={"speculative": False})
               for i in range(8)]
    for s in streams:
        next(iter(s))
        next(iter(s))
        s.close()
    wait_idle(server, timeout=3)
    # a non-streaming client that gives up: its request is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", timeout=1.0,
                   json={"prompt": PROMPTS[1], "max_tokens": 2000, "temperature": 0,
                         "speculative": False})
    wait_idle(server, timeout=3)
    assert server.state.worker.scheduler.target.lengths == []  # no cache row left
    seen = {"running": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            sched = server.state.worker.scheduler
            seen["running"] = max(seen["running"], sched.num_running)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    jobs = [PROMPTS[i % 6] for i in range(8)]
    expected = [reference(demo, prompt_ids(demo, p), 96)[0] for p in jobs]
    with cf.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda p: client.completions.create(
            model="specdecode-demo", prompt=p, max_tokens=96, temperature=0).choices[0].text,
            jobs))
    done.set()
    watcher.join()
    assert texts == expected
    assert seen["running"] == 8, seen
    wait_idle(server)


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\S+?)(\{.*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_metrics_add_up_to_the_responses(server, client):
    names = ["spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
             "spec_decode_num_accepted_tokens_total", "generation_tokens_total",
             "prompt_tokens_total", "request_success_total"]

    def snapshot():
        text = httpx.get(server.url + "/metrics").text
        assert "# TYPE specdecode:time_to_first_token_seconds histogram" in text
        values = {n: _metric(text, "specdecode:" + n) for n in names}
        values["per_pos"] = [_metric(text, "specdecode:spec_decode_num_accepted_tokens_per_pos_total",
                                     position=str(i)) for i in range(16)]
        return values

    wait_idle(server)
    before = snapshot()
    totals = {n: 0 for n in names}
    per_pos = [0] * 16
    for i, drafter in enumerate(["ngram", "suffix", "draft-model", "none", "token-recycling"]):
        resp = client.completions.create(model="specdecode-demo", prompt=PROMPTS[i], max_tokens=40,
                                         temperature=0, extra_body={"speculative": {
                                             "drafter": drafter}})
        spec = resp.usage.model_extra["speculative"]
        totals["spec_decode_num_drafts_total"] += spec["num_drafts"]
        totals["spec_decode_num_draft_tokens_total"] += spec["num_draft_tokens"]
        totals["spec_decode_num_accepted_tokens_total"] += spec["num_accepted_tokens"]
        totals["generation_tokens_total"] += resp.usage.completion_tokens
        totals["prompt_tokens_total"] += resp.usage.prompt_tokens
        totals["request_success_total"] += 1
        for pos, count in enumerate(spec["accepted_per_pos"]):
            per_pos[pos] += count
        assert sum(spec["accepted_per_pos"]) == spec["num_accepted_tokens"]
    after = snapshot()
    assert totals["spec_decode_num_accepted_tokens_total"] > 0
    for n in names:
        assert after[n] - before[n] == totals[n], n
    assert [a - b for a, b in zip(after["per_pos"], before["per_pos"])] == per_pos


def test_routes_and_errors(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == ["specdecode-demo"]
    missing = httpx.get(server.url + "/v1/nothing")
    assert missing.status_code == 404 and "/v1/nothing" in missing.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="specdecode-demo", prompt="word " * 3000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="not allowed"):
        client.completions.create(model="specdecode-demo", prompt="hi", max_tokens=4,
                                  extra_body={"speculative": {"drafter": "oracle"}})
    with pytest.raises(openai.BadRequestError, match="datastore cannot be set"):
        client.completions.create(model="specdecode-demo", prompt="hi", max_tokens=4,
                                  extra_body={"speculative": {"datastore": "/etc"}})
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="specdecode-demo", prompt="hi", max_tokens=4, logprobs=2)


BAD_BODIES = [
    b"{not json", b"[1, 2]", b'{"prompt": 5}', b'{"prompt": "hi", "temperature": -1}',
    b'{"prompt": "hi", "top_p": 2}', b'{"prompt": "hi", "n": 2}', b'{"prompt": "hi", "max_tokens": 0}',
    b'{"prompt": "hi", "max_tokens": 99999}', b'{"prompt": "hi", "model": "nope"}',
    b'{"prompt": "hi", "stop": [""]}', b'{"prompt": [999999]}', b'{"prompt": []}',
    b'{"prompt": "hi", "speculative": {"drafter": "no-such"}}',
    b'{"prompt": "hi", "speculative": {"num_draft_tokens": "many"}}',
    b'{"prompt": "hi", "speculative": {"num_draft_tokens": -3}}',
    b'{"prompt": "hi", "speculative": {"policy": "greedy"}}',
    b'{"prompt": "hi", "echo": true}', b'{"prompt": ["a", "b"]}',
    json.dumps({"prompt": "many words " * 1500}).encode(),
]
BAD_CHAT = [b'{"messages": []}', b'{"messages": [{"role": "wizard", "content": "x"}]}',
            b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}']


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_soak_bad_and_good_requests(demo, server):
    """200 requests, a third malformed or out of range: every bad one gets its 4xx with a
    message, every good one its exact answer; the server stays up and holds nothing after."""
    good = {p: reference(demo, prompt_ids(demo, p), 8)[0] for p in PROMPTS}
    jobs = []
    for i in range(200):
        if i % 3 == 0:
            bad = (BAD_BODIES + BAD_CHAT)[(i // 3) % (len(BAD_BODIES) + len(BAD_CHAT))]
            route = "chat/completions" if bad in BAD_CHAT else "completions"
            jobs.append(("bad", route, bad))
        else:
            prompt = PROMPTS[i % len(PROMPTS)]
            jobs.append(("good", prompt, json.dumps({
                "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0,
                "speculative": {"drafter": DRAFTERS[i % len(DRAFTERS)]}}).encode()))

    def run(job):
        kind, what, body = job
        with httpx.Client(timeout=60) as http:
            if kind == "bad":
                r = http.post(f"{server.url}/v1/{what}", content=body,
                              headers={"content-type": "application/json"})
                return r.status_code, r.json()
            r = http.post(f"{server.url}/v1/completions", content=body,
                          headers={"content-type": "application/json"})
            if r.status_code != 200:
                return r.status_code, r.text
            if not r.text.startswith("data:"):
                return 200, r.json()["choices"][0]["text"]
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            return 200, "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

    rss_start = None
    with cf.ThreadPoolExecutor(8) as pool:
        for i, (job, (status, answer)) in enumerate(zip(jobs, pool.map(run, jobs))):
            if job[0] == "bad":
                assert status == 400, (job, status, answer)
                assert answer["error"]["message"] and answer["error"]["type"], answer
            else:
                assert status == 200 and answer == good[job[1]], (job, status, answer)
            if i == 60:
                rss_start = _rss_mb()
    assert httpx.get(server.url + "/health").status_code == 200
    wait_idle(server)
    assert _rss_mb() - rss_start < 200, "memory grew during the soak"
