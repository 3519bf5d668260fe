"""Structured output through the server with the official openai client: ``response_format``
(json_schema, json_object) and vLLM's ``structured_outputs`` (regex, grammar, json), streamed and
not, equal to ``specdecode.generate`` with the same constraint; a cut reports "length"; a bad
schema or regex is a 400."""

from __future__ import annotations

import json
import re

import openai
import pytest
from helpers import fixed_policy as sd
from helpers.live_server import start_server

from specdecode.demo import load_demo
from specdecode.server import ServerConfig

pytestmark = pytest.mark.e2e  # a live server

pytest.importorskip("llguidance")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Describe a person as a JSON object."}]


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def client(demo):
    srv, thread = start_server(ServerConfig(max_batch_size=4, drafter="mix", policy="fixed",
                                            drafter_options={"sources": "grammar+suffix"}))
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    srv.should_exit = True
    thread.join(timeout=30)


def chat_ids(demo) -> list[int]:
    ids = demo.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def expected(demo, ids, spec, max_tokens):
    out = sd.generate(demo.target, ids, drafter="none", max_new_tokens=max_tokens,
                      constraint=spec, tokenizer=demo.tokenizer)
    return demo.tokenizer.decode(out.token_ids, skip_special_tokens=True), out.finish_reason


def streamed(chunks) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text += piece or ""
            reason = choice.finish_reason or reason
    return text, reason


def test_response_format_json_schema(demo, client):
    want, why = expected(demo, chat_ids(demo), {"json": PERSON}, 64)
    assert why == "eos" and set(json.loads(want)) == {"name", "age"}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    resp = client.chat.completions.create(model="specdecode-demo", messages=MESSAGES,
                                          max_tokens=64, temperature=0, response_format=fmt)
    assert resp.choices[0].message.content == want and resp.choices[0].finish_reason == "stop"
    text, reason = streamed(client.chat.completions.create(
        model="specdecode-demo", messages=MESSAGES, max_tokens=64, temperature=0,
        response_format=fmt, stream=True))
    assert (text, reason) == (want, "stop")


def test_json_object_and_length_cut(demo, client):
    want, _ = expected(demo, chat_ids(demo), {"json_object": True}, 6)
    resp = client.chat.completions.create(model="specdecode-demo", messages=MESSAGES,
                                          max_tokens=6, temperature=0,
                                          response_format={"type": "json_object"})
    assert resp.choices[0].message.content == want and resp.choices[0].finish_reason == "length"
    assert want.startswith("{")


@pytest.mark.parametrize("spec", [{"regex": r"[0-9]{3}-[0-9]{4}"},
                                  {"grammar": 'start: WORD (" and " WORD){1,2}\nWORD: /[a-z]{2,6}/'},
                                  {"json": PERSON}])
def test_structured_outputs_extra_body(demo, client, spec):
    prompt = "My phone number is"
    ids = demo.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    want, _ = expected(demo, ids, spec, 40)
    resp = client.completions.create(model="specdecode-demo", prompt=prompt, max_tokens=40,
                                     temperature=0, extra_body={"structured_outputs": spec})
    assert resp.choices[0].text == want
    if "regex" in spec:
        assert re.fullmatch(spec["regex"], want)
    text, _ = streamed(client.completions.create(
        model="specdecode-demo", prompt=prompt, max_tokens=40, temperature=0, stream=True,
        extra_body={"structured_outputs": spec}))
    assert text == want


@pytest.mark.parametrize("body,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "invalid JSON schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "invalid regex"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a", "json": {}}}, "exactly one"),
])
def test_bad_constraints_are_400(client, body, needle):
    with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
        client.completions.create(model="specdecode-demo", prompt="hi", max_tokens=4,
                                  extra_body=body)
