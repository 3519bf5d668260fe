"""``adaptive``: the draft budget that maximises expected emitted tokens per second.

Each step it compares a plain step, rate(0) = 1 / (c(0) + t_other), with drafting to depth D,

    rate(D) = (1 + h * E(D)) / (h * (c(n(D)) + t_draft(D)) + (1 - h) * (c(0) + t_miss) + t_other)

where c(n) is the target's measured cost of verifying n nodes (``CostModel``: measured once per
architecture, dtype, device and thread count, cached on disk, rescaled online from the step
timings), t_draft(D) = t0 + t1 * D the drafter's cost (fitted online), h the share of steps where the
drafter found something to propose, n(D) its observed nodes per depth, and E(D) = sum over d <= D
of prod_{j <= d} alpha_j the expected accepted tokens, alpha_d being the request's acceptance
rate at depth d given depth d - 1 was accepted (exponential moving averages).

Speculation is turned off when rate(0) wins and probed again (a draft of depth <= 2) after 8, 16,
32, 64 plain steps, later when a probe (catching up included) would cost more than 2% of the plain
steps in between (back to 8 when it pays); while on, every 8th draft goes to the deepest
depth seen, so deep estimates stay fresh. A request starts from what the previous requests of its
kind (same target, drafter, drafter options and sampling) learned: costs, and a slow average of
their acceptance.

In a batch (the engine sets ``batch_size``, the rows in flight) the forward verifies every row at
once, so a request's share of it is c(B (n + 1) - 1) / B: drafting pays less as the batch grows
and stops when the forward turns compute-bound. Batched forwards are learned by the tokens they
held (``StepRecord.batch_tokens``).

This is SmartSpec's expected-goodput rule (Liu et al., 2024), per request. For tree drafters
that score their nodes (``Draft.scores``, the product of draft probabilities along a path)
``select`` cuts the deterministic tree to the prefix-closed set of nodes maximising
(1 + calibration * sum of kept scores) / (c(n) + drafting cost), and ``plan`` tells the drafter the
score a node needs to pay (``Budget.min_score``), in the manner of the confidence stops of
SpecDec++ (Huang et al., 2024) and SVIP (Zhang et al., 2025). Chains are cut by the measured
acceptance per depth only: on the demo pair the draft model's own probabilities proved a worse
guide to where a chain stops paying (quick benchmark: 1.01x with score cuts, 1.10x without).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from specdecode.drafters.options import Option, count
from specdecode.host import HostState
from specdecode.policies.base import Budget, StepRecord, register_policy
from specdecode.policies.cost import HOST_KEY as COST_KEY
from specdecode.policies.cost import CostModel, measured_curve
from specdecode.types import Draft, SpecDecodeError

# The latest policy per kind of request (target, drafter and its options, sampling): a new request
# starts from what the last one of its kind learned about costs and the drafter's shape instead of
# paying again to find out, and from a slow average of their acceptance (each request then tracks
# its own). Bounded; decisions never change outputs, so sharing is safe.
HOST_KEY = "adaptive"  # the host's dict: kind -> the latest AdaptivePolicy of that kind
_LATEST_LIMIT = 256
_LEARNED = ("depth_cap", "node_ratio", "tree", "scored", "draft_cost", "t_miss", "t_other_spec",
            "t_other_plain", "calibration", "probe_extra", "first_extra", "hits", "asks")


class AdaptivePolicy:
    def __init__(self, cost: CostModel, *, ema: float = 0.3, probe_every: int = 8,
                 max_probe_every: int = 64, prior: float = 0.5, kind: str = "",
                 latest: dict[str, AdaptivePolicy] | None = None) -> None:
        if not 0.0 < ema <= 1.0:
            raise SpecDecodeError(f"adaptive ema must be in (0, 1], got {ema}")
        if probe_every < 1 or max_probe_every < probe_every:
            raise SpecDecodeError("adaptive needs 1 <= probe_every <= max_probe_every")
        self.cost, self.ema, self.prior = cost, ema, prior
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self.interval, self.wait, self.on_steps = probe_every, 0, 0
        self.alpha: list[float] = []  # alpha[d - 1]: P(depth d accepted | depth d - 1 accepted)
        self.prior_alpha: list[float] = []  # where alpha started (earlier requests of its kind)
        self.observed = 0  # drafts verified in this request
        self.depth_cap = 0  # deepest draft seen
        self.node_ratio = 1.0  # nodes per unit depth of the drafter's drafts
        self.tree = self.scored = False
        # share of drafting steps with a non-empty draft: decayed counts with a Laplace prior, so
        # a drafter that found nothing for a while (cheap to ask again) is still asked
        self.hits, self.asks = 0.0, 0.0
        self.prev_off = False  # the last step was plain: this draft paid for catching up
        self.fresh = True  # the request's first draft also fed the drafter the prompt
        self.probe_extra = 0.0  # what the last probe cost beyond a plain step (catching up too)
        self.first_extra = 0.0  # the same for a request's first draft (the prompt fed too)
        self.draft_cost = DraftCost()
        self.t_miss = 0.0
        self.t_other_spec: float | None = None
        self.t_other_plain: float | None = None
        self.calibration = 1.0  # observed accepted / predicted sum of scores
        self.batch_size = 1  # rows in flight, set by the engine before each ``plan``
        if kind:
            self._resume(kind, {} if latest is None else latest)

    def _resume(self, kind: str, latest: dict[str, AdaptivePolicy]) -> None:
        previous = latest.pop(kind, None)
        if previous is not None:
            for name in _LEARNED:
                setattr(self, name, copy.copy(getattr(previous, name)))
            if self.draft_cost.provisional:  # a one-off first measurement: not worth keeping
                self.draft_cost = DraftCost()
            self.cost.scale = previous.cost.scale
            # acceptance starts from a slow average over the earlier requests of this kind
            old = previous.prior_alpha
            self.prior_alpha = [old[d] + 0.3 * (a - old[d]) if d < len(old) else a
                                for d, a in enumerate(previous.alpha)] + old[len(previous.alpha):]
            self.alpha = list(self.prior_alpha)
        while len(latest) >= _LATEST_LIMIT:
            latest.pop(next(iter(latest)))
        latest[kind] = self

    # --- the model -------------------------------------------------------------------------
    @property
    def hit(self) -> float:
        return (self.hits + 0.5) / (self.asks + 1.0)

    def alpha_at(self, depth: int) -> float:
        if depth <= len(self.alpha):
            return self.alpha[depth - 1]
        return self.alpha[-1] if self.alpha else self.prior

    def expected_accepted(self, depth: int, optimistic: bool = False) -> float:
        total, reach = 0.0, 1.0
        # effective sample size: the moving averages' at most, and few at a request's start (its
        # acceptance then comes from earlier requests only, and may not hold for this one)
        # (unless a request's first draft is dear: feeding it the prompt cost over two steps)
        spread = (2.0 - self.ema) / self.ema
        if self.first_extra <= 2.0 * self.cost(0):
            spread = min(spread, 2.0 + self.observed)
        for d in range(1, depth + 1):
            alpha = self.alpha_at(d)
            if optimistic:  # one standard error up: off only when drafting clearly does not pay
                alpha = min(1.0, alpha + (alpha * (1.0 - alpha) / spread) ** 0.5)
            reach *= alpha
            total += reach
        return total

    def nodes_for(self, depth: int, max_nodes: int) -> int:
        """The nodes a draft of this depth is expected to verify (observed nodes per depth)."""
        if not self.tree:
            return min(max_nodes, depth)
        return min(max_nodes, max(depth, round(self.node_ratio * depth)))

    def _verify(self, n: int, tree: bool = False) -> float:
        """This request's share of a verification forward when each of the ``batch_size`` rows
        verifies n nodes: c(B (n + 1) - 1) / B (the forward's cost follows the tokens it holds)."""
        b = max(1, int(self.batch_size))
        return self.cost(b * (n + 1) - 1, tree) / b

    def _other(self, spec: bool) -> float:
        plain = self.t_other_plain if self.t_other_plain is not None else self.t_other_spec
        value = self.t_other_spec if spec else plain
        return (value if value is not None else plain) or 0.0

    def step_cost(self, depth: int, max_nodes: int) -> float:
        if depth == 0:
            return self._verify(0) + self._other(False)
        drafting = self._verify(self.nodes_for(depth, max_nodes), self.tree) + self.draft_cost(depth)
        if not self.observed:  # a request's first draft also feeds the drafter the prompt
            drafting = max(drafting, self._verify(0) + self.first_extra)
        missing = self._verify(0) + self.t_miss
        return self.hit * drafting + (1 - self.hit) * missing + self._other(True)

    def rate(self, depth: int, max_nodes: int, optimistic: bool = False) -> float:
        """Expected emitted tokens per second when drafting to ``depth`` (0: a plain step)."""
        gain = 1.0 + (self.hit * self.expected_accepted(depth, optimistic) if depth else 0.0)
        return gain / self.step_cost(depth, max_nodes)

    def best_depth(self, max_nodes: int, max_depth: int) -> tuple[int, float]:
        """The depth with the best expected rate; 0 only if even an optimistic estimate of the
        acceptance (one standard error up) says drafting loses: being off when drafting pays costs
        more than the reverse, most of all for cheap drafters whose hits come in bursts."""
        plain = self.rate(0, max_nodes)
        depths = range(1, min(max_depth, self.depth_cap + 1) + 1)
        best, best_rate = 0, plain
        for depth in depths:
            rate = self.rate(depth, max_nodes)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = depth, rate
        if best == 0:
            for depth in depths:
                rate = self.rate(depth, max_nodes, optimistic=True)
                if rate > best_rate * (1 + 1e-9):
                    best, best_rate = depth, rate
        return best, best_rate

    # --- the Policy protocol -----------------------------------------------------------------
    def plan(self, max_nodes: int, max_depth: int) -> Budget:
        if self.depth_cap == 0:  # nothing drafted yet: learn the drafter's shape first
            return Budget(max_nodes, max_depth)
        if self.wait > 0:  # off: plain steps until the next probe, nothing to recompute
            self.wait -= 1
            return Budget(0, 0)
        depth, rate = self.best_depth(max_nodes, max_depth)
        if depth == 0:
            if not self.prev_off:  # drafting stopped paying: off, and probe later
                self.wait = self.probe_interval(max_nodes, max_depth) - 1
                self.prev_off = True
                return Budget(0, 0)
            self.interval = min(2 * self.interval, self.max_probe_every)
            depth = min(max_depth, self.depth_cap, 2)  # a short probe: does drafting pay again?
        else:
            self.interval = self.probe_every
            self.on_steps += 1
            if self.on_steps % self.probe_every == 0:  # now and then look deeper than chosen,
                depth = min(max_depth, self.depth_cap)  # so deep estimates do not go stale
        nodes = self.nodes_for(depth, max_nodes)
        if not self.scored or not self.tree:  # the depth bounds the draft; the drafter shapes it
            return Budget(max_nodes, depth)
        # a scoring drafter gets room and ``select`` cuts; a node pays when calibration * score
        # >= rate * the marginal cost of verifying one more node
        slope = self._verify(nodes + 1, self.tree) - self._verify(nodes, self.tree)
        return Budget(max_nodes, depth, max(0.0, rate * slope / max(self.calibration, 1e-3)))

    def probe_interval(self, max_nodes: int, max_depth: int) -> int:
        """Plain steps between probes: doubling from ``probe_every`` up to ``max_probe_every``, and
        never so often that a probe (its catching up included) costs more than 2% of the plain
        steps' time in between (at most 16 x ``max_probe_every``)."""
        depth = max(1, min(max_depth, self.depth_cap, 2))
        plain = self.step_cost(0, max_nodes)
        drafting = (self._verify(self.nodes_for(depth, max_nodes), self.tree)
                    + self.draft_cost(depth) + self._other(True))
        extra = max(drafting - plain, self.probe_extra)
        return int(min(16 * self.max_probe_every, max(self.interval, extra / (0.02 * plain))))

    def select(self, draft: Draft) -> Draft:
        """Keep the scored nodes that pay (deterministic drafts only; see ``policies.base``)."""
        if draft.scores is None or draft.draft_probs is not None or len(draft) == 0:
            return draft
        if draft.is_chain():
            return draft  # chains are cut by the measured acceptance per depth, not by scores
        order = torch.argsort(-draft.scores.double(), stable=True).tolist()
        scores = draft.scores.double().tolist()
        tree = True  # chains returned above
        depth = int(draft.depths().max())
        sunk = self.draft_cost(depth) + self._other(True)
        best_n, best_rate, total = 0, 1.0 / (self._verify(0) + sunk), 0.0
        for n, node in enumerate(order, start=1):
            total += scores[node]
            rate = (1.0 + self.calibration * total) / (self._verify(n, tree) + sunk)
            if rate > best_rate:
                best_n, best_rate = n, rate
        keep = torch.zeros(len(draft), dtype=torch.bool)
        parents = draft.parents.tolist()
        for node in order[:best_n]:  # ancestors always kept, whatever the scores say
            while node >= 0 and not keep[node]:
                keep[node] = True
                node = parents[node]
        return draft.subset(keep)

    def observe(self, record: StepRecord) -> None:
        a = self.ema
        self.batch_size = record.batch_size
        if record.batch_size > 1:  # the forward verified every row: learn its cost by its size
            tokens = record.batch_tokens or record.drafted + 1
            self.cost.observe(tokens - 1, record.verify_s, record.tree)
        if record.budget.off:
            if record.batch_size <= 1:
                self.cost.observe(0, record.verify_s)
            self.t_other_plain = _ema(self.t_other_plain, record.other_s, a)
            return
        caught_up, self.prev_off = self.prev_off, False
        if caught_up or self.fresh:  # what a probe or a request's first draft costs beyond a
            extra = max(0.0, record.draft_s + record.verify_s + record.other_s  # plain step,
                        - self.step_cost(0, record.budget.nodes))  # catching up included
            if self.fresh:
                self.first_extra = extra
            if caught_up:
                self.probe_extra = extra
        proposed = record.drafted if record.proposed < 0 else record.proposed
        self.hits = 0.9 * self.hits + (proposed > 0)
        self.asks = 0.9 * self.asks + 1.0
        if record.drafted == 0:  # a plain step that paid for drafting: the drafter found nothing,
            if record.batch_size <= 1:  # or ``select`` kept nothing of its draft
                self.cost.observe(0, record.verify_s)
            if proposed:
                self.draft_cost.add(record.proposed_depth, record.draft_s, provisional=caught_up)
            else:
                self.t_miss += a * (record.draft_s - self.t_miss)
            self.t_other_plain = _ema(self.t_other_plain, record.other_s, a)
            return
        self.tree = record.tree
        self.observed += 1
        if record.batch_size <= 1:
            self.cost.observe(record.drafted, record.verify_s, record.tree)
        first, self.fresh = self.fresh, False
        # catching up (after plain steps, or on the prompt at a request's first draft) makes
        # drafting look dearer than it is: such a step counts only while nothing else is known
        self.draft_cost.add(record.depth, record.draft_s, provisional=caught_up or first)
        self.t_other_spec = _ema(self.t_other_spec, record.other_s, a)
        self.node_ratio += a * (record.drafted / record.depth - self.node_ratio)
        self.depth_cap = max(self.depth_cap, record.depth)
        while len(self.alpha) < record.depth:
            self.alpha.append(self.alpha_at(len(self.alpha) + 1))
        for d in range(1, min(record.accepted + 1, record.depth) + 1):
            self.alpha[d - 1] += a * (float(record.accepted >= d) - self.alpha[d - 1])
        if record.score_sum is not None and record.score_sum > 0:
            self.scored = True
            ratio = min(3.0, max(0.1, record.accepted / record.score_sum))
            self.calibration += a * (ratio - self.calibration)


class DraftCost:
    """The drafter's seconds per draft as t0 + t1 * depth, by least squares with exponential
    forgetting (a model drafter pays about one forward per depth, a lookup drafter a constant)."""

    def __init__(self, keep: float = 0.95) -> None:
        self.keep = keep
        self.w = self.d = self.dd = self.y = self.dy = 0.0
        self.provisional = False

    def add(self, depth: int, seconds: float, provisional: bool = False) -> None:
        if provisional and self.w > 0:
            return
        if self.provisional or provisional:  # drop the provisional point once a clean one comes
            self.w = self.d = self.dd = self.y = self.dy = 0.0
        self.provisional = provisional
        k = self.keep
        self.w, self.d, self.dd = k * self.w + 1, k * self.d + depth, k * self.dd + depth * depth
        self.y, self.dy = k * self.y + seconds, k * self.dy + depth * seconds

    def __call__(self, depth: int) -> float:
        if self.w == 0:
            return 0.0
        mean_d, mean_y = self.d / self.w, self.y / self.w
        var = self.dd / self.w - mean_d * mean_d
        if var < 0.05 * mean_d * mean_d:  # one depth seen: proportional
            return mean_y * depth / mean_d
        slope = max(0.0, (self.dy / self.w - mean_d * mean_y) / var)
        return max(0.0, mean_y - slope * mean_d) + slope * depth


def _ema(old: float | None, value: float, a: float) -> float:
    return value if old is None else old + a * (value - old)


@register_policy("adaptive", options={
    "probe_every": count(1, 10**6), "max_probe_every": count(1, 10**6),
    "ema": Option("float", 0.0, (1.0,)), "cost_cache": Option("bool"), "remember": Option("bool")})
def build_adaptive(build: Any, probe_every: int = 8, max_probe_every: int = 64,
                   ema: float = 0.3, cost_cache: bool = True,
                   remember: bool = True) -> AdaptivePolicy:
    host = getattr(build, "host", None) or HostState()
    curve = measured_curve(build.target.model, use_disk=cost_cache, exact=build.target.exact,
                           memory=host.get(COST_KEY, dict))
    return AdaptivePolicy(CostModel(curve["chain"], curve["tree"]), ema=ema,
                          probe_every=probe_every, max_probe_every=max_probe_every,
                          kind=getattr(build, "kind", "") if remember else "",
                          latest=host.get(HOST_KEY, dict) if remember else None)
