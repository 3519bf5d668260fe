"""The on-disk form of the self-written drafter data (docs/training-data.md): ``shard-NNNNN.npz``
files of token ids, ``manifest.json`` (target, tokenizer hash, options, shards, counts, runs) and
``DATA_CARD.md``, all under one directory.

A shard holds, for its n examples (prompt ids followed by the target's answer ids, one flat array):
``tokens`` int32 [sum of lengths], ``offsets`` int64 [n + 1] (example i is
``tokens[offsets[i]:offsets[i + 1]]``), ``prompt_len`` int32 [n] (its answer starts at
``offsets[i] + prompt_len[i]``), ``key`` (the prompt's hash, str), ``source`` (prompt set, str),
``heldout``, ``sampled``, ``eos`` (bool) and ``seed`` int64 (-1 for greedy rows). Shards and the
manifest are written to a temporary name and renamed, so a killed run leaves every listed shard
whole; the manifest is the truth (a shard file it does not list is overwritten by the next run).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specdecode.bench.prompts import prompt_format
from specdecode.types import SpecDecodeError

FORMAT = "specdecode-selfdata/1"
MANIFEST = "manifest.json"
CARD = "DATA_CARD.md"
FLAGS = {"max_new_tokens": "--max-new-tokens", "greedy_share": "--greedy-share",
         "seed": "--seed", "heldout": "--heldout", "max_prompt_tokens": "--max-prompt-tokens",
         "dtype": "--dtype", "exact": "--exact/--no-exact", "temperature": "temperature",
         "sampling": "sampling"}


@dataclass
class Example:
    key: str
    source: str
    prompt: list[int]
    answer: list[int]
    heldout: bool
    sampled: bool
    seed: int  # -1: greedy
    eos: bool  # the answer ends with EOS (else it reached max_new_tokens)


def tokenizer_hash(tokenizer) -> str:
    """A hash of what token ids mean and how prompts are rendered: vocabulary, special tokens,
    chat template."""
    spec = {"vocab": sorted(tokenizer.get_vocab().items()),
            "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
            "template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def weights_hash(model) -> str:
    """A hash of the target's parameters as loaded (names, shapes and bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise SpecDecodeError(f"{str(out_dir)!r} holds no {MANIFEST}: not a data set written by "
                              "`specdecode build-drafter-data`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise SpecDecodeError(f"{path} is not a {FORMAT} manifest (format "
                              f"{manifest.get('format')!r})")
    return manifest


def read_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def iter_examples(out_dir: Path, split: str | None = None) -> Iterator[Example]:
    """Every example of a data set in shard order; ``split``: "train", "heldout" or None (all)."""
    if split not in (None, "train", "heldout"):
        raise SpecDecodeError(f"split must be 'train', 'heldout' or None, got {split!r}")
    for entry in load_manifest(out_dir)["shards"]:
        d = read_shard(Path(out_dir) / entry["file"])
        for i in range(len(d["key"])):
            if split is not None and bool(d["heldout"][i]) != (split == "heldout"):
                continue
            row = d["tokens"][d["offsets"][i]:d["offsets"][i + 1]].tolist()
            cut = int(d["prompt_len"][i])
            yield Example(str(d["key"][i]), str(d["source"][i]), row[:cut], row[cut:],
                          bool(d["heldout"][i]), bool(d["sampled"][i]), int(d["seed"][i]),
                          bool(d["eos"][i]))


class Store:
    """One output directory: its manifest, the shards it lists, the current run."""

    def __init__(self, out_dir: Path, manifest: dict) -> None:
        self.dir = Path(out_dir)
        self.manifest = manifest
        self.too_long: set[str] = set(manifest.get("too_long", []))
        self._run: int | None = None

    @classmethod
    def open(cls, out_dir: Path, model, tokenizer, target_name: str, options: dict, exact: bool,
             prompt_stats: dict | None = None, sources: dict | None = None) -> Store:
        """The store in ``out_dir``: new, or the existing one when it was written for the same
        target (weights), tokenizer and options (else a ``SpecDecodeError`` naming the
        difference)."""
        out_dir = Path(out_dir)
        param = next(model.parameters())
        options = {**options, "dtype": str(param.dtype).removeprefix("torch."),
                   "exact": bool(exact)}
        target = {"name": target_name, "weights": weights_hash(model),
                  "model_type": getattr(model.config, "model_type", None),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "vocab_size": getattr(model.config, "vocab_size", None)}
        tok = {"hash": tokenizer_hash(tokenizer), "size": len(tokenizer)}
        if (out_dir / MANIFEST).exists():
            manifest = load_manifest(out_dir)
            old_t, old_k = manifest["target"], manifest["tokenizer"]
            if old_k["hash"] != tok["hash"]:
                raise SpecDecodeError(
                    f"{str(out_dir)!r} holds data of another tokenizer ({old_t['name']}, tokenizer "
                    f"{old_k['hash']}; this target's is {tok['hash']}): use another --out")
            for key, value in options.items():
                if manifest["options"].get(key) != value:
                    raise SpecDecodeError(
                        f"{str(out_dir)!r} was built with {FLAGS.get(key, key)} "
                        f"{manifest['options'].get(key)!r}, this run has {value!r}: rerun with the "
                        "same options to add to it, or use another --out")
            if old_t["weights"] != target["weights"]:
                raise SpecDecodeError(
                    f"{str(out_dir)!r} holds data of another target ({old_t['name']}, weights "
                    f"{old_t['weights']}; this target, {target_name}, has {target['weights']}): "
                    "use another --out")
            manifest["target"]["name"] = target_name
        else:
            if out_dir.exists() and any(out_dir.glob("shard-*.npz")):
                raise SpecDecodeError(f"{str(out_dir)!r} holds shards but no {MANIFEST}: not a "
                                      "data set this command can add to; use another --out")
            out_dir.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT, "target": target, "tokenizer": tok, "options": options,
                        "shards": [], "too_long": [], "runs": []}
        # the benchmark's format for this tokenizer (the tokenizer hash covers its template)
        manifest["prompt_format"] = prompt_format(tokenizer)
        if prompt_stats is not None:
            manifest["prompts"] = prompt_stats
        if sources is not None:
            manifest["sources"] = sources
        store = cls(out_dir, manifest)
        for entry in manifest["shards"]:
            if not (out_dir / entry["file"]).exists():
                raise SpecDecodeError(f"{str(out_dir / entry['file'])!r} is listed in {MANIFEST} "
                                      "but missing")
        store.save()
        return store

    def done_keys(self) -> set[str]:
        keys: set[str] = set()
        for entry in self.manifest["shards"]:
            with np.load(self.dir / entry["file"], allow_pickle=False) as data:
                keys.update(str(k) for k in data["key"])
        return keys

    def totals(self) -> dict:
        shards = self.manifest["shards"]
        names = ("examples", "heldout", "sampled", "eos", "prompt_tokens", "answer_tokens",
                 "heldout_answer_tokens")
        out = {k: sum(s[k] for s in shards) for k in names}
        out["greedy"] = out["examples"] - out["sampled"]
        out["shards"] = len(shards)
        out["too_long"] = len(self.too_long)
        return out

    def write_shard(self, examples: list[Example], run: dict) -> dict:
        """Write ``examples`` as the next shard, then the manifest (with ``run``, the current
        run so far); returns the shard's manifest entry."""
        name = f"shard-{len(self.manifest['shards']):05d}.npz"
        lengths = [len(e.prompt) + len(e.answer) for e in examples]
        arrays = {
            "tokens": np.asarray([t for e in examples for t in (*e.prompt, *e.answer)],
                                 dtype=np.int32),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "prompt_len": np.asarray([len(e.prompt) for e in examples], dtype=np.int32),
            "key": np.asarray([e.key for e in examples], dtype=str),
            "source": np.asarray([e.source for e in examples], dtype=str),
            "heldout": np.asarray([e.heldout for e in examples], dtype=bool),
            "sampled": np.asarray([e.sampled for e in examples], dtype=bool),
            "seed": np.asarray([e.seed for e in examples], dtype=np.int64),
            "eos": np.asarray([e.eos for e in examples], dtype=bool),
        }
        _atomic_write(self.dir / name, lambda f: np.savez(f, **arrays))
        entry = {"file": name, "examples": len(examples),
                 "heldout": sum(e.heldout for e in examples),
                 "sampled": sum(e.sampled for e in examples),
                 "eos": sum(e.eos for e in examples),
                 "prompt_tokens": sum(len(e.prompt) for e in examples),
                 "answer_tokens": sum(len(e.answer) for e in examples),
                 "heldout_answer_tokens": sum(len(e.answer) for e in examples if e.heldout)}
        self.manifest["shards"].append(entry)
        self.record_run(run)
        return entry

    def record_run(self, run: dict | None) -> None:
        """Record (or update) the current run; save."""
        if run is not None:
            run = dict(run)
            if self._run is None:
                self._run = len(self.manifest["runs"])
                self.manifest["runs"].append(run)
            else:
                self.manifest["runs"][self._run] = run
        self.save()

    def save(self) -> None:
        from specdecode.train.selfdata_card import render_card

        self.manifest["too_long"] = sorted(self.too_long)
        self.manifest["totals"] = self.totals()
        text = json.dumps(self.manifest, indent=1)
        _atomic_write(self.dir / MANIFEST, lambda f: f.write(text.encode()))
        card = render_card(self.manifest)
        _atomic_write(self.dir / CARD, lambda f: f.write(card.encode()))
