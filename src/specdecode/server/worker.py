"""The engine thread: one ``Scheduler`` stepping all requests, fed by the HTTP handlers.

Only this thread touches the model. Handlers send commands (add a request, abort one) through a
thread-safe queue; each request's events come back through its ``sink`` (a callable the handler
gives, which hands them to its event loop). Between commands the thread runs ``Scheduler.step()``
while any request is unfinished and sleeps on the queue otherwise."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from specdecode.scheduler import RequestEvent, Scheduler
from specdecode.server.metrics import ServerMetrics

log = logging.getLogger("specdecode.server")


@dataclass
class Failure:
    """Sent to a request's sink when the engine failed under it (HTTP 500). ``message`` is for the
    log: it may name other requests of the batch; a client gets only ``kind`` (the error's type)."""

    message: str
    kind: str = "error"


Sink = Callable[[RequestEvent | Failure], None]


class EngineWorker:
    """Owns the scheduler. ``submit`` queues a request and returns a future of its id (or of the
    ``SpecDecodeError`` that refused it); ``abort`` ends one early; ``close`` stops the thread."""

    def __init__(self, make_scheduler: Callable[[], Scheduler], metrics: ServerMetrics) -> None:
        self.make_scheduler = make_scheduler
        self.scheduler = make_scheduler()
        self.metrics = metrics
        self.commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.sinks: dict[int, Sink] = {}
        self.thread = threading.Thread(target=self._run, name="specdecode-engine", daemon=True)
        self._stop = False
        self.idle = True  # waiting for commands with nothing to run
        self.beat = time.monotonic()  # when the engine last finished a step or a command

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing a step (0 when idle)."""
        return 0.0 if self.idle else max(0.0, time.monotonic() - self.beat)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stop = True
        self.commands.put(("stop", None))
        self.thread.join(timeout=30)

    def submit(self, prompt: list[int], options: dict[str, Any], sink: Sink) -> Future:
        future: Future = Future()
        self.commands.put(("add", (prompt, options, sink, future)))
        return future

    def abort(self, request_id: int) -> None:
        self.commands.put(("abort", request_id))

    def _command(self, kind: str, arg: Any) -> None:
        if kind == "add":
            prompt, options, sink, future = arg
            if not future.set_running_or_notify_cancel():
                return
            try:
                rid = self.scheduler.add_request(prompt, **options)
            except Exception as err:  # noqa: BLE001 - refused: the handler turns it into a 4xx
                future.set_exception(err)
                return
            self.sinks[rid] = sink
            future.set_result(rid)
        elif kind == "abort":
            if self.sinks.pop(arg, None) is not None and self.scheduler.abort(arg):
                self.scheduler.release(arg)

    def _drain(self, block: bool) -> None:
        try:
            kind, arg = self.commands.get(block=block)
        except queue.Empty:
            return
        self.beat, self.idle = time.monotonic(), False
        while True:
            if kind != "stop":
                self._command(kind, arg)
            try:
                kind, arg = self.commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while not self._stop:
            busy = self.scheduler.has_unfinished()
            self.beat, self.idle = time.monotonic(), not busy and self.commands.empty()
            self._drain(block=not busy)
            self.beat, self.idle = time.monotonic(), False
            if self._stop or not self.scheduler.has_unfinished():
                continue
            try:
                events = self.scheduler.step()
            except Exception as err:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(err).__name__}: {err}",
                               type(err).__name__)
                continue
            for event in events:
                sink = self.sinks.get(event.request_id)
                if event.finished:
                    self.sinks.pop(event.request_id, None)
                    self.scheduler.release(event.request_id)
                if sink is not None:
                    _deliver(sink, event)
            self.metrics.queue(self.scheduler.num_running, self.scheduler.num_waiting)

    def _fail_all(self, message: str, kind: str = "error") -> None:
        sinks, self.sinks = self.sinks, {}
        self.scheduler = self.make_scheduler()  # the old batch's state cannot be trusted
        for sink in sinks.values():
            _deliver(sink, Failure(message, kind))
        self.metrics.queue(0, 0)


def _deliver(sink: Sink, item: RequestEvent | Failure) -> None:
    """A sink whose event loop has gone (server shutting down) must not stop the engine."""
    try:
        sink(item)
    except RuntimeError as err:
        log.warning("dropped an event for a closed handler: %s", err)
