"""`specdecode bench-serve`: streaming clients against the server, with and without speculation.

Each cell (concurrency c, one "speculative" setting) sends ``requests`` chat requests: Spec-Bench
first turns (categories interleaved), greedy, ``max_tokens`` each, at most c in flight. The
columns of one (round, concurrency) share their questions; no question repeats across rounds and
concurrency levels while the 480 last, so a drafter that learns across requests (suffix) never
replays an answer it has already seen. Cells are interleaved
round by round so drift of the machine hits every column alike; per cell we report the median over
rounds of the output throughput (completion tokens / wall time of the cell) and of the median time
per output token ((last token time - first token time) / (tokens - 1) per request) and time to
first token."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from specdecode.types import SpecDecodeError


def _auth() -> dict[str, str]:
    """The API key header when ``SPECDECODE_API_KEY`` is set (the server reads the same)."""
    key = os.environ.get("SPECDECODE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: str, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``specdecode serve`` in a child process on a free port; returns it once /health answers."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "specdecode.cli", "serve", "--port", str(port),
           *shlex.split(serve_args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SpecDecodeError(f"the server exited with code {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SpecDecodeError(f"the server did not answer /health within {timeout:.0f} s")


async def _one(client, url: str, model: str, question: str, max_tokens: int, spec: Any) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "speculative": spec}
    start = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise SpecDecodeError(f"server answered {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SpecDecodeError(f"server error: {chunk['error']['message']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    tokens = usage["completion_tokens"] if usage else 0
    return {"tokens": tokens, "ttft": (first or start) - start,
            "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else None,
            "mal": usage["speculative"]["mean_acceptance_length"] if usage else None}


async def _cell(url: str, model: str, questions: list[str], concurrency: int, max_tokens: int,
                spec: Any) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600.0, headers=_auth(), limits=httpx.Limits(
            max_connections=concurrency + 2)) as client:
        async def run(q: str) -> dict:
            async with gate:
                return await _one(client, url, model, q, max_tokens, spec)

        start = time.perf_counter()
        results = await asyncio.gather(*(run(q) for q in questions))
        wall = time.perf_counter() - start
    tpots = [r["tpot"] for r in results if r["tpot"] is not None]
    mals = [r["mal"] for r in results if r["mal"] is not None]
    return {"tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "throughput": sum(r["tokens"] for r in results) / wall,
            "tpot_ms": 1e3 * statistics.median(tpots) if tpots else None,
            "ttft_ms": 1e3 * statistics.median(r["ttft"] for r in results),
            "mean_acceptance_length": statistics.mean(mals) if mals else None}


def _label(spec: Any) -> str:
    return "no speculation" if spec is False else ("server default" if spec in ({}, None, True)
                                                   else json.dumps(spec))


def run_load_test(url: str | None, serve_args: str, levels: list[int], num_requests: int,
                  max_tokens: int, specs: list[Any], rounds: int, out: Path | None) -> str:
    import httpx
    from tqdm import tqdm

    from specdecode.questions import load_questions

    by_category: dict[str, list[str]] = {}
    for q in load_questions():
        by_category.setdefault(q.category, []).append(q.turns[0])
    mixed = [q for group in itertools.zip_longest(*by_category.values()) for q in group if q]
    # every (round, concurrency) gets its own questions, the same for each speculation column: a
    # drafter that learns across requests (suffix) learns from earlier requests, never the answer
    need = rounds * len(levels) * num_requests
    mixed = (mixed * (need // len(mixed) + 1))[:need]
    slices = iter(range(0, need, num_requests))
    proc = None
    if url is None:
        proc, url = start_server(serve_args)
    url = url.rstrip("/")
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10, headers=_auth()).json()["data"][0]["id"]
        cells: dict[tuple[int, int], list[dict]] = {}
        asyncio.run(_cell(url, model, ["Hello!", "Hi there."], 2, 8, False))  # warm-up
        bar = tqdm(total=rounds * len(levels) * len(specs), desc="bench-serve", unit="cell")
        for _ in range(rounds):
            for c in levels:
                start = next(slices)
                questions = mixed[start:start + num_requests]
                for i, spec in enumerate(specs):
                    cells.setdefault((c, i), []).append(
                        asyncio.run(_cell(url, model, questions, c, max_tokens, spec)))
                    bar.update()
        bar.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    rows = []
    for (c, i), runs in sorted(cells.items()):
        rows.append({"concurrency": c, "speculative": specs[i], "label": _label(specs[i]),
                     **{k: _median(runs, k) for k in ("throughput", "tpot_ms", "ttft_ms",
                                                      "mean_acceptance_length")},
                     "runs": runs})
    report = _markdown(rows, url, serve_args, num_requests, max_tokens, rounds)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve.md").write_text(report)
        (out / "serve.json").write_text(json.dumps({"rows": rows, "settings": {
            "url": url, "serve_args": serve_args, "requests": num_requests,
            "max_tokens": max_tokens, "rounds": rounds, "cpus": os.cpu_count()}}, indent=2))
    return report


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r[key] is not None]
    return statistics.median(vals) if vals else None


def _markdown(rows: list[dict], url: str, serve_args: str, n: int, max_tokens: int,
              rounds: int) -> str:
    def fmt(v: float | None, d: int = 1) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    base = {r["concurrency"]: r for r in rows if r["speculative"] is False}
    lines = [f"{n} streaming chat requests per cell (Spec-Bench first turns, new ones for every "
             f"round and concurrency, the same for every column; greedy, max_tokens "
             f"{max_tokens}), medians of {rounds} interleaved rounds; server: "
             f"`specdecode serve {serve_args}`".rstrip(),
             "", "| clients | speculation | output tok/s | vs none | TPOT ms (median) | "
             "TTFT ms (median) | mean acceptance length |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["concurrency"])
        ratio = f"{r['throughput'] / b['throughput']:.2f}x" if b and b["throughput"] else "-"
        lines.append(f"| {r['concurrency']} | {r['label']} | {fmt(r['throughput'])} | {ratio} | "
                     f"{fmt(r['tpot_ms'], 2)} | {fmt(r['ttft_ms'])} | "
                     f"{fmt(r['mean_acceptance_length'], 2)} |")
    return "\n".join(lines) + "\n"
