"""The OpenAI-compatible HTTP app (Starlette): completions and chat completions, streamed as
server-sent events or not, per-request speculation, ``/v1/models``, ``/health``, ``/metrics``.

A thin adapter: requests become ``Scheduler.add_request`` calls on the engine thread
(``worker.py``); every drafter, policy and sampling option is the library's own."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from specdecode.api import DEFAULT_POLICY
from specdecode.chat import chat_prompt
from specdecode.drafters.options import Limits
from specdecode.drafters.registry import DEFAULT_DRAFTER, REGISTRY, Needs, available, self_contained
from specdecode.engine import DEFAULT_MAX_DRAFT_NODES
from specdecode.models import context_length, load_causal_lm
from specdecode.scheduler import Scheduler
from specdecode.server.constraints import GrammarCompiler
from specdecode.server.generation import Generation
from specdecode.server.guard import ApiKeyGuard
from specdecode.server.metrics import ServerMetrics, SpecCounts
from specdecode.server.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    load_json,
    message_text,
    parse,
    speculation,
    stop_strings,
)
from specdecode.server.worker import EngineWorker
from specdecode.types import SpecDecodeError

log = logging.getLogger("specdecode.server")

@dataclass
class ServerConfig:
    """What the server was started with (``specdecode serve``'s options)."""

    model_name: str = "specdecode-demo"
    drafter: str = DEFAULT_DRAFTER
    drafter_options: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    max_batch_size: int = 8
    allowed_drafters: tuple[str, ...] | None = None  # None: self_contained() + the server's own
    max_draft_nodes: int | None = None
    api_key: str | None = None  # every route but /health needs "Authorization: Bearer KEY"
    metrics_public: bool = False  # /metrics without the key
    max_body_bytes: int = 2 * 1024 * 1024  # larger bodies get 413
    max_queue: int = 64  # requests waiting beyond the batch; more get 429
    request_timeout: float | None = 600.0  # seconds from arrival; then aborted (408)
    stall_seconds: float = 120.0  # /health is 503 when the engine has work and no step ends
    max_model_len: int | None = None  # prompt + max_tokens (default: the model's, else 4096)
    exact: bool | None = None  # the batch-invariant forward (None: on in half precision)


DEFAULT_MODEL_LEN = 4096  # when neither the model nor --max-model-len gives a context length


class ServerState:
    def __init__(self, model, tokenizer, draft_model, config: ServerConfig) -> None:
        self.model = load_causal_lm(model, what="target model")
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self.config = config
        model_len = context_length(self.model.config)
        self.context = min(x for x in (model_len, config.max_model_len) if x is not None) \
            if (model_len or config.max_model_len) else DEFAULT_MODEL_LEN
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.limits = Limits(nodes=config.max_draft_nodes or DEFAULT_MAX_DRAFT_NODES,
                             vocab=int(vocab), layers=getattr(self.model.config,
                                                              "num_hidden_layers", None))
        self.vocab = int(vocab)
        self.in_flight = 0  # requests admitted and not finished (running or queued)
        self.tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="specdecode-tokenize")
        # Drafters a request may pick unless the owner says otherwise: every registered drafter
        # that needs nothing the owner must give (``Needs``; read now, so plugins count), and
        # those needing a draft model when one is loaded. eagle / medusa use the heads shipped
        # for the demo target (another target's request for them fails unless --drafter eagle
        # -o head=DIR).
        allowed = set(config.allowed_drafters or self_contained()) | {config.drafter}
        if draft_model is not None and config.allowed_drafters is None:
            allowed |= {n for n, s in REGISTRY.items() if s.needs == Needs.DRAFT_MODEL}
        unknown = sorted(allowed - set(available()))
        if unknown:
            raise SpecDecodeError(f"unknown drafter(s) {', '.join(unknown)}; available: "
                                  f"{', '.join(available())}")
        self.allowed = frozenset(allowed)
        self.metrics = ServerMetrics(config.model_name)
        self.compiler = GrammarCompiler()  # this app's grammar-compile threads
        defaults: dict[str, Any] = {"draft_model": draft_model}
        if config.max_draft_nodes is not None:
            defaults["max_draft_nodes"] = config.max_draft_nodes
        self.worker = EngineWorker(
            lambda: Scheduler(self.model, max_batch_size=config.max_batch_size,
                              exact=config.exact, **defaults),
            self.metrics)
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(400, f"the model {name!r} does not exist; this server serves "
                           f"{self.config.model_name!r}", param="model", kind="not_found_error")

    def check_room(self) -> None:
        """429 when the queue is full (checked before tokenizing and again when admitting)."""
        if self.in_flight >= self.config.max_batch_size + self.config.max_queue:
            raise APIError(429, f"the server is busy ({self.in_flight} requests running or "
                           f"queued, at most {self.config.max_batch_size} + "
                           f"{self.config.max_queue}); retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"})

    def admit(self, gen: Generation) -> None:
        self.check_room()
        self.in_flight += 1

        def done() -> None:
            self.in_flight -= 1

        gen.on_done = done

    async def run_off_loop(self, fn: Callable, *args):
        """Tokenizing and chat templates run on one helper thread, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)

    def generation(self, req, prompt: list[int], constraint: dict[str, Any]) -> Generation:
        if len(prompt) >= self.context:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens, "
                           f"but the prompt has {len(prompt)} tokens", param="messages"
                           if isinstance(req, ChatRequest) else "prompt")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        room = self.context - len(prompt)
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens; "
                           f"the prompt has {len(prompt)} and max_tokens asks for {max_tokens} "
                           f"more", param="max_tokens")
        c = self.config
        drafter, options, policy = speculation(req, drafter=c.drafter, options=c.drafter_options,
                                               policy=c.policy, allowed=self.allowed,
                                               limits=self.limits)
        spec = SpecCounts(drafter, policy or DEFAULT_POLICY)
        options = dict(options, drafter=drafter, policy=policy, max_new_tokens=max_tokens,
                       temperature=req.temperature, top_p=req.top_p,
                       top_k=max(0, req.top_k), seed=req.seed, **constraint)
        timeouts = [t for t in (req.timeout, c.request_timeout) if t is not None]
        return Generation(self.worker, self.metrics, self.tokenizer, prompt, options,
                          stop_strings(req), spec, timeout=min(timeouts) if timeouts else None)


async def _body(request: Request) -> Any:
    """The body as JSON; 413 past ``max_body_bytes``. A body a little over the limit is read to
    its end first (so the client, still sending, gets the answer rather than a reset); a larger
    one is left unread."""
    limit = request.app.state.server.config.max_body_bytes
    declared = request.headers.get("content-length", "")
    drain = 4 * limit if not declared.isdigit() or int(declared) <= 4 * limit else 0
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > drain:
            break
    if size > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes")
    return load_json(b"".join(chunks))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(gen: Generation, chunk, final, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body: one ``chunk(text)`` per delta, ``final(reason)``, optional usage, [DONE]."""
    try:
        async for text in gen.deltas():
            yield _sse(chunk(text))
        yield _sse(final(gen.finish_reason))
        if include_usage:
            yield _sse({**final(None), "choices": [], "usage": gen.usage})
    except APIError as err:
        yield _sse(err.body())
    yield "data: [DONE]\n\n"


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = parse(CompletionRequest, await _body(request))
    state.check_model(req.model)
    state.check_room()
    constraint = await state.compiler.request_constraint(req, state.tokenizer)  # off the loop
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (got a list of "
                           f"{len(prompt)})", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt = (await state.run_off_loop(
            lambda text: state.tokenizer(text, add_special_tokens=True), prompt))["input_ids"]
    elif not prompt or not all(0 <= t < state.vocab for t in prompt):
        raise APIError(400, "prompt token ids must be a non-empty list of ids in [0, "
                       f"{state.vocab})", param="prompt")
    return await _respond(request, req, state.generation(req, list(prompt), constraint),
                          chat=False)


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = parse(ChatRequest, await _body(request))
    state.check_model(req.model)
    state.check_room()
    if not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
    constraint = await state.compiler.request_constraint(req, state.tokenizer)  # off the loop
    history = [{"role": m.role, "content": message_text(m)} for m in req.messages]
    try:
        prompt = await state.run_off_loop(chat_prompt, state.tokenizer, history)
    except Exception as err:  # noqa: BLE001 - a template that refuses these messages
        raise APIError(400, f"the chat template refused these messages: {err}",
                       param="messages") from None
    return await _respond(request, req, state.generation(req, prompt, constraint), chat=True)


async def _respond(request: Request, req, gen: Generation, chat: bool) -> Response:
    """Run ``gen`` and answer in OpenAI's shape: one JSON object, or (``stream``) SSE chunks."""
    request.app.state.server.admit(gen)
    await gen.start()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created, model = int(time.time()), request.app.state.server.config.model_name
    kind = ("chat.completion.chunk" if req.stream else "chat.completion") if chat \
        else "text_completion"

    def body(choice: dict, **extra) -> dict:
        return {"id": rid, "object": kind, "created": created, "model": model,
                "choices": [{"index": 0, "logprobs": None, **choice}], **extra}

    def piece(text: str, reason: str | None) -> dict:  # one streamed choice
        if chat:
            return {"delta": {"content": text} if text else {}, "finish_reason": reason}
        return {"text": text, "finish_reason": reason}

    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            if chat:
                yield _sse(body({"delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None}))
            async for event in _stream(gen, lambda t: body(piece(t, None)),
                                       lambda r: body(piece("", r)), include):
                yield event

        return _Stream(gen, events())
    try:
        text = await gen.complete(request.is_disconnected)
    finally:
        gen.close()
    whole = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    return JSONResponse(body({**whole, "finish_reason": gen.finish_reason}, usage=gen.usage))


class _Stream(StreamingResponse):
    """An SSE response that aborts its request however the response ends, even when the client
    left before the first byte (then the body generator never ran)."""

    def __init__(self, gen: Generation, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse({"object": "list", "data": [{
        "id": state.config.model_name, "object": "model", "created": state.created,
        "owned_by": "specdecode", "max_model_len": state.context}]})


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if not state.worker.thread.is_alive():
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    stalled = state.worker.stalled_for()
    if stalled > state.config.stall_seconds:
        return JSONResponse({"status": "engine stalled", "seconds_without_a_step":
                             round(stalled, 1)}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.server.metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


def _error_response(request: Request, err: APIError) -> JSONResponse:
    request.app.state.server.metrics.error(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, APIError)
    return _error_response(request, err)


async def _http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, HTTPException)
    what = "route" if err.status_code == 404 else "method"
    message = f"no {what} {request.method} {request.url.path}" if err.status_code in (404, 405) \
        else str(err.detail)
    return _error_response(request, APIError(err.status_code, message, kind="not_found_error"
                                             if err.status_code == 404 else "invalid_request_error"))


async def _server_error(request: Request, err: Exception) -> Response:
    log.exception("request failed")  # the details stay in the log
    return _error_response(request, APIError(500, f"internal error ({type(err).__name__})",
                                             kind="server_error"))


def create_app(model, tokenizer, *, draft_model=None, config: ServerConfig | None = None
               ) -> Starlette:
    """The app over a loaded target (and optional draft model); the engine thread starts with
    the app (lifespan) and stops with it."""
    state = ServerState(model, tokenizer, draft_model, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette):
        state.worker.start()
        yield
        state.worker.close()
        state.tokenize_pool.shutdown(wait=False)
        await asyncio.get_running_loop().run_in_executor(None, state.compiler.wait, 30.0)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    guard = []
    if state.config.api_key:  # every route but /health (and /metrics if public) needs the key
        public = {"/health"} | ({"/metrics"} if state.config.metrics_public else set())
        guard = [Middleware(ApiKeyGuard, key=state.config.api_key, public=frozenset(public),
                            metrics=state.metrics)]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=guard, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.server = state
    return app
