"""`specdecode serve` (the OpenAI-compatible server) and `specdecode bench-serve` (its load test)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from specdecode.cli.shared import (
    check_drafter,
    check_policy_name,
    int_list,
    load_models,
    model_id,
    model_options,
    parse_options,
    quiet_transformers,
)
from specdecode.drafters.registry import DEFAULT_DRAFTER
from specdecode.types import SpecDecodeError


@click.command()
@model_options()
@click.option("--drafter", default=DEFAULT_DRAFTER, show_default=True, callback=check_drafter,
              help="Drafter of requests that do not pick one (`specdecode drafters` lists them; "
                   "'none' serves without speculation).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Option of --drafter (repeatable), e.g. -o num_draft_tokens=4.")
@click.option("--policy", default=None, callback=check_policy_name,
              help="Draft-length policy of requests that do not pick one, a registered policy "
                   "(default: the library's default, adaptive).")
@click.option("--allow-drafters", default=None, metavar="A,B,...",
              help="Drafters a request may pick in its \"speculative\" field (default: every one "
                   "that needs no server-side resource, plus --drafter, plus draft-model when a "
                   "draft model is loaded).")
@click.option("--max-batch-size", type=int, default=8, show_default=True,
              help="Requests decoded together; more wait in a queue.")
@click.option("--max-draft-nodes", type=int, default=None,
              help="Cap on draft tokens per request per step (default: the library's, 64).")
@click.option("--api-key", envvar="SPECDECODE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (and /metrics "
                   "with --metrics-public); default: $SPECDECODE_API_KEY, else no key.")
@click.option("--metrics-public", is_flag=True, help="Serve /metrics without the API key.")
@click.option("--max-body-bytes", type=click.IntRange(1), default=2 * 1024 * 1024,
              show_default=True, help="Larger request bodies get 413.")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests that may wait beyond the running batch; more get 429.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds from arrival after which a request is aborted "
                                      "(408); a request's \"timeout\" field may ask for less.")
@click.option("--stall-seconds", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, help="/health answers 503 when the engine has work but has not "
                                      "finished a step for this long.")
@click.option("--max-model-len", type=click.IntRange(2), default=None,
              help="Tokens of prompt + max_tokens (default: the model's context, else 4096).")
@click.option("--served-model-name", default=None,
              help="The model id clients send (default: specdecode-demo, or the target "
                   "directory's name).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model directory.")
def serve(target, draft_model, dtype, device, exact, compile_forward, drafter, options, policy,
          allow_drafters, max_batch_size,
          max_draft_nodes, api_key, metrics_public, max_body_bytes, max_queue, request_timeout,
          stall_seconds, max_model_len, served_model_name, host, port, threads,
          trust_remote_code) -> None:
    """Serve the target over an OpenAI-compatible HTTP API with speculative decoding.

    POST /v1/completions and /v1/chat/completions (streaming with "stream": true), GET /v1/models,
    /health and /metrics (Prometheus). A request may choose its own speculation with an extra
    body field, e.g. "speculative": {"drafter": "suffix", "num_draft_tokens": 4, "policy":
    "adaptive"}, or turn it off with "speculative": false; its response's usage then reports
    drafts, draft tokens, accepted tokens and the mean acceptance length. Every output is exactly
    what the target alone would produce. Options a request may set and their bounds:
    `specdecode drafters`.
    """
    import torch
    import uvicorn

    import specdecode as sd
    from specdecode.server.app import ServerConfig, create_app

    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    if max_batch_size < 1:
        raise click.UsageError("--max-batch-size must be >= 1")
    allowed = None
    if allow_drafters is not None:
        allowed = tuple(d.strip() for d in allow_drafters.split(",") if d.strip())
    name = served_model_name or model_id(target, "specdecode-demo")
    try:
        model, draft, tokenizer = load_models(target, draft_model, True, trust_remote_code, dtype,
                                              device, compile_forward)
        config = ServerConfig(model_name=name, drafter=drafter,
                              drafter_options=parse_options(options, drafter), policy=policy,
                              max_batch_size=max_batch_size, allowed_drafters=allowed,
                              max_draft_nodes=max_draft_nodes, api_key=api_key or None,
                              metrics_public=metrics_public, max_body_bytes=max_body_bytes,
                              max_queue=max_queue, request_timeout=request_timeout,
                              stall_seconds=stall_seconds, max_model_len=max_model_len,
                              exact=exact)
        sd.prepare(model, [1, 2, 3], drafter=drafter, draft_model=draft, policy=policy, exact=exact,
                   **({"max_draft_nodes": max_draft_nodes} if max_draft_nodes else {}),
                   **config.drafter_options)  # the server's own options, checked
        if compile_forward:  # compiled before the first request, not during it
            from specdecode.models import warm_up

            seconds = warm_up(model, draft, exact=exact)
            click.echo(f"compiled the forward in {seconds:.1f} s", err=True)
        app = create_app(model, tokenizer, draft_model=draft, config=config)
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    param = next(model.parameters())
    click.echo(f"serving {name!r} (drafter {drafter}, batch {max_batch_size}, {param.dtype} on "
               f"{param.device}, {torch.get_num_threads()} torch threads) on "
               f"http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@click.command("bench-serve")
@click.option("--url", default=None,
              help="A running server's base URL, e.g. http://127.0.0.1:8000 (default: start "
                   "`specdecode serve` with --serve-args on a free port and stop it after).")
@click.option("--serve-args", default="", show_default=True,
              help="Extra arguments for the server this command starts.")
@click.option("--concurrency", default="1,4,16", show_default=True,
              help="Streaming clients at once, comma-separated.")
@click.option("--requests", "num_requests", type=int, default=32, show_default=True,
              help="Requests per (concurrency, speculation) cell.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--speculative", "specs", multiple=True, default=('false', '{}'), show_default=True,
              help="A request's \"speculative\" field as JSON (repeatable); each is one column "
                   "(false: no speculation; {}: the server's default drafter).")
@click.option("--rounds", type=int, default=2, show_default=True,
              help="Each cell runs this many times, interleaved; medians reported.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write serve.md and serve.json here.")
def bench_serve(url, serve_args, concurrency, num_requests, max_tokens, specs, rounds, out) -> None:
    """Load test of the server: throughput and time per output token at each concurrency, with
    and without speculation, streaming chat requests over Spec-Bench's first-turn questions."""
    from specdecode.server.load import run_load_test

    levels = int_list(concurrency, "--concurrency", 1, "concurrency")
    try:
        parsed = [json.loads(s) for s in specs]
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not JSON: {err}", param_hint="--speculative") from None
    if num_requests < 1 or max_tokens < 1 or rounds < 1:
        raise click.UsageError("--requests, --max-tokens and --rounds must be >= 1")
    try:
        report = run_load_test(url, serve_args, levels, num_requests, max_tokens, parsed, rounds,
                               out)
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    click.echo(report)
