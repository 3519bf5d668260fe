"""Prometheus metrics of the server, named like vLLM's under a ``specdecode:`` prefix.

Speculation counters (vLLM's ``spec_decode_*``): drafts (verification steps that carried a draft),
draft tokens, accepted draft tokens, and accepted tokens per draft position. They are counted when
a request ends, from the same numbers its response's ``usage.speculative`` reports, so the
counters always add up to the responses."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from specdecode.types import RunStats, StepStats

PREFIX = "specdecode:"
disable_created_metrics()  # no *_created series next to every counter (as vLLM)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class SpecCounts:
    """One request's speculation statistics (what ``usage.speculative`` reports)."""

    drafter: str
    policy: str
    run: RunStats = field(default_factory=RunStats)
    num_drafts: int = 0

    def add(self, step: StepStats) -> None:
        self.run.add(step)
        self.num_drafts += int(step.drafted > 0)

    @property
    def accepted_per_pos(self) -> list[int]:
        return self.run.accepted_per_pos

    def as_dict(self) -> dict:
        drafts, run = self.num_drafts, self.run
        return {"drafter": self.drafter, "policy": self.policy, "steps": run.steps,
                "num_drafts": drafts, "num_draft_tokens": run.drafted,
                "num_accepted_tokens": run.accepted,
                # vLLM's definition: 1 + accepted draft tokens per draft (1.0 when nothing drafted)
                "mean_acceptance_length": round(1 + run.accepted / drafts, 4) if drafts else 1.0,
                "acceptance_rate": round(run.acceptance_rate, 4),
                "accepted_per_pos": list(run.accepted_per_pos)}


class ServerMetrics:
    """Every metric on its own registry (several servers may live in one process, as in tests)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        label = ["model_name"]
        self.model_name = model_name

        def counter(name: str, doc: str, labels: list[str] = label) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        self.num_drafts = counter("spec_decode_num_drafts", "Verification steps that carried a draft.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.num_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position.",
                                        label + ["position"])
        self.success = counter("request_success", "Requests finished, by finish reason.",
                               label + ["finished_reason"])
        self.errors = counter("request_errors", "Requests refused or failed, by HTTP status.",
                              label + ["status"])
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.running = Gauge(PREFIX + "num_requests_running", "Requests in the batch.", label,
                             registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests queued.", label, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", label,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Time per output token after the first.", label,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency.", label,
                             buckets=_LATENCY_BUCKETS, registry=r)

    def finished(self, spec: SpecCounts, reason: str, prompt_tokens: int, completion_tokens: int,
                 ttft: float | None, e2e: float) -> None:
        m = self.model_name
        self.num_drafts.labels(m).inc(spec.num_drafts)
        self.num_draft_tokens.labels(m).inc(spec.run.drafted)
        self.num_accepted.labels(m).inc(spec.run.accepted)
        for pos, count in enumerate(spec.accepted_per_pos):
            self.accepted_per_pos.labels(m, str(pos)).inc(count)
        self.success.labels(m, reason).inc()
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)
        self.e2e.labels(m).observe(e2e)
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
            if completion_tokens > 1:
                self.tpot.labels(m).observe((e2e - ttft) / (completion_tokens - 1))

    def error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
