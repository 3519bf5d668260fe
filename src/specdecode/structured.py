"""Structured output (docs/structured.md): a grammar is a change of the target's distribution.

At every verified node the target's logits are masked (-inf) with the grammar state of THAT node's
path, before any acceptance rule sees them; the rules (``verify/``) are exact for whatever
distribution the target gives at each node, so speculation stays lossless under the constraint.

- ``Constraint``: one compiled grammar (JSON schema, regex or Lark / GBNF grammar) over one
  tokenizer, shared by every request that asks for it (``compile_constraint`` caches them in a
  bounded LRU keyed by the source text).
- ``ConstraintState``: one request's matcher (an llguidance ``LLMatcher``). Each step the engine
  calls ``shape(draft)`` (walk the tree depth-first with consume / rollback: one mask per node;
  drop the point-mass nodes the grammar forbids; append the tokens the grammar forces, a single
  legal token each, as point-mass chains after every leaf), ``mask_logits(logits)`` before the
  rule, ``own_verdict`` to hand the drafter a verdict in its own node indices, and ``advance`` with
  the emitted tokens: the committed state moves only along accepted tokens.

Sampled drafts (``draft_probs``) are never pruned: dropping a drawn token changes the
distribution. A forbidden sampled node has target probability 0, so every rule rejects it; the
rows under it are left unmasked (any distribution after an impossible prefix gives the same
output distribution).

llguidance is an optional dependency: ``pip install "specdecode[structured]"``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from specdecode.structured_bounds import choice_regex, parser_limits
from specdecode.types import Draft, SpecDecodeError, Verdict

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


class ConstraintState:
    """One request's grammar state (see the module docstring). The matcher holds the committed
    output; probes (``shape``, drafters' ``push``) go deeper and always roll back to it."""

    def __init__(self, constraint: Constraint, eos_token_ids: frozenset[int],
                 jump_forward: bool) -> None:
        self.constraint = constraint
        self.matcher = constraint.proto.deep_copy()
        if self.matcher.is_error():
            raise SpecDecodeError(f"grammar failed to start: {self.matcher.get_error()}")
        self.vocab = constraint.vocab_size
        self.eos = constraint.eos_token_id
        self.eos_ids = sorted({t for t in eos_token_ids if 0 <= t < self.vocab} | {self.eos})
        self.jump_forward = jump_forward
        self.probe: list[int] = []  # tokens consumed past the committed state
        self.masks: torch.Tensor | None = None  # this step's [n + 1, vocab] bool
        self.node_map: list[int] = []  # proposed node -> shaped node (-1: pruned)
        self.num_proposed = 0
        self.forced = 0  # tokens appended because the grammar forced them (all steps)

    # -- the matcher --------------------------------------------------------------------------
    def allowed(self) -> torch.Tensor:
        """Bool [vocab] of the tokens legal at the probe's state; EOS ids follow the grammar's
        EOS (legal only where the grammar may end)."""
        raw = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        legal = torch.from_numpy(np.unpackbits(raw, bitorder="little")[:self.vocab].astype(bool))
        if self.matcher.is_error():
            raise RuntimeError(f"grammar state error: {self.matcher.get_error()}")
        legal[self.eos_ids] = bool(legal[self.eos])
        return legal

    def push(self, tokens: list[int]) -> int:
        """Consume as many of ``tokens`` as are legal at the probe's state; returns the count."""
        if not tokens:
            return 0
        n = int(self.matcher.try_consume_tokens(list(tokens)))
        self.probe.extend(tokens[:n])
        return n

    def ff_tokens(self) -> list[int]:
        """The grammar's forced continuation at the probe's state (canonical tokenization)."""
        if self.matcher.is_stopped():
            return []
        return [t for t in self.matcher.compute_ff_tokens() if t not in self.eos_ids]

    def reset_probe(self) -> None:
        if self.probe:
            self.matcher.rollback(len(self.probe))
            self.probe = []

    def _goto(self, path: list[int]) -> None:
        common = 0
        for a, b in zip(self.probe, path):
            if a != b:
                break
            common += 1
        if common < len(self.probe):
            self.matcher.rollback(len(self.probe) - common)
            del self.probe[common:]
        rest = path[common:]
        if rest:
            if not self.matcher.consume_tokens(rest):
                raise RuntimeError(f"grammar refused a legal path: {self.matcher.get_error()}")
            self.probe.extend(rest)

    # -- the engine's hooks -------------------------------------------------------------------
    def shape(self, draft: Draft, max_nodes: int, max_depth: int) -> Draft:
        """Prune forbidden point-mass nodes, append forced chains, compute every row's mask."""
        tokens, parents = draft.tokens.tolist(), draft.parents.tolist()
        sampled = draft.draft_probs is not None
        keep: list[int] = []  # proposed indices kept, in order
        new_parents: list[int] = []
        paths: list[list[int] | None] = []  # a kept node's token path (None: impossible prefix)
        depth: list[int] = []
        self.node_map = []
        self.num_proposed = len(tokens)
        masks = [self.allowed()]
        try:
            for i, (tok, par) in enumerate(zip(tokens, parents)):
                mpar = -1 if par < 0 else self.node_map[par]
                if par >= 0 and mpar < 0:
                    self.node_map.append(-1)
                    continue
                ppath = [] if mpar < 0 else paths[mpar]
                pmask = masks[mpar + 1]
                legal = ppath is not None and pmask is not None and tok < self.vocab \
                    and bool(pmask[tok])  # ids past the tokenizer (LM-head padding): illegal
                if not legal and not sampled:
                    self.node_map.append(-1)
                    continue
                self.node_map.append(len(keep))
                keep.append(i)
                new_parents.append(mpar)
                depth.append(1 if mpar < 0 else depth[mpar] + 1)
                if legal and tok not in self.eos_ids:  # rows after EOS are never emitted
                    paths.append(ppath + [tok])
                    self._goto(paths[-1])
                    masks.append(self.allowed())
                else:
                    paths.append(None)
                    masks.append(None)
            extra_tokens: list[int] = []
            extra_parents: list[int] = []
            if self.jump_forward:
                has_child = set(new_parents)
                leaves = [j for j in range(len(keep)) if j not in has_child] or [-1]
                if not keep:
                    leaves = [-1]
                for leaf in leaves:
                    node, path = leaf, [] if leaf < 0 else paths[leaf]
                    d = 0 if leaf < 0 else depth[leaf]
                    while path is not None and len(keep) + len(extra_tokens) < max_nodes \
                            and d < max_depth:
                        legal = masks[node + 1]
                        if legal is None or int(legal.sum()) != 1:
                            break
                        tok = int(legal.nonzero()[0, 0])
                        if tok in self.eos_ids:
                            break
                        extra_tokens.append(tok)
                        extra_parents.append(node)
                        node = len(keep) + len(extra_tokens) - 1
                        path = path + [tok]
                        paths.append(path)
                        d += 1
                        depth.append(d)
                        self._goto(path)
                        masks.append(self.allowed())
        finally:
            self.reset_probe()
        self.forced += len(extra_tokens)
        full = torch.ones(self.vocab, dtype=torch.bool)
        self.masks = torch.stack([full if m is None else m for m in masks])
        if len(keep) == len(tokens) and not extra_tokens:
            return draft
        return _rebuild(draft, keep, new_parents, extra_tokens, extra_parents)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [n + 1, W] with every illegal token at -inf (columns past the tokenizer's
        vocabulary too)."""
        assert self.masks is not None and self.masks.size(0) == logits.size(0)
        width = logits.size(-1)
        legal = self.masks[:, :width]
        if width > legal.size(1):
            legal = torch.cat([legal, legal.new_zeros(legal.size(0), width - legal.size(1))], 1)
        return logits.masked_fill(~legal.to(logits.device), float("-inf"))

    def own_verdict(self, verdict: Verdict, topk: int = 0) -> Verdict:
        """The verdict in the proposed draft's node indices (the path stops at the first node the
        drafter did not propose)."""
        if self.node_map == list(range(self.num_proposed)) and \
                verdict.num_drafted == self.num_proposed:
            return verdict
        return verdict.translated(self.node_map, self.num_proposed, topk)

    def advance(self, tokens: list[int]) -> None:
        """Commit emitted tokens to the grammar state."""
        self.masks = None
        ends = next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
        ok = not tokens[:ends] or self.matcher.consume_tokens(list(tokens[:ends]))
        if ok and ends < len(tokens):  # any EOS id ends it (consume_tokens refuses EOS once
            ok = self.matcher.consume_token(self.eos)  # the grammar is complete)
        if not ok:
            raise RuntimeError(f"grammar refused an emitted token: {self.matcher.get_error()}")

    def is_accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


def _rebuild(draft: Draft, keep: list[int], parents: list[int], extra: list[int],
             extra_parents: list[int]) -> Draft:
    idx = torch.tensor(keep, dtype=torch.long)
    tokens = torch.cat([draft.tokens[idx], torch.tensor(extra, dtype=torch.long)])
    all_parents = torch.tensor(parents + extra_parents, dtype=torch.long)
    probs = None
    if draft.draft_probs is not None:  # appended nodes are point masses: one-hot rows
        onehot = torch.zeros(len(extra), draft.draft_probs.size(1), dtype=draft.draft_probs.dtype)
        if extra:
            onehot[torch.arange(len(extra)), torch.tensor(extra)] = 1.0
        probs = torch.cat([draft.draft_probs[idx], onehot])
    sources = None
    if draft.sources is not None:
        sources = [draft.sources[i] for i in keep] + ["grammar"] * len(extra)
    scores = None
    if draft.scores is not None:
        kept = draft.scores[idx].tolist()
        for p in extra_parents:  # a forced token is accepted whenever its parent is
            kept.append(1.0 if p < 0 else kept[p])
        scores = torch.tensor(kept, dtype=draft.scores.dtype)
    return Draft(tokens, all_parents, probs, sources, scores)
