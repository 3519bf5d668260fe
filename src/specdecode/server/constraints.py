"""Structured output in a request body: OpenAI's ``response_format`` (``{"type": "json_object"}``,
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``, ``{"type": "text"}``)
and vLLM's ``structured_outputs`` (``{"json": schema} | {"regex": ...} | {"grammar": ...} |
{"choice": [...]} | {"json_object": true}``; ``structural_tag`` is refused), compiled once per
schema (``structured.compile_constraint``' LRU); a bad one is a 400 naming the problem.

Compiling runs off the event loop, on its own thread, bounded in time (``GrammarCompiler``, one
per app): past ``COMPILE_TIMEOUT_S`` the request gets a 400 and the same source is refused at once
afterwards (llguidance cannot be interrupted: the thread finishes on its own). Every constrained
request's lookup runs on such a thread (a cached grammar returns at once); at most
``MAX_COMPILING`` run at a time, a timed-out one holding its place until it ends; beyond that the
request gets a 429."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

from specdecode.server.protocol import APIError
from specdecode.types import SpecDecodeError

STRUCTURED_KEYS = ("json", "regex", "grammar", "choice", "json_object")
COMPILE_TIMEOUT_S = 10.0  # a grammar's compile time before its request gets a 400
MAX_COMPILING = 8  # compile threads at once (a timed-out one holds its place until it ends)
TOO_SLOW_KEPT = 256  # sources remembered as timed out


def request_spec(response_format: Any, structured_outputs: Any) -> dict[str, Any] | None:
    """The constraint the body asks for (``structured.parse_spec``'s shape), or None."""
    spec = None
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise APIError(400, "response_format must be an object", param="response_format")
        kind = response_format.get("type")
        if kind == "json_object":
            spec = {"json_object": True}
        elif kind == "json_schema":
            inner = response_format.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.json_schema.schema must be a JSON schema "
                               "object", param="response_format")
            spec = {"json": schema}
        elif kind != "text":
            raise APIError(400, "response_format.type must be text, json_object or json_schema",
                           param="response_format")
    if structured_outputs is not None:
        if spec is not None:
            raise APIError(400, "give response_format or structured_outputs, not both",
                           param="structured_outputs")
        if isinstance(structured_outputs, dict) and "structural_tag" in structured_outputs:
            raise APIError(400, "structured_outputs.structural_tag is not supported by this "
                           "server; use json, regex, grammar, choice or json_object",
                           param="structured_outputs")
        given = [k for k in STRUCTURED_KEYS if isinstance(structured_outputs, dict)
                 and structured_outputs.get(k) not in (None, False)]
        if len(given) != 1 or len(structured_outputs) != 1:
            raise APIError(400, "structured_outputs takes exactly one of "
                           f"{', '.join(STRUCTURED_KEYS)}", param="structured_outputs")
        spec = dict(structured_outputs)
    return spec


class _SlowBefore(Exception):
    """This source timed out before."""


class GrammarCompiler:
    """One app's grammar compilation: its compile threads (at most ``max_compiling`` at once),
    the sources that timed out, and the count of threads alive (``wait``)."""

    def __init__(self, timeout_s: float = COMPILE_TIMEOUT_S,
                 max_compiling: int = MAX_COMPILING) -> None:
        self.timeout_s = timeout_s
        self.max_compiling = max_compiling
        self._slots = threading.BoundedSemaphore(max_compiling)
        self._too_slow: OrderedDict[str, None] = OrderedDict()  # sources that timed out
        self._ended = threading.Condition()  # notified when a compile thread ends
        self._running = 0  # compile threads alive

    def wait(self, timeout: float) -> bool:
        """Wait until no grammar is compiling (at most ``timeout`` s); True if none is. The server
        waits at shutdown: a compile thread still inside llguidance when Python exits can crash
        it."""
        with self._ended:
            return self._ended.wait_for(lambda: self._running == 0, timeout)

    async def request_constraint(self, req, tokenizer) -> dict[str, Any]:
        """``{"constraint": compiled}`` for the engine's options, or ``{}``; 400 on a bad one or
        one that takes longer than ``timeout_s`` to compile. The event loop never compiles."""
        extra = req.model_extra or {}
        spec = request_spec(extra.get("response_format"), extra.get("structured_outputs"))
        if spec is None:
            return {}
        where = "structured_outputs" if "structured_outputs" in extra else "response_format"
        timeout = self.timeout_s
        box: dict[str, str] = {}
        try:
            return {"constraint": await self._compile_bounded(spec, tokenizer, timeout, box)}
        except SpecDecodeError as err:
            raise APIError(400, f"{where}: {err}", param=where) from None
        except _SlowBefore:
            raise APIError(400, f"{where}: this grammar took longer than {timeout:g} s to compile "
                           "before; simplify it", param=where) from None
        except TimeoutError:
            if "key" in box:
                self._too_slow[box["key"]] = None
                while len(self._too_slow) > TOO_SLOW_KEPT:
                    self._too_slow.popitem(last=False)
            raise APIError(400, f"{where}: the grammar did not compile within {timeout:g} s; "
                           "simplify it", param=where) from None

    def _compile(self, spec: dict[str, Any], tokenizer, box: dict[str, str]):
        """On the compile thread: the source's key (into ``box``), refused if it timed out
        before, else ``compile_constraint``."""
        from specdecode.structured import compile_constraint

        box["key"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest() + \
            f"|{id(tokenizer)}"
        if box["key"] in self._too_slow:
            raise _SlowBefore()
        return compile_constraint(spec, tokenizer)

    async def _compile_bounded(self, spec: dict[str, Any], tokenizer, timeout: float,
                               box: dict[str, str]):
        """``_compile`` on a thread of its own; ``TimeoutError`` past ``timeout``."""
        if not self._slots.acquire(blocking=False):
            raise APIError(429, f"{self.max_compiling} grammars are compiling; retry later",
                           kind="rate_limit_error", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved when timed out

        def settle(result: Any, error: BaseException | None) -> None:
            if done.done():  # the request went away
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def work() -> None:
            result, error = None, None
            try:
                result = self._compile(spec, tokenizer, box)
            except BaseException as err:  # noqa: BLE001 - handed to the request
                error = err
            finally:
                self._slots.release()
                with self._ended:
                    self._running -= 1
                    self._ended.notify_all()
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop has closed
                pass

        with self._ended:
            self._running += 1
        threading.Thread(target=work, name="specdecode-grammar", daemon=True).start()
        return await asyncio.wait_for(asyncio.shield(done), timeout)
