"""Build the demo tokenizer (byte-level BPE) and the tokenized train/validation arrays."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

from specdecode.train.corpus import (
    CHAT_TEMPLATE,
    END_OF_TEXT,
    END_OF_TURN,
    SPECIAL_TOKENS,
    all_documents,
    is_validation,
)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE and save it as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_OF_TURN,
        pad_token=END_OF_TEXT,
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(out_dir)
    return fast


def prepare(out_dir: Path, vocab_size: int = 8192, tokenizer_chars: int = 40_000_000,
            seed: int = 0) -> dict:
    """Write ``tokenizer/``, ``train.npy``, ``val.npy`` and ``corpus.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = list(tqdm(all_documents(), desc="reading corpus", unit="doc"))
    rng = random.Random(seed)
    rng.shuffle(docs)
    sample, total = [], 0
    for _, text in docs:
        if total >= tokenizer_chars:
            break
        sample.append(text)
        total += len(text)
    tok = train_tokenizer(sample, vocab_size, out_dir / "tokenizer")
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    batch = 512
    for start in tqdm(range(0, len(docs), batch), desc="tokenizing", unit="batch"):
        chunk = docs[start:start + batch]
        encoded = tok([text for _, text in chunk], add_special_tokens=False)["input_ids"]
        for (doc_id, _), ids in zip(chunk, encoded):
            split = "val" if is_validation(doc_id) else "train"
            splits[split].append(np.asarray(ids + [eot], dtype=np.uint16))
            counts[split] += 1
    info = {"vocab_size": len(tok), "documents": counts, "seed": seed,
            "sources": {"sharegpt": sum(1 for d, _ in docs if not d.startswith("stdlib/")),
                        "stdlib": sum(1 for d, _ in docs if d.startswith("stdlib/"))}}
    for split, arrays in splits.items():
        arr = np.concatenate(arrays)
        np.save(out_dir / f"{split}.npy", arr)
        info[f"{split}_tokens"] = int(arr.size)
    info["characters"] = sum(len(t) for _, t in docs)
    (out_dir / "corpus.json").write_text(json.dumps(info, indent=2))
    return info
