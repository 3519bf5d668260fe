"""The EAGLE-3 trainer's data (``train/eagle3.py``): a ``build-drafter-data`` directory read as
windows of token ids, its draft vocabulary, batches drawn by (seed, step), and an optional on-disk
cache of the target's features.

- Checks (``check_data``): the directory exists, is a self-written data set with training
  examples, and was written by this very target (the manifest's weights hash) with this tokenizer
  (its tokenizer hash); else a ``SpecDecodeError`` saying what differs.
- Several directories (``--data DIR,DIR``, ``data_dirs``): each checked, their examples read in
  order as one set (e.g. an older build and a faster one of the same target).
- Pinning (``pin_data``): the first run writes ``OUT/data.json`` (the shards it read of each
  directory, the draft vocabulary); a resumed run reads exactly those shards, so a data set still
  growing (a ``build-drafter-data`` run in the background) never changes a run half-way.
- Windows (``Window``): prompt and answer cut to ``seq_len`` tokens, the prompt's tail kept; the
  loss covers answer tokens only (``start``: the index of the first answer token).
- Batches (``batch_rows``): example i of step s is the (s * batch + i)-th entry of a permutation
  of the training set seeded by (seed, epoch), so every epoch sees every example once and a resumed
  run continues with the very batches an uninterrupted one would draw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from specdecode.train.selfdata_store import load_manifest, read_shard, tokenizer_hash, weights_hash
from specdecode.types import SpecDecodeError

PIN_FILE = "data.json"


@dataclass(frozen=True)
class Window:
    ids: np.ndarray  # int64 [length]: the prompt's tail, then the answer
    start: int  # index of the first answer token
    sampled: bool  # the answer was sampled (else greedy: its tokens are the target's argmax)


def check_data(data_dir: Path, target, tokenizer) -> dict:
    """The manifest of ``data_dir``, checked against ``target`` and ``tokenizer``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SpecDecodeError(f"no data directory {str(data_dir)!r}: build one with `specdecode "
                              "build-drafter-data --target ... --out DIR`")
    manifest = load_manifest(data_dir)
    totals = manifest.get("totals", {})
    if not manifest.get("shards") or totals.get("examples", 0) - totals.get("heldout", 0) < 1:
        raise SpecDecodeError(f"{str(data_dir)!r} holds no training examples yet (build-drafter-data "
                              "writes a shard every --shard-size prompts)")
    name = manifest["target"].get("name")
    mine = tokenizer_hash(tokenizer)
    if manifest["tokenizer"]["hash"] != mine:
        raise SpecDecodeError(f"{str(data_dir)!r} holds data of another tokenizer ({name}: "
                              f"tokenizer {manifest['tokenizer']['hash']}; this target's is {mine})")
    weights = weights_hash(target)
    if manifest["target"]["weights"] != weights:
        dtype = manifest.get("options", {}).get("dtype")
        raise SpecDecodeError(f"{str(data_dir)!r} holds data of another target ({name}, weights "
                              f"{manifest['target']['weights']} in {dtype}; this target has "
                              f"{weights}): train with --target {name}")
    return manifest


def data_dirs(spec: str) -> list[Path]:
    """The directories of ``--data DIR[,DIR...]``, in order, each once."""
    dirs = [Path(p.strip()) for p in str(spec).split(",") if p.strip()]
    if not dirs:
        raise SpecDecodeError("--data names no directory: give DIR or DIR,DIR,... (directories "
                              "written by `specdecode build-drafter-data`)")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise SpecDecodeError(f"--data {spec!r} names a directory twice")
    return dirs


def pin_data(dirs: list[Path], out_dir: Path, manifests: list[dict]) -> list[list[str]]:
    """Each directory's shard files this run trains on: those ``OUT/data.json`` lists (a resumed
    run), else every shard each manifest lists now (recorded for the next run)."""
    listed = [[s["file"] for s in m["shards"]] for m in manifests]
    pin = Path(out_dir) / PIN_FILE
    if not pin.exists():
        return listed
    pinned = json.loads(pin.read_text())
    shards = pinned["shards"]
    if shards and isinstance(shards[0], str):  # written by a single-directory run
        shards = [shards]
    names = pinned.get("dirs", [pinned.get("data")])
    if [str(Path(n).resolve()) for n in names] != [str(d.resolve()) for d in dirs]:
        raise SpecDecodeError(f"{pin} was written for --data {','.join(map(str, names))}: not the "
                              "data this run names; use another --out")
    for data_dir, have, want in zip(dirs, listed, shards):
        if have[:len(want)] != want:
            raise SpecDecodeError(f"{pin} lists shards that {str(data_dir)!r} no longer holds: "
                                  "not the data this run started on; use another --out")
    return shards


def cut_window(prompt: list[int], answer: list[int], seq_len: int, sampled: bool) -> Window:
    """At most ``seq_len`` tokens: the prompt's tail (at least its last token) and the answer."""
    keep = max(1, min(len(prompt), seq_len - len(answer)))
    ids = (prompt[len(prompt) - keep:] + answer)[:seq_len]
    return Window(np.asarray(ids, dtype=np.int64), keep, sampled)


def read_windows(sets: list[tuple[Path, list[str]]], seq_len: int
                 ) -> tuple[list[Window], list[Window], np.ndarray]:
    """(training windows, held-out windows, every training answer token) of ``sets``: (directory,
    its shard files) pairs, read in order."""
    train, held, answers = [], [], []
    for root, names in sets:
        for name in names:
            d = read_shard(Path(root) / name)
            for i in range(len(d["key"])):
                row = d["tokens"][d["offsets"][i]:d["offsets"][i + 1]].tolist()
                cut = int(d["prompt_len"][i])
                if len(row) - cut < 1:
                    continue
                window = cut_window(row[:cut], row[cut:], seq_len, bool(d["sampled"][i]))
                if d["heldout"][i]:
                    held.append(window)
                else:
                    train.append(window)
                    answers.append(np.asarray(row[cut:], dtype=np.int64))
    return train, held, np.concatenate(answers) if answers else np.zeros(0, np.int64)


def draft_vocabulary(answers: np.ndarray, vocab_size: int, size: int) -> list[int]:
    """The ``size`` most frequent token ids of the training answers (ties by id), sorted."""
    counts = np.bincount(answers, minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))
    return sorted(int(i) for i in order[:size] if counts[i] > 0)


def coverage(tokens: np.ndarray, vocab: list[int]) -> float:
    """Share of ``tokens`` inside ``vocab``."""
    return float(np.isin(tokens, np.asarray(vocab)).mean()) if tokens.size else 0.0


@lru_cache(maxsize=4)
def _order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(seed: int, step: int, batch: int, n: int) -> list[int]:
    """Indices of step ``step``'s examples: epoch-wise permutations seeded by (seed, epoch)."""
    return [int(_order(seed, i // n, n)[i % n]) for i in range(step * batch, (step + 1) * batch)]


@dataclass
class Batch:
    ids: torch.Tensor  # int64 [B, T], right-padded with 0
    lengths: torch.Tensor  # int64 [B]
    starts: torch.Tensor  # int64 [B]: first answer index
    sampled: torch.Tensor  # bool [B]
    rows: list[int]  # the examples' indices

    @property
    def attention(self) -> torch.Tensor:
        return torch.arange(self.ids.shape[1])[None] < self.lengths[:, None]

    def loss_mask(self) -> torch.Tensor:
        """bool [B, T - 1]: pair t (feature t, token t + 1) predicts token t + 2, an answer token."""
        target = torch.arange(2, self.ids.shape[1] + 1)[None]
        return (target >= self.starts[:, None]) & (target < self.lengths[:, None])


def collate(windows: list[Window], rows: list[int]) -> Batch:
    chosen = [windows[r] for r in rows]
    width = max(len(w.ids) for w in chosen)
    ids = torch.zeros(len(chosen), width, dtype=torch.int64)
    for i, w in enumerate(chosen):
        ids[i, :len(w.ids)] = torch.from_numpy(w.ids)
    return Batch(ids, torch.tensor([len(w.ids) for w in chosen]),
                 torch.tensor([w.start for w in chosen]),
                 torch.tensor([w.sampled for w in chosen]), list(rows))


class FeatureCache:
    """The target's features of the training windows on disk (``--cache-features``): per example
    ``ex-NNNNNNN.npy``, bfloat16 bits as uint16 [length, (k + 1) * H] (the k fused layers' outputs,
    then the final-normed states the soft labels are read from), written when first computed and
    read afterwards. Bound to one data pin and layer list (``cache.json``)."""

    def __init__(self, root: Path, key: dict) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "cache.json"
        if meta.exists() and json.loads(meta.read_text()) != key:
            raise SpecDecodeError(f"{str(self.root)!r} caches features of another data set, window "
                                  "or layer list; give another --cache-features directory")
        meta.write_text(json.dumps(key))

    def _path(self, row: int) -> Path:
        return self.root / f"ex-{row:07d}.npy"

    def get(self, rows: list[int]) -> list[torch.Tensor] | None:
        """Every row's [length, (k + 1) * H] bfloat16 features, or None if any is missing."""
        paths = [self._path(r) for r in rows]
        if not all(p.exists() for p in paths):
            return None
        return [torch.from_numpy(np.load(p).view(np.int16)).view(torch.bfloat16) for p in paths]

    def put(self, rows: list[int], lengths: list[int], states: torch.Tensor) -> None:
        for row, length, x in zip(rows, lengths, states):
            bits = x[:length].to(torch.bfloat16).contiguous().view(torch.int16).numpy()
            tmp = self._path(row).with_suffix(".tmp.npy")
            np.save(tmp, bits.view(np.uint16))
            tmp.replace(self._path(row))
