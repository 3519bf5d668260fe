"""OpenAI request bodies, checked: every refusal is an ``APIError`` whose message names the problem
(the app turns it into OpenAI's error JSON)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specdecode.policies import available_policies

# Options a request may set in its "speculative" field: they shape the draft only. Options that
# name files or size shared stores (datastore, cache_file, corpus, pool_size...) are the server's.
REQUEST_OPTIONS = frozenset({
    "num_draft_tokens", "max_nodes", "tree", "tree_width", "topk", "min_n", "max_n", "window",
    "max_ngrams", "alpha", "offset", "min_prob", "max_depth", "min_match", "hot", "sources",
    "spine_nodes", "num_layers", "sampling",
})
TEXT_OPTIONS = frozenset({"tree", "sources", "sampling"})  # the rest are numbers or bools
# Parameters of OpenAI's API that this server does not implement: refused, never ignored.
# Each with the values that mean "off", which are accepted.
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0), "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: dict[str, Any] | bool | None = None
    user: str | None = None


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
    for name, off in UNSUPPORTED.items():
        value = (req.model_extra or {}).get(name)
        if not any(value == o and type(value) is type(o) for o in off if o is not None) \
                and value is not None:
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if req.n != 1:
        raise APIError(400, f"n must be 1 (got {req.n})", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
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
                allowed: frozenset[str]) -> tuple[str, dict[str, Any], str | None]:
    """(drafter, its options, policy) for a request: the server's unless the request's
    "speculative" field picks another allowed drafter or sets its own draft-shaping options;
    ``false`` turns speculation off (the ``none`` drafter)."""
    spec = req.speculative
    if spec is None or spec is True:
        return drafter, dict(options), policy
    if spec is False:
        return "none", {}, policy
    spec = dict(spec)
    name = spec.pop("drafter", drafter)
    if not isinstance(name, str) or name not in allowed:
        raise APIError(400, f"speculative.drafter {name!r} is not allowed on this server; "
                       f"allowed: {', '.join(sorted(allowed))}", param="speculative.drafter")
    chosen_policy = spec.pop("policy", policy)
    if chosen_policy is not None and chosen_policy not in available_policies():
        raise APIError(400, f"speculative.policy must be one of {', '.join(available_policies())}, "
                       f"got {chosen_policy!r}", param="speculative.policy")
    for key, value in spec.items():
        if key not in REQUEST_OPTIONS:
            raise APIError(400, f"speculative.{key} cannot be set per request (options a request "
                           f"may set: {', '.join(sorted(REQUEST_OPTIONS))})",
                           param=f"speculative.{key}")
        kind = str if key in TEXT_OPTIONS else (int, float)
        if not isinstance(value, kind):
            raise APIError(400, f"speculative.{key} must be a "
                           f"{'string' if kind is str else 'number'}, got {value!r}",
                           param=f"speculative.{key}")
    merged = dict(options) if name == drafter else {}
    merged.update(spec)
    return name, merged, chosen_policy
