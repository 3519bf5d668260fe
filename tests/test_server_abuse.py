"""The server under a hostile client (issue 25): a live server on 127.0.0.1 (demo pair, batch 2,
queue 2, 64 KiB bodies, an API key) gets oversized drafter options, a mix that names drafters
outside its allowed set, oversized and malformed bodies, a full queue, bad keys, clients that
leave early and requests that time out. Every abuse gets its 4xx with a message, a well-behaved
client running at the same time keeps its pace and its exact output, and the engine holds nothing
afterwards. Bounded: about 150 requests, well under a minute."""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import socket
import statistics
import threading
import time

import httpx
import openai
import pytest
from helpers import fixed_policy as sd
from helpers.live_server import start_server
from starlette.testclient import TestClient

from specdecode.demo import load_demo
from specdecode.drafters import REGISTRY
from specdecode.drafters.options import Limits
from specdecode.drafters.registry import check_options
from specdecode.server import ServerConfig, create_app

pytestmark = pytest.mark.e2e  # a live server

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
LIMIT = 64 * 1024
PROMPT = "The capital of France is"

# (speculative field, what the 400's message must name): every oversized option of every drafter
OVERSIZED = [
    ({"drafter": "ngram", "max_n": 1e9}, "max_n"),
    ({"drafter": "ngram", "min_n": 10**6}, "min_n"),
    ({"drafter": "ngram", "num_draft_tokens": 1e9}, "num_draft_tokens"),
    ({"drafter": "lookahead", "window": 1e8}, "window"),
    ({"drafter": "lookahead", "num_draft_tokens": 1e8}, "num_draft_tokens"),
    ({"drafter": "lookahead", "max_ngrams": 10**7}, "max_ngrams"),
    ({"drafter": "lookahead", "max_nodes": 10**7}, "max_nodes"),
    ({"drafter": "lookahead", "pool_size": 10**9}, "pool_size"),
    ({"drafter": "layer-skip", "num_draft_tokens": 1e9}, "num_draft_tokens"),
    ({"drafter": "layer-skip", "num_layers": 1000}, "num_layers"),
    ({"drafter": "layer-skip", "tree": "dynamic", "topk": 10**6}, "topk"),
    ({"drafter": "draft-model", "tree": "dynamic", "topk": 10**6}, "topk"),
    ({"drafter": "draft-model", "tree_width": 10**6}, "tree_width"),
    ({"drafter": "draft-model", "num_drafts": 10**6}, "num_drafts"),
    ({"drafter": "draft-model", "branch_depth": 10**6}, "branch_depth"),
    ({"drafter": "draft-model", "max_nodes": 10**6}, "max_nodes"),
    ({"drafter": "token-recycling", "topk": 8192}, "topk"),
    ({"drafter": "token-recycling", "hot": True}, "hot"),
    ({"drafter": "token-recycling", "num_draft_tokens": 10**9}, "num_draft_tokens"),
    ({"drafter": "suffix", "max_depth": 100}, "max_depth"),
    ({"drafter": "suffix", "cache_size": 10**9}, "cache_size"),
    ({"drafter": "suffix", "max_nodes": 10**9}, "max_nodes"),
    ({"drafter": "suffix", "alpha": 1e300}, "alpha"),
    ({"drafter": "suffix", "cache_file": "/tmp/x.json"}, "cache_file"),
    ({"drafter": "sam", "min_match": 10**9}, "min_match"),
    ({"drafter": "sam", "corpus": "/etc/passwd"}, "corpus"),
    ({"drafter": "eagle", "topk": 10**6}, "topk"),
    ({"drafter": "eagle", "head": "/tmp"}, "head"),
    ({"drafter": "medusa", "max_nodes": 10**6}, "max_nodes"),
    ({"drafter": "mix", "max_nodes": 1e9}, "max_nodes"),
    ({"drafter": "mix", "spine_nodes": 1e9}, "spine_nodes"),
    ({"drafter": "mix", "sources": "ngram+suffix", "max_n": 1e9}, "max_n"),
    ({"drafter": "mix", "sources": "suffix+ngram", "max_depth": 3}, "max_depth"),
    ({"drafter": "ngram", "sampling": "nucleus"}, "sampling"),
    ({"drafter": "ngram", "num_draft_tokens": 2.5}, "num_draft_tokens"),
]
MIX_BYPASS = [  # drafters outside the allowed set, through mix
    ({"drafter": "mix", "sources": "ngram+rest"}, "rest"),
    ({"drafter": "mix", "sources": ["oracle", "ngram"]}, "oracle"),
    ({"drafter": "mix", "sources": "+".join(["ngram"] * 10000)}, "at most"),
    ({"drafter": "mix", "sources": "mix+ngram"}, "mix"),
]


def _serve(config: ServerConfig):
    return start_server(config, log_level="critical")


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def server():
    srv, thread = _serve(ServerConfig(max_batch_size=2, max_queue=2, max_body_bytes=LIMIT,
                                      api_key=KEY, policy="fixed"))  # as sd's
    yield srv
    srv.should_exit = True
    thread.join(timeout=30)


def post(server, body, route="completions", timeout=60.0, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/{route}", content=content, headers=headers,
                      timeout=timeout)


def reference(demo, max_tokens: int, prompt: str = PROMPT) -> str:
    ids = demo.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    out = sd.generate(demo.target, ids, drafter="none", max_new_tokens=max_tokens)
    return demo.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def wait_idle(server, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    w = server.state.worker
    while time.monotonic() < deadline:
        s = w.scheduler
        if not w.sinks and not s.has_unfinished() and not s.sequences and w.commands.empty() \
                and server.state.in_flight == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: sinks {len(w.sinks)}, running {w.scheduler.num_running}, "
                         f"waiting {w.scheduler.num_waiting}, in flight {server.state.in_flight}")


def step_times(server, max_tokens: int) -> tuple[list[float], str]:
    """A well-behaved greedy stream: the time between its chunks (one per engine step) and its
    text."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "speculative": False}
    stamps, parts = [], []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH,
                      timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                    parts.append(chunk["choices"][0]["text"])
    return [b - a for a, b in zip(stamps, stamps[1:])], "".join(parts)


def test_oversized_options_refused_while_a_good_client_keeps_its_pace(demo, server):
    for spec, name in OVERSIZED + MIX_BYPASS:
        r = post(server, {"prompt": PROMPT, "max_tokens": 4, "speculative": spec})
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and name in msg, (spec, r.status_code, msg)
        assert " option " in msg or "source" in msg, msg  # names the drafter and its option
        if isinstance(spec.get(name), (int, float)) and not isinstance(spec.get(name), bool):
            assert any(w in msg for w in ("at most", "integer", "cannot be set")), msg
    expected = reference(demo, 64)
    unloaded = []
    for _ in range(2):
        gaps, text = step_times(server, 64)
        assert text == expected
        unloaded += gaps
    stop = threading.Event()
    sent = []

    def abuse() -> None:
        with httpx.Client(timeout=30, headers=AUTH) as http:
            while not stop.is_set() and len(sent) < 3 * len(OVERSIZED + MIX_BYPASS):
                spec = (OVERSIZED + MIX_BYPASS)[len(sent) % len(OVERSIZED + MIX_BYPASS)][0]
                sent.append(http.post(f"{server.url}/v1/completions", json={
                    "prompt": PROMPT, "max_tokens": 4, "speculative": spec}).status_code)
                time.sleep(0.005)

    abuser = threading.Thread(target=abuse)
    abuser.start()
    try:
        loaded, text = step_times(server, 64)
    finally:
        stop.set()
        abuser.join()
    assert text == expected and sent and set(sent) == {400}
    base, under = statistics.median(unloaded), statistics.median(loaded)
    assert under <= 2 * base, f"step time {1e3 * under:.2f} ms under abuse vs {1e3 * base:.2f} ms"
    wait_idle(server)


BAD_BODIES = [
    b"[" * 30_000 + b"]" * 30_000,  # nested past the parser's recursion limit
    b'{"prompt": "hi", "speculative": {"a": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}}",
    b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "temperature": Infinity}',
    b'{"prompt": "hi", "top_p": -Infinity}', b'{"prompt": "hi", "temperature": 1e999}',
    b'{"prompt": "caf\xe9"}', b'\xff\xfe{\x00}\x00', b'{"prompt": "\\ud800"}',
    b'{"prompt": "hi", "min_p": 0.1}', b'{"prompt": "hi", "ignore_eos": true}',
    b'{"prompt": "hi", "stop_token_ids": [2]}', b'{"prompt": "hi", "seed": 99999999999999999999}',
    json.dumps({"prompt": "hi", "stop": [f"s{i}" for i in range(9)]}).encode(),
    json.dumps({"prompt": "hi", "stop": ["x" * 129]}).encode(),
    json.dumps({"prompt": "hi", "timeout": -1}).encode(),
]


def test_bodies_malformed_huge_or_unsupported(server):
    for body in BAD_BODIES:
        r = post(server, body)
        assert r.status_code == 400 and r.json()["error"]["message"], (body[:60], r.text)
    r = post(server, {"prompt": "x" * (LIMIT + 10)})
    assert r.status_code == 413 and str(LIMIT) in r.json()["error"]["message"]
    chunked = httpx.post(f"{server.url}/v1/completions", headers=AUTH,  # no content-length
                         content=iter([b'{"prompt": "', b"y" * LIMIT, b'"}']), timeout=30)
    assert chunked.status_code == 413
    wait_idle(server)


def test_api_key(server, demo):
    for route, method in [("/v1/completions", "POST"), ("/v1/models", "GET"), ("/metrics", "GET")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url + route, headers=headers, json={"prompt": "hi"})
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"], route
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics", headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    out = good.completions.create(model="specdecode-demo", prompt=PROMPT, max_tokens=8,
                                  temperature=0)
    assert out.choices[0].text == reference(demo, 8)
    app = create_app(demo.target, demo.tokenizer, config=ServerConfig(api_key="k",
                                                                       metrics_public=True))
    local = TestClient(app)  # no lifespan: only the routes that need no engine
    assert local.get("/metrics").status_code == 200
    assert local.get("/v1/models").status_code == 401
    assert local.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_full_queue_gets_429_and_accepted_requests_stay_exact(demo, server):
    expected = reference(demo, 48)

    def one(_):
        return post(server, {"prompt": PROMPT, "max_tokens": 48, "temperature": 0,
                             "speculative": False})

    with cf.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(one, range(10)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 4 and 429 in codes, codes
    for r in answers:
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == expected
        else:
            assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
    wait_idle(server)
    assert post(server, {"prompt": PROMPT, "max_tokens": 4}).status_code == 200


def _leave_early(server, body: dict) -> None:
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                  + payload)
    # closed before reading a single byte of the answer


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_leaves_before_the_first_byte_frees_its_row(server, stream):
    aborted = server.state.metrics.success.labels("specdecode-demo", "abort")
    before = aborted._value.get()
    _leave_early(server, {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0,
                          "stream": stream, "speculative": False})
    deadline = time.monotonic() + 5
    while aborted._value.get() == before:  # it reaches the engine, and is aborted there
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.02)
    wait_idle(server, timeout=5)
    assert server.state.worker.scheduler.target.lengths == []


def test_request_timeout_aborts_and_frees_the_row(server):
    body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "speculative": False,
            "timeout": 0.5}
    start = time.monotonic()
    r = post(server, body)
    assert r.status_code == 408 and "timed out" in r.json()["error"]["message"]
    assert time.monotonic() - start < 5
    wait_idle(server)
    streamed = post(server, {**body, "stream": True}).text
    assert "timed out" in streamed and streamed.rstrip().endswith("data: [DONE]")
    wait_idle(server)


def test_health_reports_a_stalled_engine_and_failures_stay_private(server):
    state = server.state
    sched = state.worker.scheduler
    real = sched.step
    old, state.config.stall_seconds = state.config.stall_seconds, 0.3

    def slow():
        time.sleep(1.0)
        return real()

    sched.step = slow
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            job = pool.submit(post, server, {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
            deadline, seen = time.monotonic() + 5, None
            while time.monotonic() < deadline and seen != 503:
                seen = httpx.get(server.url + "/health").status_code
                time.sleep(0.05)
            assert seen == 503
            assert job.result().status_code == 200
    finally:
        del sched.step
        state.config.stall_seconds = old
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}

    def broken():
        raise RuntimeError("secret detail of another request")

    sched.step = broken  # the engine replaces this scheduler after the failure
    r = post(server, {"prompt": PROMPT, "max_tokens": 4, "speculative": False})
    assert r.status_code == 500 and "secret" not in r.text and "RuntimeError" in r.text
    assert post(server, {"prompt": PROMPT, "max_tokens": 4}).status_code == 200
    wait_idle(server)


def test_the_table_covers_every_drafter_and_the_library_checks_it(demo):
    for name, spec in REGISTRY.items():  # registration refuses a parameter without an entry
        params = [p for p, v in inspect.signature(spec.factory).parameters.items()
                  if p != "build" and v.kind is not inspect.Parameter.VAR_KEYWORD]
        assert set(params) <= set(spec.options), (name, set(params) - set(spec.options))
        assert all(spec.options[p].default == inspect.signature(spec.factory).parameters[p].default
                   for p in params if not spec.options[p].required)
    limits = Limits(nodes=8, vocab=100, layers=4)
    with pytest.raises(sd.SpecDecodeError, match="ngram option max_n = 1000000000 .* at most 16"):
        check_options("ngram", {"max_n": 1e9}, limits)
    with pytest.raises(sd.SpecDecodeError, match="at most 8 \\(the draft node cap\\)"):
        check_options("lookahead", {"window": 9}, limits)
    with pytest.raises(sd.SpecDecodeError, match="at most 3"):
        check_options("layer-skip", {"num_layers": 4}, limits)
    assert check_options("draft-model", {"topk": 4.0, "tree": "dynamic"}, limits)["topk"] == 4
    with pytest.raises(sd.SpecDecodeError, match="token-recycling option topk .* at most 64"):
        sd.generate(demo.target, [1, 2, 3], drafter="token-recycling", topk=8192)
    with pytest.raises(sd.SpecDecodeError, match="ngram option max_n"):
        sd.generate(demo.target, [1, 2, 3], drafter="mix", sources="ngram+suffix", max_n=10**6)


def test_max_tokens_bounded_without_a_model_context(demo, monkeypatch):
    """A model that declares no context length still bounds prompt + max_tokens (4096, or
    --max-model-len)."""
    import specdecode.server.app as app_module

    monkeypatch.setattr(app_module, "context_length", lambda config: None)
    for config, bound in [(ServerConfig(), 4096), (ServerConfig(max_model_len=64), 64)]:
        local = TestClient(create_app(demo.target, demo.tokenizer, config=config))
        r = local.post("/v1/completions", json={"prompt": "hi", "max_tokens": bound})
        assert r.status_code == 400 and f"maximum context length is {bound}" in r.text, r.text
        assert local.get("/v1/models").json()["data"][0]["max_model_len"] == bound
