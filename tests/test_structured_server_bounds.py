"""The server's grammar compilation: off the event loop and bounded in time (a pathological schema
or regex is a 400 while a concurrent request completes), vLLM's ``choice`` through the openai
client (equal to ``generate`` with ``{"choice": [...]}``), its bounds, and ``structural_tag``
refused."""

from __future__ import annotations

import json
import re
import threading
import time

import openai
import pytest
from helpers import fixed_policy as sd
from helpers.live_server import start_server

from specdecode.demo import load_demo
from specdecode.server import ServerConfig
from specdecode.server.constraints import GrammarCompiler
from specdecode.structured.bounds import MAX_CHOICE_CHARS, MAX_CHOICES

pytestmark = pytest.mark.e2e  # a live server

pytest.importorskip("llguidance")

CHOICES = ["yes", "no", 'say "maybe"', "a|b (c)*", "back\\slash\nnew line", "ünïcode ✓"]
# validation of an allOf of n such patterns takes exponential time in llguidance (n=14: seconds)
SLOW_SCHEMA = {"allOf": [{"type": "string", "pattern": f"(.*a){{{i}}}"} for i in range(1, 15)]}
HUGE_REGEX = "((x{1000}){1000}){1000}"  # its lexer takes seconds to build


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def server():
    srv, thread = start_server(ServerConfig(max_batch_size=4, drafter="grammar", policy="fixed"))
    yield srv
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_choice_equals_generate(demo, client):
    prompt = "Answer yes or no:"
    ids = demo.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    out = sd.generate(demo.target, ids, drafter="none", max_new_tokens=40,
                      constraint={"choice": CHOICES}, tokenizer=demo.tokenizer)
    want = demo.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert want in CHOICES and out.finish_reason == "eos"
    resp = client.completions.create(model="specdecode-demo", prompt=prompt, max_tokens=40,
                                     temperature=0, extra_body={"structured_outputs":
                                                                {"choice": CHOICES}})
    assert resp.choices[0].text == want and resp.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(
        model="specdecode-demo", messages=[{"role": "user", "content": "Pick one."}],
        max_tokens=40, temperature=0.8, seed=3, stream=True,
        extra_body={"structured_outputs": {"choice": CHOICES}})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) in CHOICES


@pytest.mark.parametrize("value,needle", [
    ([], "non-empty list"),
    (["a", 3], "strings only"),
    (["x"] * (MAX_CHOICES + 1), f"at most {MAX_CHOICES} strings"),
    (["x" * (MAX_CHOICE_CHARS + 1)], f"at most {MAX_CHOICE_CHARS} characters"),
])
def test_choice_bounds_are_400(client, value, needle):
    with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
        client.completions.create(model="specdecode-demo", prompt="hi", max_tokens=4,
                                  extra_body={"structured_outputs": {"choice": value}})


def test_structural_tag_is_refused(client):
    tag = {"structural_tag": json.dumps({"type": "structural_tag", "format": {}})}
    with pytest.raises(openai.BadRequestError, match="structural_tag is not supported"):
        client.completions.create(model="specdecode-demo", prompt="hi", max_tokens=4,
                                  extra_body={"structured_outputs": tag})


def _post(client, result: dict, key: str, **kw) -> None:
    start = time.monotonic()
    try:
        result[key] = client.completions.create(model="specdecode-demo", prompt="Hello",
                                                max_tokens=8, temperature=0, **kw)
    except openai.APIStatusError as err:
        result[key] = err
    result[key + "_s"] = time.monotonic() - start


def test_pathological_grammars_are_400_and_never_stall(demo, server, client, monkeypatch):
    compiler = GrammarCompiler(timeout_s=0.5, max_compiling=4)  # this test's, in the live app
    monkeypatch.setattr(server.state, "compiler", compiler)
    result: dict = {}
    slow = threading.Thread(target=_post, args=(client, result, "schema"), kwargs={
        "extra_body": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "slow", "schema": SLOW_SCHEMA}}}})
    huge = threading.Thread(target=_post, args=(client, result, "regex"), kwargs={
        "extra_body": {"structured_outputs": {"regex": HUGE_REGEX}}})
    slow.start()
    huge.start()
    time.sleep(0.05)
    _post(client, result, "good", extra_body={"structured_outputs": {"regex": "[a-z]{2,5}"}})
    _post(client, result, "plain")
    slow.join(60)
    huge.join(60)
    for key, where in (("schema", "response_format"), ("regex", "structured_outputs")):
        err = result[key]
        assert isinstance(err, openai.BadRequestError), err
        assert f"{where}: the grammar did not compile within 0.5 s" in err.message
        assert result[key + "_s"] < 5
    assert re.fullmatch("[a-z]{2,5}", result["good"].choices[0].text)
    ids = demo.tokenizer("Hello", add_special_tokens=True)["input_ids"]
    want = sd.generate(demo.target, ids, drafter="none", max_new_tokens=8)
    assert result["plain"].choices[0].text == demo.tokenizer.decode(want.token_ids,
                                                                     skip_special_tokens=True)
    start = time.monotonic()  # the same source again: refused at once
    with pytest.raises(openai.BadRequestError, match="longer than 0.5 s to compile before"):
        client.completions.create(model="specdecode-demo", prompt="hi", max_tokens=4,
                                  extra_body={"structured_outputs": {"regex": HUGE_REGEX}})
    assert time.monotonic() - start < 2
    assert compiler.wait(120)  # the timed-out compiles end on their own
