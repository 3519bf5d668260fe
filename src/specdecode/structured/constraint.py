"""Compiling constraints: ``parse_spec`` reads a constraint in vLLM's ``structured_outputs``
shape, ``compile_constraint`` turns it into a ``Constraint`` (one compiled grammar, JSON schema,
regex or Lark / GBNF grammar, over one tokenizer), shared by every request that asks for it: the
compiled grammars are kept in a bounded LRU keyed by the source text.

llguidance is an optional dependency: ``pip install "specdecode[structured]"``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from specdecode.structured.bounds import choice_regex, parser_limits
from specdecode.structured.state import ConstraintState
from specdecode.types import SpecDecodeError

INSTALL = "pip install 'llguidance>=1.7,<2'  (or: pip install 'specdecode[structured]')"
CACHE_SIZE = 64  # compiled grammars kept
KINDS = ("json", "regex", "grammar")
# JSON layout unless the schema's "x-guidance" says otherwise: one space after ',' and ':' and no
# other whitespace (flexible whitespace lets a small model loop on newlines; fixed separators are
# forced tokens, which jump-forward emits for free)
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llg():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError:
        raise SpecDecodeError(f"structured output needs the llguidance package: {INSTALL}") from None
    return llguidance


_LOCK = threading.Lock()
_TOKENIZERS: dict[int, tuple[Any, Any]] = {}  # id(hf tokenizer) -> (tokenizer, LLTokenizer)
# (id(tokenizer), kind, source) -> (tokenizer, compiled): the entry holds its tokenizer, so the id
# cannot be reused by another tokenizer while the entry lives (a pure memo: compiled grammars are
# immutable, so sharing them between schedulers in one process is safe)
_CACHE: OrderedDict[tuple, tuple[Any, Constraint]] = OrderedDict()


def _ll_tokenizer(tokenizer) -> Any:
    llg = _llg()
    with _LOCK:
        hit = _TOKENIZERS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    try:
        llt = llg.hf.from_tokenizer(tokenizer)
    except Exception as err:  # noqa: BLE001 - slow tokenizers, odd vocabularies
        raise SpecDecodeError(f"structured output cannot use this tokenizer ({err})") from None
    with _LOCK:
        if len(_TOKENIZERS) >= 8:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[id(tokenizer)] = (tokenizer, llt)
    return llt


def parse_spec(spec: Any) -> tuple[str, str]:
    """``(kind, source)`` of a constraint given as vLLM's ``structured_outputs`` shape:
    ``{"json": schema}`` (a dict or its JSON text), ``{"json_object": True}`` (any JSON object),
    ``{"regex": "..."}``, ``{"grammar": "..."}`` (Lark, or GBNF when it uses ``::=``) or
    ``{"choice": ["a", "b", ...]}`` (exactly one of the strings; compiled as a regex)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpecDecodeError("a constraint is one of {'json': schema}, {'json_object': true}, "
                              "{'regex': pattern}, {'grammar': lark_or_gbnf}, "
                              "{'choice': [strings]}")
    (key, value), = spec.items()
    if key == "json_object":
        if value is not True:
            raise SpecDecodeError("constraint json_object must be true")
        return "json", json.dumps({"type": "object"})
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise SpecDecodeError(f"invalid JSON schema: not JSON ({err})") from None
        if not isinstance(value, (dict, bool)):
            raise SpecDecodeError("invalid JSON schema: it must be a JSON object")
        return "json", json.dumps(value)  # key order matters: properties come in schema order
    if key in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise SpecDecodeError(f"constraint {key} must be a non-empty string")
        return key, value
    if key == "choice":
        return "regex", choice_regex(value)
    raise SpecDecodeError(f"unknown constraint {key!r}; use json, json_object, regex, grammar or "
                          "choice")


class Constraint:
    """A compiled grammar over one tokenizer; ``start()`` gives a request its own state."""

    def __init__(self, kind: str, source: str, grammar: str, ll_tokenizer: Any) -> None:
        self.kind, self.source, self.grammar = kind, source, grammar
        self.ll_tokenizer = ll_tokenizer
        self.vocab_size = int(ll_tokenizer.vocab_size)
        self.eos_token_id = int(ll_tokenizer.eos_token)
        llg = _llg()  # the start state, its lexer built now (the first mask can take seconds)
        self.proto = llg.LLMatcher(ll_tokenizer, grammar, log_level=0, limits=parser_limits(llg))
        self.proto.compute_bitmask()

    def __repr__(self) -> str:
        return f"Constraint({self.kind}: {self.source[:60]!r})"

    def start(self, eos_token_ids: frozenset[int] = frozenset(), *,
              jump_forward: bool = True) -> ConstraintState:
        return ConstraintState(self, eos_token_ids, jump_forward)


def compile_constraint(spec: Any, tokenizer) -> Constraint:
    """A ``Constraint`` from ``spec`` (see ``parse_spec``; a ``Constraint`` is returned as is),
    compiled once per (tokenizer, kind, source) and kept in a bounded LRU. A bad schema, regex or
    grammar raises ``SpecDecodeError`` naming the problem."""
    if isinstance(spec, Constraint):
        return spec
    if tokenizer is None:
        raise SpecDecodeError("a constraint needs the model's tokenizer (pass tokenizer=...)")
    kind, source = parse_spec(spec)
    key = (id(tokenizer), kind, source)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is tokenizer:
            _CACHE.move_to_end(key)
            return hit[1]
    llg = _llg()
    llt = _ll_tokenizer(tokenizer)
    what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}[kind]
    try:
        if kind == "json":
            grammar = llg.LLMatcher.grammar_from_json_schema(source, defaults=JSON_DEFAULTS)
        elif kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(source)
        else:
            lark = llg.gbnf_to_lark(source) if "::=" in source else source
            grammar = llg.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
            grammar, llt, limits=parser_limits(llg))
    except Exception as err:  # noqa: BLE001 - the compilers raise ValueError / RuntimeError
        raise SpecDecodeError(f"invalid {what}: {err}") from None
    if is_error:
        first = (messages[0] if messages else "rejected").strip().splitlines()
        raise SpecDecodeError(f"invalid {what}: {' '.join(line.strip() for line in first[:3])}")
    compiled = Constraint(kind, source, grammar, llt)
    if compiled.proto.is_error():
        raise SpecDecodeError(f"invalid {what}: {compiled.proto.get_error()}")
    with _LOCK:
        _CACHE[key] = (tokenizer, compiled)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return compiled


def cache_info() -> int:
    """How many compiled grammars the LRU holds."""
    return len(_CACHE)
