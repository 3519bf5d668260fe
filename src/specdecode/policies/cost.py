"""The target's verification cost curve c(n): wall time of one forward over the pending token plus n
draft nodes, on top of a cache of ``context`` tokens, as a chain and as a tree. Draft budgets are
chosen from this curve: drafting n nodes pays only when the expected extra tokens outweigh
c(n) / c(0) - 1.

``CostModel`` is what the ``adaptive`` policy uses: the curve measured once per (model
architecture, dtype, device, thread count), kept in memory and on disk (``SPECDECODE_CACHE_DIR``,
default ``~/.cache/specdecode``), then rescaled online from the verification timings the engine
records (the context grows, the machine gets busier)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import statistics
import time
from pathlib import Path

import torch

from specdecode.models import BatchTarget, lean
from specdecode.models.cpu import cpu_path
from specdecode.models.exact import default_exact
from specdecode.types import Draft, SpecDecodeError


def wide_tree(n: int) -> Draft:
    """A tree of n nodes with branching 2 near the root and chains below (a typical draft tree)."""
    parents: list[int] = []
    for i in range(n):
        parents.append(-1 if i < 2 else (i - 2))
    return Draft(torch.zeros(n, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


@torch.inference_mode()
def verify_cost_curve(model, node_counts: list[int], context: int = 256, repeats: int = 15,
                      seed: int = 0, exact: bool | None = None) -> list[dict]:
    """Median milliseconds per verification forward for each n in ``node_counts`` (chain and tree),
    interleaved so that drift hits every n alike; ``exact`` as ``BatchTarget``'s. Every forward
    runs after the same ``context`` tokens (each step is rewound), fewer where the model's context
    is shorter."""
    target = BatchTarget(model, exact=exact)
    if target.max_length:
        context = max(2, min(context, target.max_length - max(node_counts) - 1))
    rng = random.Random(seed)
    prompt = [rng.randrange(target.vocab_size) for _ in range(context)]
    row = target.add_row(context + max(node_counts) + 2)
    target.prefill(row, prompt[:-1], last_only=True)
    base_length = target.lengths[row]
    drafts = {}
    for n in node_counts:
        tokens = torch.tensor([rng.randrange(target.vocab_size) for _ in range(n)])
        chain = Draft.chain(tokens)
        tree = wide_tree(n)
        tree.tokens = tokens
        drafts[n] = {"chain": chain, "tree": tree}
    times: dict[tuple[int, str], list[float]] = {(n, s): [] for n in node_counts
                                                 for s in ("chain", "tree")}
    for rep in range(repeats + 2):  # two warm-up rounds
        for n in node_counts:
            for shape, draft in drafts[n].items():
                start = time.perf_counter()
                target.step([prompt[-1]], [draft])
                elapsed = time.perf_counter() - start
                target.keep(row, [])
                target.lengths[row] = base_length  # rewound: the next forward sees the same
                if rep >= 2:
                    times[(n, shape)].append(elapsed)
    base = statistics.median(times[(0, "chain")]) if 0 in node_counts else None
    rows = []
    for n in node_counts:
        row = {"nodes": n}
        for shape in ("chain", "tree"):
            ms = statistics.median(times[(n, shape)]) * 1e3
            row[f"{shape}_ms"] = round(ms, 3)
            if base:
                row[f"{shape}_ratio"] = round(ms / (base * 1e3), 3)
        rows.append(row)
    return rows


log = logging.getLogger("specdecode")
CURVE_COUNTS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CURVE_VERSION = 8  # bumped when the verification forward changes (3: exact in half precision;
# 4-5: one exact-attention call per row and window, the lean forward; 6: 128-token windows;
# 7: packed float32 linears on the AVX2 path, AMX capped; 8: a fixed context, each step rewound)
HOST_KEY = "cost-curves"  # a host's measured curves in memory: curve_key -> curve


def cache_dir() -> Path:
    root = os.environ.get("SPECDECODE_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specdecode"


def curve_key(model, exact: bool | None = None) -> str:
    """What a cost curve depends on: architecture (the config without names), dtype, device,
    threads, torch version, the exact forward or not, the lean forward or not, the CPU path
    (``models/cpu.py``: forcing the AVX2 path changes the kernels). Weights do not matter."""
    config = model.config.to_dict()
    for name in ("_name_or_path", "name_or_path", "transformers_version"):
        config.pop(name, None)
    param = next(model.parameters())
    exact = default_exact(param.dtype) if exact is None else bool(exact)
    text = json.dumps([CURVE_VERSION, type(model).__name__, config, str(param.dtype), str(param.device),
                       torch.get_num_threads(), torch.__version__, exact, lean.supported(model),
                       cpu_path()],
                      sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def measured_curve(model, *, use_disk: bool = True, repeats: int = 7,
                   exact: bool | None = None, memory: dict[str, dict] | None = None) -> dict:
    """``{"chain": {n: seconds}, "tree": {n: seconds}}`` for ``CURVE_COUNTS`` (up to the model's
    context), from ``memory`` (a host's), from disk, or measured now (about 1 s for the demo
    target)."""
    measured: dict[str, dict] = {} if memory is None else memory
    key = curve_key(model, exact)
    if key in measured:
        return measured[key]
    path = cache_dir() / "cost" / f"{key}.json"
    curve = None
    if use_disk and path.exists():
        try:
            raw = json.loads(path.read_text())
            curve = {shape: {int(n): float(t) for n, t in raw[shape].items()}
                     for shape in ("chain", "tree")}
        except (OSError, ValueError, KeyError, TypeError):
            curve = None
    if curve is None:
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        context = max(1, min(128, limit // 4))
        counts = [n for n in CURVE_COUNTS if context + n + 1 <= limit]
        start = time.perf_counter()
        rows = verify_cost_curve(model, counts, context=context, repeats=repeats, exact=exact)
        curve = {shape: {r["nodes"]: r[f"{shape}_ms"] / 1e3 for r in rows}
                 for shape in ("chain", "tree")}
        log.info("measured the verification cost curve in %.1f s", time.perf_counter() - start)
        if use_disk:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(curve))
            except OSError as err:
                log.warning("cannot cache the cost curve in %s: %s", path, err)
    measured[key] = curve
    return curve


def interpolate(points: dict[int, float], n: float) -> float:
    """Piecewise-linear through ``points``, extended linearly past the last one."""
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if n <= hi:
            return points[lo] + (points[hi] - points[lo]) * (n - lo) / (hi - lo)
    if len(xs) == 1:
        return points[xs[0]]
    lo, hi = xs[-2], xs[-1]
    return points[hi] + (points[hi] - points[lo]) * (n - hi) / (hi - lo)


class CostModel:
    """c(n) in seconds for a chain or tree of n draft nodes: the measured curve (as measured: on CPUs
    it need not grow with n, verifying 4 tokens can be cheaper than 2) times a correction that
    follows the observed verification timings: per node count once that count has been seen, a
    global one otherwise (exponential moving averages of observed / predicted, each ratio clipped to
    [0.25, 4] so a hiccup cannot swing it)."""

    def __init__(self, chain: dict[int, float], tree: dict[int, float] | None = None,
                 ema: float = 0.1) -> None:
        if not chain or 0 not in chain:
            raise SpecDecodeError("a cost curve needs c(0), the cost of a plain step")
        self.curves = {False: dict(chain), True: dict(tree or chain)}
        self.ema, self.scale = ema, 1.0
        self.local: dict[tuple[int, bool], float] = {}

    def __call__(self, n: float, tree: bool = False) -> float:
        shape = tree and n > 1
        return interpolate(self.curves[shape], n) * self.local.get((int(n), shape), self.scale)

    def observe(self, n: int, seconds: float, tree: bool = False) -> None:
        shape = tree and n > 1
        predicted = interpolate(self.curves[shape], n)
        if predicted > 0 and seconds > 0:
            ratio = min(4.0, max(0.25, seconds / predicted))
            self.scale += self.ema * (ratio - self.scale)
            key = (n, shape)
            self.local[key] = self.local.get(key, self.scale) + 2 * self.ema * (
                ratio - self.local.get(key, self.scale))
