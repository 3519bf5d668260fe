"""``lookahead``: Lookahead decoding (Fu, Bailis, Stoica, Zhang, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding", ICML 2024), adapted to the tree engine.

The method, as published: Jacobi iteration guesses several future tokens at once; the target refines
every guess in parallel (the token it predicts after the guesses before it becomes the next guess);
refined guesses seldom converge on their own, but the *trajectories* they trace are plausible n-grams.
Those n-grams go into a pool keyed by their first token, and each step the pool n-grams that start
with the last committed token are verified alongside.

What one step does here:

1. **Pool.** ``NgramPool`` maps a first token to at most ``max_ngrams`` (G) continuations of
   ``num_draft_tokens`` (N - 1) tokens, newest first (inserting an n-gram already present moves it to
   the front: LRU). Its total size is bounded (``pool_size`` n-grams; when over, the key updated
   longest ago is dropped whole). It learns (a) every N-gram of the committed text (prompt, then
   output), indexed incrementally at ``propose`` (the reference fills its initial pool from the
   prompt), and (b) the N-grams of the Jacobi trajectory, at ``observe``.
2. **Draft.** A trie rooted at the last committed token x: the pool's continuations of x, newest
   first, then the guess chain g_1..g_w as one more branch, all merged (a shared prefix is one set of
   nodes; siblings never repeat a token). The chain gets at most ceil(budget / 2) nodes when the
   pool has branches (they fill the rest), else the whole budget. Nodes are emitted branch by branch
   in that order, so any prefix of the draft is a valid tree that keeps the best (newest) n-grams.
3. **Jacobi update** (``feedback_topk = 1``). Row i of the verification is the target's top-1 after
   prefix + g_1..g_i: the new guess for position i + 1, whether or not g_i was accepted. The chain is
   refined with these, then shifted left by the number of tokens committed (accepted + 1); the tail
   keeps the older guesses that were not drafted and is padded with the newest pool continuation of
   the guess before it, else with prompt tokens drawn by a seeded RNG (as the reference's initial
   guesses are). Each chain position carries its trajectory: the last N - 1 tokens, each one the
   target's prediction right after the one before (the diagonal of the paper's 2-D window). When a
   refined guess extends a trajectory of N - 1 tokens, that N-gram enters the pool.

Where this differs from the paper's 2-D window. The paper runs W columns x (N - 1) levels of Jacobi
iterations in the *same* forward as verification, under a special attention mask, decoupled from
what is accepted: the window slides one column per step and every column yields an N-gram trajectory
per step. Here the window shrinks to one level: one guess chain per step, verified as an ordinary
tree branch (our engine has no lookahead mask), with the earlier levels kept as per-position history
instead of being recomputed. Costs: fewer trajectory n-grams (the paper harvests one N-gram per
column, W per step, whatever is accepted; here a guess yields one only after surviving N - 2
refinements in the chain, so when much of the chain is accepted few full trajectories form), and the
chain slides with the accepted text rather than freely. Gains: a forward carries at most
``max_nodes`` + 1 tokens (13 by default) instead of W x (N - 1) + G x (N - 1) + 1 (57 for N = 5,
W = G = 7), which our cost curve needs; any tree-capable engine runs it unchanged; and the
lookahead branch is itself a verification candidate, so a converged guess chain is accepted directly
(plain Jacobi decoding is the special case ``max_ngrams=0``).

Cost per step: O(new tokens x N) to index committed text, O(G x N + w) to build the trie, and
O(w x N) for the update: never proportional to the context. State is per request.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

import torch

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import DEPTH, NODES, count, owner_only
from specdecode.drafters.registry import register
from specdecode.types import Draft, SpecDecodeError, Verdict


class NgramPool:
    """n-gram continuations keyed by first token: at most ``per_key`` distinct ones per key, newest
    first (LRU on insertion), at most ``max_total`` in all (the least recently updated key goes
    first). Insertion costs O(per_key)."""

    def __init__(self, per_key: int, max_total: int) -> None:
        self.per_key, self.max_total = per_key, max_total
        self.table: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()
        self.total = 0

    def add(self, ngram: Sequence[int]) -> None:
        """Insert ``ngram`` (first token = key, at least one token after it) as the newest."""
        if len(ngram) < 2 or self.per_key <= 0:
            return
        key, cont = int(ngram[0]), tuple(int(t) for t in ngram[1:])
        entries = self.table.get(key)
        if entries is None:
            entries = self.table[key] = []
        else:
            self.table.move_to_end(key)
            if cont in entries:
                entries.remove(cont)
                self.total -= 1
        entries.insert(0, cont)
        self.total += 1
        if len(entries) > self.per_key:
            entries.pop()
            self.total -= 1
        while self.total > self.max_total and len(self.table) > 1:
            _, dropped = self.table.popitem(last=False)
            self.total -= len(dropped)

    def get(self, key: int) -> list[tuple[int, ...]]:
        """Continuations of ``key``, newest first (do not modify)."""
        return self.table.get(key, [])

    def __len__(self) -> int:
        return self.total


class Trie:
    """A draft tree under construction: nodes in insertion order, siblings deduplicated."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.child: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def missing(self, branch: Sequence[int]) -> int:
        """How many nodes inserting ``branch`` would add."""
        node = -1
        for depth, tok in enumerate(branch):
            node = self.child.get((node, tok), -2)
            if node == -2:
                return len(branch) - depth
        return 0

    def insert(self, branch: Sequence[int], budget: int, parent: int = -1) -> list[int]:
        """Insert ``branch`` as a path below ``parent`` (-1: the root) while the tree has fewer than
        ``budget`` nodes; returns the node of each token inserted or found (shorter than ``branch``
        if the budget ran out)."""
        nodes, node = [], parent
        for tok in branch:
            nxt = self.child.get((node, tok))
            if nxt is None:
                if len(self.tokens) >= budget:
                    break
                nxt = len(self.tokens)
                self.child[(node, tok)] = nxt
                self.tokens.append(int(tok))
                self.parents.append(node)
            nodes.append(nxt)
            node = nxt
        return nodes

    def draft(self) -> Draft:
        return Draft(torch.tensor(self.tokens, dtype=torch.long),
                     torch.tensor(self.parents, dtype=torch.long))


def build_tree(pool_branches: Sequence[Sequence[int]], chain: Sequence[int],
               budget: int) -> tuple[Trie, list[int]]:
    """Merge the pool branches (in order) and then ``chain`` into one trie of at most ``budget``
    nodes. Room for the chain (its first ``budget`` tokens) is kept: a pool node off the chain's path
    is added only while the tree plus the chain's missing nodes stays within the budget. Returns the
    trie and the node of each chain token."""
    chain = list(chain[:budget])
    trie = Trie()
    for branch in pool_branches:
        reserve = trie.missing(chain)
        if len(trie) + reserve >= budget:
            break
        node, on_chain = -1, True
        for depth, tok in enumerate(branch):
            on_chain = on_chain and depth < len(chain) and chain[depth] == tok
            nxt = trie.child.get((node, tok))
            if nxt is None:
                if not on_chain and len(trie) + reserve >= budget:
                    break
                reserve -= on_chain  # a node the chain would have needed anyway
                nxt = trie.insert([tok], budget, parent=node)[0]
            node = nxt
    return trie, trie.insert(chain, budget)


class LookaheadDrafter:
    """Guess chain + n-gram pool (see the module docstring); one instance per request."""

    feedback_topk = 1

    def __init__(self, num_draft_tokens: int = 4, window: int = 4, max_ngrams: int = 5,
                 max_nodes: int = 12, pool_size: int = 65536, seed: int = 0) -> None:
        self.depth, self.window, self.max_ngrams, self.max_nodes = (num_draft_tokens, window,
                                                                    max_ngrams, max_nodes)
        self.n = num_draft_tokens + 1  # n-gram length N
        self.pool = NgramPool(max_ngrams, pool_size)
        self.rng = random.Random(seed)
        self.indexed = 0  # committed n-grams ending before this position are in the pool
        self.start: int | None = None  # absolute position of guess[0]
        self.guess: list[int] = []  # current Jacobi iterate for positions start, start + 1, ...
        self.traj: list[tuple[int, ...]] = []  # per guess: its trajectory, ending with the guess
        self.chain_nodes: list[int] = []  # draft node of each drafted guess, last step
        self.pending: int | None = None

    # committed text -> pool
    def _index(self, tokens: list[int]) -> None:
        n = self.n
        for end in range(max(self.indexed, n - 1), len(tokens)):
            self.pool.add(tokens[end - n + 1:end + 1])
        self.indexed = len(tokens)

    def _align(self, tokens: list[int], num_prompt: int) -> None:
        """Shift the guesses to start at the next position, then pad them to the window."""
        pos = len(tokens)
        if self.start is None or pos < self.start:
            self.guess, self.traj = [], []
        elif pos > self.start:
            drop = pos - self.start
            self.guess, self.traj = self.guess[drop:], self.traj[drop:]
        self.start = pos
        while len(self.guess) < self.window:
            prev = self.guess[-1] if self.guess else tokens[-1]
            conts = self.pool.get(prev)
            fill = list(conts[0]) if conts else [tokens[self.rng.randrange(max(num_prompt, 1))]]
            for tok in fill[:self.window - len(self.guess)]:
                self.guess.append(tok)
                self.traj.append((tok,))

    def propose(self, ctx: DraftContext) -> Draft:
        tokens = ctx.tokens
        self._index(tokens)
        self._align(tokens, ctx.num_prompt)
        self.pending, self.chain_nodes = tokens[-1], []
        budget, depth = min(self.max_nodes, ctx.budget), min(self.depth, ctx.max_depth)
        if budget <= 0 or depth <= 0:
            return Draft.empty()
        branches = [cont[:depth] for cont in self.pool.get(tokens[-1])]
        share = (budget + 1) // 2 if branches else budget
        chain = self.guess[:min(self.window, depth, share)]
        trie, self.chain_nodes = build_tree(branches, chain, budget)
        return trie.draft()

    def observe(self, verdict: Verdict) -> None:
        fb = verdict.feedback
        committed = verdict.num_accepted + 1
        if fb is not None and self.pending is not None and self.chain_nodes:
            rows = fb.topk_ids[:, 0].tolist()
            keep, old = self.n - 1, list(self.traj)
            for i, node in enumerate(self.chain_nodes):
                if node + 1 >= len(rows):  # the engine cut the draft: this guess was not verified
                    break
                # the target's token after prefix + g_1..g_{i+1} is the new guess i + 1, and it
                # extends the trajectory of guess i (each token predicted right after the one before)
                refined = rows[node + 1]
                trail = old[i] + (refined,)
                if len(trail) == self.n:
                    self.pool.add(trail)
                if i + 1 < len(self.guess):
                    self.guess[i + 1], self.traj[i + 1] = refined, trail[-keep:]
                else:
                    self.guess.append(refined)
                    self.traj.append(trail[-keep:])
        # positions up to the bonus token are committed; the rest stay, aligned at the next propose
        if self.start is not None:
            self.guess, self.traj = self.guess[committed:], self.traj[committed:]
            self.start += committed
        self.pending, self.chain_nodes = None, []


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecDecodeError(f"lookahead {name} must be an int >= {low}, got {value!r}")
    return value


@register("lookahead", options={
    "num_draft_tokens": DEPTH, "window": count(1, "nodes", nullable=True),
    "max_ngrams": count(0, "nodes"), "max_nodes": NODES, "pool_size": owner_only("int", 1, 10**8)})
def build_lookahead(build: BuildContext, num_draft_tokens: int = 4, window: int | None = None,
                    max_ngrams: int = 5, max_nodes: int = 12,
                    pool_size: int = 65536) -> LookaheadDrafter:
    """Options: ``num_draft_tokens`` (draft depth = n-gram length N - 1), ``window`` (guess-chain
    length, <= num_draft_tokens; default num_draft_tokens), ``max_ngrams`` (G: pool n-grams per key
    and per draft; 0 = plain Jacobi decoding), ``max_nodes`` (node budget), ``pool_size`` (pool bound
    in n-grams). Initial guesses use a fixed RNG seed, so drafts are deterministic."""
    depth = _check_int("num_draft_tokens", num_draft_tokens, 1)
    window = depth if window is None else _check_int("window", window, 1)
    if window > depth:
        raise SpecDecodeError(f"lookahead window ({window}) must be <= num_draft_tokens ({depth}), "
                              "the depth cap")
    g = _check_int("max_ngrams", max_ngrams, 0)
    nodes = _check_int("max_nodes", max_nodes, 1)
    total = _check_int("pool_size", pool_size, max(g, 1))
    return LookaheadDrafter(depth, window, g, nodes, total)
