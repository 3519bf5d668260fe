"""One request as the HTTP side sees it: submitted to the engine thread, its events turned into
text deltas (stop strings honoured), its statistics and latencies recorded when it ends, and the
request aborted (its cache row freed) if whoever reads it goes away early."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from specdecode.server.metrics import ServerMetrics, SpecCounts
from specdecode.server.protocol import APIError
from specdecode.server.text import TextStream
from specdecode.server.worker import EngineWorker, Failure
from specdecode.types import SpecDecodeError

FINISH_REASONS = {"eos": "stop", "length": "length"}  # engine's -> OpenAI's


class Generation:
    def __init__(self, worker: EngineWorker, metrics: ServerMetrics, tokenizer, prompt: list[int],
                 options: dict[str, Any], stop: list[str], spec: SpecCounts,
                 timeout: float | None = None, on_done: Callable[[], None] | None = None) -> None:
        self.worker, self.metrics = worker, metrics
        self.prompt, self.options = prompt, options
        self.text = TextStream(tokenizer, stop)
        self.spec = spec
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_id: int | None = None
        self.finish_reason: str | None = None
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self.recorded = False
        self.timeout = timeout  # seconds from arrival until the request is aborted (408)
        self.on_done = on_done  # called once when the request leaves the engine (or never entered)

    async def start(self) -> None:
        """Hand the request to the engine; a refused request raises a 400 ``APIError``."""
        loop = asyncio.get_running_loop()

        def sink(event) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, event)

        future = self.worker.submit(self.prompt, self.options, sink)
        try:
            self.request_id = await asyncio.wrap_future(future)
        except SpecDecodeError as err:
            self._done()
            raise APIError(400, str(err)) from None
        except (ValueError, TypeError) as err:  # a drafter refusing an option value
            self._done()
            raise APIError(400, f"invalid option for drafter {self.spec.drafter!r}: "
                           f"{type(err).__name__}: {err}") from None
        except BaseException:  # cancelled while queued: the engine may still add it
            future.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                                     or self.worker.abort(f.result()))
            self._done()
            raise

    def close(self) -> None:
        """The response is over however it ended: a request still running is aborted (a stream
        whose client left before its first byte never started reading ``deltas``)."""
        if self.finish_reason is None and self.request_id is not None:
            self.finish_reason = "abort"
            self.worker.abort(self.request_id)
        if self.request_id is not None:
            self._record()
        self._done()

    def _done(self) -> None:
        if self.on_done is not None:
            self.on_done, done = None, self.on_done
            done()

    @property
    def usage(self) -> dict:
        n = self.text.num_tokens
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n,
                "total_tokens": len(self.prompt) + n, "speculative": self.spec.as_dict()}

    async def deltas(self) -> AsyncIterator[str]:
        """Text chunks as they become safe to send; ``finish_reason`` is set at the end. Leaving
        early (cancellation, a client that went away) aborts the request in the engine."""
        try:
            while self.finish_reason is None:
                left = None if self.timeout is None else \
                    self.arrived + self.timeout - time.perf_counter()
                try:
                    async with asyncio.timeout(left):
                        event = await self.queue.get()
                except TimeoutError:
                    self.worker.abort(self.request_id)
                    self.finish_reason = "timeout"
                    raise APIError(408, f"the request timed out after {self.timeout:g} s and was "
                                   "aborted", kind="timeout_error") from None
                if isinstance(event, Failure):
                    self.finish_reason = "error"
                    raise APIError(500, f"the engine failed while running this request "
                                   f"({event.kind}); it was aborted", kind="server_error")
                if event.tokens:
                    self.spec.add(event.stats)
                    if self.first_token is None:
                        self.first_token = time.perf_counter()
                if self.text.add(event.tokens):
                    self.finish_reason = "stop"
                    self.worker.abort(self.request_id)
                elif event.finished:
                    self.finish_reason = FINISH_REASONS.get(event.finish_reason or "", "stop")
                chunk = self.text.pending(final=self.finish_reason is not None)
                if chunk:
                    yield chunk
        finally:
            if self.finish_reason is None:
                self.finish_reason = "abort"
                self.worker.abort(self.request_id)
            self._record()

    async def complete(self, disconnected) -> str:
        """The whole text (non-streaming); ``disconnected()`` is polled while waiting so a client
        that hangs up aborts its request."""
        parts: list[str] = []

        async def collect() -> None:
            async for chunk in self.deltas():
                parts.append(chunk)

        task = asyncio.ensure_future(collect())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await disconnected():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                raise APIError(499, "client disconnected")
        task.result()
        return "".join(parts)

    def _record(self) -> None:
        self._done()
        if self.recorded:
            return
        self.recorded = True
        now = time.perf_counter()
        ttft = None if self.first_token is None else self.first_token - self.arrived
        self.metrics.finished(self.spec, self.finish_reason or "abort", len(self.prompt),
                              self.text.num_tokens, ttft, now - self.arrived)
