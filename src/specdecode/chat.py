"""Prompts of a conversation: the one place that turns chat messages into token ids (the CLI's
``--chat``, the server's chat completions, the benchmark, the trainers). No benchmark import."""

from __future__ import annotations

# ShareGPT speakers (a turn's "from", lower-cased) -> chat roles: the REST datastore builder and
# the demo corpus read conversations through this one map
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "assistant": "assistant", "system": "system"}


def chat_prompt(tokenizer, history: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation with the generation prompt appended (the chat template when the
    tokenizer has one, else plain "role: content" lines)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "
    return tokenizer(text)["input_ids"]
