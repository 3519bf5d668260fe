"""The benchmark's prompts: a question's turns (and the answers given so far) as token ids.

Two formats, chosen by the tokenizer and named in every report (``environment.json``'s
``prompt_format``, a line of report.md and batch.md):

- ``chat template``: the tokenizer has one (instruct models such as SmolLM2-135M-Instruct): the
  conversation through it with the generation prompt appended (``specdecode.chat.chat_prompt``);
- ``plain``: it has none (base models such as Gemma 3 270M): the turns as plain text, the
  questions and the answers in order, joined by a blank line (``PLAIN_SEPARATOR``), with one more
  after the last question, so the model's continuation is the answer; encoded with the tokenizer's
  own special tokens (a BOS where it adds one). No role names, no instructions: what a base model
  sees is the question as written.
"""

from __future__ import annotations

from specdecode.chat import chat_prompt

PLAIN_SEPARATOR = "\n\n"
CHAT, PLAIN = "chat template", "plain"
DESCRIPTIONS = {
    CHAT: "chat template (the tokenizer's, with its generation prompt)",
    PLAIN: "plain (no chat template: the turns as plain text, questions and answers joined by a "
           "blank line, one more after the last question)",
}


def prompt_format(tokenizer) -> str:
    """``"chat template"`` where the tokenizer has one, else ``"plain"``."""
    return CHAT if getattr(tokenizer, "chat_template", None) else PLAIN


def describe(tokenizer) -> str:
    """The prompt format as the reports state it."""
    return DESCRIPTIONS[prompt_format(tokenizer)]


def plain_text(history: list[dict[str, str]]) -> str:
    """The plain format's text of a conversation (roles dropped, turns in order)."""
    return PLAIN_SEPARATOR.join(m["content"] for m in history) + PLAIN_SEPARATOR


def bench_prompt(tokenizer, history: list[dict[str, str]]) -> list[int]:
    """Token ids of ``history`` (user / assistant turns, ending with a user turn) in the
    tokenizer's format."""
    if prompt_format(tokenizer) == CHAT:
        return chat_prompt(tokenizer, history)
    return list(tokenizer(plain_text(history))["input_ids"])


def first_turn(tokenizer, text: str) -> list[int]:
    """A question's first turn alone (batch mode, the peers)."""
    return bench_prompt(tokenizer, [{"role": "user", "content": text}])
