"""OpenAI request bodies, checked: every refusal is an ``APIError`` whose message names the problem
(the app turns it into OpenAI's error JSON)."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specdecode.drafters.options import Limits
from specdecode.drafters.registry import check_options
from specdecode.policies import check_policy
from specdecode.types import SpecDecodeError

MAX_STOP_STRINGS = 8  # stop strings per request
MAX_STOP_CHARS = 128  # characters per stop string
MAX_JSON_DEPTH = 32  # nesting of a request body
MAX_INT_DIGITS = 20  # digits of an integer in a request body
# Parameters of OpenAI's API that this server does not implement: refused, never ignored.
# Each with the values that mean "off", which are accepted.
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0), "tools": (None, []),
}
# Other body fields that change nothing generated: accepted and ignored. Every other unknown field
# (min_p, ignore_eos, stop_token_ids, ...) is refused: it would change the output if honoured.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                     "tool_choice", "request_id", "stream_options"})
# Structured output (server/constraints.py reads them)
STRUCTURED = frozenset({"response_format", "structured_outputs"})


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None
                 ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


def _bad_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _depth_and_text(value: Any) -> None:
    """Nesting at most ``MAX_JSON_DEPTH``; strings without lone surrogates (not UTF-8)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            stack.extend((k, depth) for k in item)
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate (not valid Unicode)") from None


def load_json(raw: bytes) -> Any:
    """A request body as JSON, or a 400: strict UTF-8, no NaN / Infinity, no huge numbers, no
    deep nesting."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_bad_constant, parse_int=_int, parse_float=_float)
        _depth_and_text(value)
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not valid UTF-8: {err.reason} at byte "
                       f"{err.start}") from None
    except RecursionError:
        raise APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} "
                       "levels") from None
    except ValueError as err:  # JSONDecodeError included
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: dict[str, Any] | bool | None = None
    user: str | None = None
    timeout: float | None = Field(None, gt=0)  # seconds; the server's --request-timeout caps it


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def parse(kind: type[_Common], body: Any) -> _Common:
    """The checked body, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = kind.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"invalid {where}: {first['msg']}", param=where) from None
    extra = req.model_extra or {}
    for name, off in UNSUPPORTED.items():
        value = extra.get(name)
        if not any(value == o and type(value) is type(o) for o in off if o is not None) \
                and value is not None:
            raise APIError(400, f"{name} is not supported by this server", param=name)
    unknown = sorted(k for k in extra if k not in UNSUPPORTED and k not in IGNORED
                     and k not in STRUCTURED)
    if unknown:
        raise APIError(400, f"unknown or unsupported parameter(s): {', '.join(unknown)[:200]}",
                       param=unknown[0][:64])
    if req.n != 1:
        raise APIError(400, f"n must be 1 (got {req.n})", param="n")
    stops = stop_strings(req)
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings (got {len(stops)})",
                       param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop strings may have at most {MAX_STOP_CHARS} characters",
                       param="stop")
    return req


def stop_strings(req: _Common) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def message_text(message: Message) -> str:
    """A message's content as text (string content, or the text parts of a list)."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def speculation(req: _Common, *, drafter: str, options: dict[str, Any], policy: str | None,
                allowed: frozenset[str], limits: Limits | None = None
                ) -> tuple[str, dict[str, Any], str | None]:
    """(drafter, its options, policy) for a request: the server's unless the request's
    "speculative" field picks another allowed drafter or sets its own draft-shaping options
    (checked against the drafter's registration: type, bound, settable per request); ``false``
    turns speculation off (the ``none`` drafter)."""
    spec = req.speculative
    if spec is None or spec is True:
        return drafter, dict(options), policy
    if spec is False:
        return "none", {}, policy
    spec = dict(spec)
    name = spec.pop("drafter", drafter)
    if not isinstance(name, str) or name not in allowed:
        raise APIError(400, f"speculative.drafter {str(name)[:64]!r} is not allowed on this "
                       f"server; allowed: {', '.join(sorted(allowed))}", param="speculative.drafter")
    chosen_policy = spec.pop("policy", policy)
    try:
        if chosen_policy is not None:
            check_policy(chosen_policy)
    except SpecDecodeError as err:
        raise APIError(400, f"speculative.policy: {err}", param="speculative.policy") from None
    own = dict(options) if name == drafter else {}
    try:
        checked = check_options(name, spec, limits or Limits(), request=True, allowed=allowed,
                                owner=own)
    except SpecDecodeError as err:
        raise APIError(400, f"speculative: {err}", param="speculative") from None
    return name, {**own, **checked}, chosen_policy
