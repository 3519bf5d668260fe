"""``layer-skip``: self-speculation with the target's first L layers, its final norm and its LM head
(no extra weights; the early-exit drafter of LayerSkip, Elhoushi et al., ACL 2024, and of Draft &
Verify, Zhang et al., ACL 2024, without their training).

The shallow model is a view: its modules are the target's own (shared weights, no copy); only the
decoder-layer list is shortened. It drafts like ``draft-model`` (``model_drafting``: a chain, or a
dynamic tree with ``tree="dynamic"``) with its own KV cache.

The exit layer L is chosen per request from measured agreement with the target (``num_layers``
None, the default), in the manner of SWIFT (Xia et al., ICLR 2025: pick the layers to skip on the
fly, from the request itself) and DEL (Xiao et al., 2025: dynamic exit layer from measured
acceptance). One forward of the deepest candidate view over the last <= 64 committed tokens, with
the target's final norm and LM head applied to every layer's output, gives each candidate layer l
its "shadow" agreement a_l: the fraction of positions where its argmax equals the target's (known
from the target feedback channel, or under greedy from the committed tokens themselves). The layer
maximising expected tokens per step over relative cost, ``step_value``, is chosen; the realised
acceptance is tracked and the choice re-measured every ``REMEASURE_STEPS`` steps, or sooner when
drafts are accepted well below the estimate. An int ``num_layers`` fixes L (no measurement).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.model_drafting import DRAFT_OPTIONS, DraftModelDrafter
from specdecode.drafters.options import count
from specdecode.drafters.registry import register
from specdecode.models import HFModel
from specdecode.types import Draft, SpecDecodeError, Verdict

log = logging.getLogger(__name__)

WINDOW = 64  # committed positions scored per measurement
MIN_LABELS = 4  # fewer labelled positions than this: no measurement yet
REMEASURE_STEPS = 16  # verdicts before the first periodic re-measurement
MAX_INTERVAL = 128  # the interval doubles while the layer holds, up to this
DECAY = 0.5  # weight of the earlier measurements when a new one is folded in
EARLY_STEPS = 4  # verdicts before a drop in acceptance may trigger an early re-measurement
DROP = 0.25  # "well below the estimate": realised acceptance this far under it
EMA = 0.2  # weight of the newest step in the realised-acceptance average
SWITCH_GAIN = 1.05  # another layer must promise this much more than the current one


def _layer_list(model: torch.nn.Module, count: int) -> tuple[list[str], torch.nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name.split("."), module
    raise SpecDecodeError("layer-skip could not find the target's decoder layer list")


def shallow_view(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A copy of ``model``'s module tree sharing every weight, with only ``num_layers`` layers."""
    config = model.config
    total = config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise SpecDecodeError(f"layer-skip num_layers must be in [1, {total - 1}] for this "
                              f"{total}-layer target, got {num_layers}")
    path, layers = _layer_list(model, total)
    small_config = copy.copy(config)
    small_config.num_hidden_layers = num_layers
    if getattr(small_config, "layer_types", None):
        small_config.layer_types = list(config.layer_types[:num_layers])
    root = copy.copy(model)
    root._modules = dict(model._modules)
    copied = [root]
    for part in path[:-1]:
        child = copy.copy(copied[-1]._modules[part])
        child._modules = dict(child._modules)
        copied[-1]._modules[part] = child
        copied.append(child)
    copied[-1]._modules[path[-1]] = torch.nn.ModuleList(list(layers)[:num_layers])
    for module in copied:  # only the copies: the shared modules keep the target's config
        if getattr(module, "config", None) is config:
            module.config = small_config
    return root


def step_value(alpha: float, k: int, layers: int, total: int) -> float:
    """Expected tokens per step of a k-token chain with per-token acceptance ``alpha`` (Leviathan
    et al., ICML 2023: E = (1 - a^(k+1)) / (1 - a)) over its cost relative to a plain step,
    1 + k * layers / total (a draft forward through ``layers`` of ``total`` layers; verification
    of a few tokens priced like one plain step)."""
    expected = k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return expected / (1.0 + k * layers / total)


def choose_layer(agreement: Sequence[float], total: int, max_tokens: int
                 ) -> tuple[int, int, float]:
    """(layer, chain length, value): the exit layer l in 1..len(agreement) (``agreement[l - 1]``
    its acceptance estimate) and k in 1..max_tokens maximising ``step_value``; ties go to the
    smaller layer (then the shorter chain). With no agreement anywhere this is the cheapest layer:
    whether to draft at all is the request's policy's call."""
    best = (1, 1, float("-inf"))
    for layer, alpha in enumerate(agreement, start=1):
        for k in range(1, max_tokens + 1):
            value = step_value(float(alpha), k, layer, total)
            if value > best[2] + 1e-12:
                best = (layer, k, value)
    return best


class ExitHead:
    """The target's final norm and LM head, applied to any layer's output (found generically: the
    head is ``get_output_embeddings()``, the norm the last norm module among the body's direct
    children after its layer list, e.g. ``model.norm`` for Llama/Qwen2, ``transformer.ln_f`` for
    GPT-2). ``find`` returns None when the structure is not recognised."""

    def __init__(self, body: torch.nn.Module, norm: torch.nn.Module, head: torch.nn.Module,
                 layers_name: str) -> None:
        self.body, self.norm, self.head, self.layers_name = body, norm, head, layers_name
        self.candidates = len(getattr(body, layers_name)) - 1  # exit layers 1..N-1
        self.checked = False  # set once norm(last layer) matched the body's own output

    @classmethod
    def find(cls, model: torch.nn.Module) -> ExitHead | None:
        head = model.get_output_embeddings()
        body = getattr(model, "base_model", None)
        if head is None or body is None or body is model:
            return None
        total = model.config.num_hidden_layers
        children = list(body.named_children())
        index = [i for i, (_, m) in enumerate(children)
                 if isinstance(m, torch.nn.ModuleList) and len(m) == total]
        if not index:
            return None
        norms = [m for _, m in children[index[0] + 1:]
                 if isinstance(m, torch.nn.LayerNorm) or "norm" in type(m).__name__.lower()]
        if not norms:
            return None
        return cls(body, norms[-1], head, children[index[0]][0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))

    @torch.inference_mode()
    def agreement(self, view: torch.nn.Module, ids: list[int], start: int,
                  labels: torch.Tensor) -> tuple[list[float], int] | None:
        """(hits per exit layer, positions): at how many labelled positions each layer of ``view``
        (the target itself or a shallow view) exits to the target's argmax ``labels`` (-1: not
        scored), out of how many. One forward of the
        view's body over ``ids`` (absolute positions from ``start``), no cache kept. The first call
        checks that the norm applied to the view's last layer is the body's own output, and
        returns None when it is not (then the structure was not recognised)."""
        body = view.base_model
        layers = getattr(body, self.layers_name)
        outputs: list[torch.Tensor] = []

        def record(_module: Any, _args: Any, output: Any) -> None:
            outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

        device = next(body.parameters()).device
        hooks = [layer.register_forward_hook(record) for layer in layers]
        try:
            final = body(input_ids=torch.tensor([ids], device=device), use_cache=False,
                         position_ids=torch.arange(start, start + len(ids), device=device)[None]
                         ).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        if len(outputs) != len(layers):
            return None
        if not self.checked:
            if not torch.allclose(self.norm(outputs[-1]).float(), final.float(),
                                  rtol=1e-2, atol=1e-3):
                return None
            self.checked = True
        labels = labels.to(device)
        known = labels >= 0
        hits = []
        for hidden in outputs[:self.candidates]:  # the LM head only at the scored positions
            guess = self.logits(hidden[0][known]).argmax(-1)
            hits.append(float((guess == labels[known]).sum()))
        return hits, int(known.sum())


class LayerSkipDrafter:
    """A ``DraftModelDrafter`` over a shallow view of the target, whose depth is chosen from
    measured agreement (``auto``) or fixed. ``num_layers`` is the current exit layer and
    ``switches`` the (verdicts seen, layer) of every choice, the first included."""

    def __init__(self, model: torch.nn.Module, num_layers: int | None,
                 draft_options: dict[str, Any]) -> None:
        self.model, self.options = model, draft_options
        self.total = int(model.config.num_hidden_layers)
        self.max_tokens = int(draft_options.get("num_draft_tokens", 4))
        self.auto = num_layers is None
        start = max(1, self.total // 2) if num_layers is None else num_layers
        self.exit = ExitHead.find(model) if self.auto else None
        if self.auto and self.exit is None:
            log.info("layer-skip: no final norm / LM head found for %s; using a fixed %d of %d "
                     "layers", type(model).__name__, start, self.total)
            self.auto = False
        self.feedback_topk = 1 if self.auto else 0  # read by the engine
        self.inner = self._drafter(start)
        self.num_layers = start
        self.switches: list[tuple[int, int]] = [(0, start)]
        self.deepest: torch.nn.Module | None = None  # view of total - 1 layers, once measured
        self.labels: dict[int, int] = {}  # position p -> the target's argmax after token p
        self.greedy = True
        self.tokens: list[int] = []
        self.base = 0  # committed length when the last draft was made
        self.steps = 0  # verdicts seen
        self.since = 0  # verdicts since the last measurement
        self.measured = False
        self.interval = REMEASURE_STEPS  # verdicts until the next periodic measurement
        self.scored = 0  # positions below this were scored already
        self.hits: list[float] = []  # decayed agreements per candidate layer
        self.count = 0.0  # decayed positions scored
        self.estimate = 0.0  # the current layer's measured agreement (minus tolerated drift)
        self.realised = 0.0  # EMA of per-step acceptance

    def _drafter(self, layers: int) -> DraftModelDrafter:
        return DraftModelDrafter(HFModel(shallow_view(self.model, layers)), **self.options)

    def propose(self, ctx: DraftContext) -> Draft:
        self.tokens, self.greedy = ctx.tokens, ctx.params.greedy
        if self.auto:
            if ctx.prefill_topk_ids is not None:
                for pos, row in enumerate(ctx.prefill_topk_ids[:, 0].tolist()):
                    self.labels[pos] = int(row)
            if self._due():
                try:
                    self._measure()
                except Exception as err:  # noqa: BLE001 - a failed measurement must not stop drafts
                    log.warning("layer-skip: measuring agreement failed (%s: %s); keeping %d "
                                "layers", type(err).__name__, err, self.num_layers)
                    self.auto = False
        self.base = len(ctx.tokens)
        return self.inner.propose(ctx)

    def observe(self, verdict: Verdict) -> None:
        self.inner.observe(verdict)
        if not self.auto:
            return
        self.steps += 1
        self.since += 1
        feedback = verdict.feedback
        if feedback is not None:  # rows on the committed path: the pending token, accepted nodes
            top = feedback.topk_ids[:, 0].tolist()
            self.labels[self.base - 1] = int(top[0])
            for j, node in enumerate(verdict.path):
                self.labels[self.base + j] = int(top[node + 1])
        drafted, accepted = verdict.num_drafted, verdict.num_accepted
        if drafted:  # per-token acceptance: each accepted node and the one rejection were tries
            tries = accepted + (1 if accepted < drafted else 0)
            self.realised += EMA * (accepted / tries - self.realised)

    def _due(self) -> bool:
        if not self.measured or self.since >= self.interval:
            return True
        return self.since >= EARLY_STEPS and self.realised < self.estimate - DROP

    def _measure(self) -> None:
        """Score every candidate layer at the committed positions not scored yet (their context:
        the last <= ``WINDOW`` tokens), fold the counts into decayed totals, and move to the best
        layer when it beats the current one by ``SWITCH_GAIN``. While the layer holds, the interval
        between periodic measurements doubles (up to ``MAX_INTERVAL``): it is cheap, not free."""
        tokens = self.tokens
        end = len(tokens) - 1  # the pending token's successor is not known yet
        start = max(0, end - WINDOW)
        labels = [self.labels.get(p, -1) if p >= self.scored else -1 for p in range(start, end)]
        if self.greedy:  # greedy commits the target's argmax: the next token is the label
            labels = [lab if lab >= 0 or p < self.scored else tokens[p + 1]
                      for p, lab in enumerate(labels, start)]
        if sum(lab >= 0 for lab in labels) < MIN_LABELS:
            return
        early = self.measured and self.since < self.interval
        counts = self.exit.agreement(self._deepest(), tokens[start:end], start,
                                     torch.tensor(labels))
        self.since = 0
        if counts is None:
            log.info("layer-skip: the final norm of %s was not recognised; keeping a fixed %d "
                     "of %d layers", type(self.model).__name__, self.num_layers, self.total)
            self.auto, self.feedback_topk = False, 0
            return
        hits, count = counts
        self.hits = [DECAY * old + new for old, new in zip(self.hits, hits)] or hits
        self.count = DECAY * self.count + count
        self.scored = end
        self.labels = {p: v for p, v in self.labels.items() if p >= end}
        agreement = [h / self.count for h in self.hits]
        first, self.measured = not self.measured, True
        layer, _, value = choose_layer(agreement, self.total, self.max_tokens)
        current = agreement[self.num_layers - 1]
        current_value = max(step_value(current, k, self.num_layers, self.total)
                            for k in range(1, self.max_tokens + 1))
        if layer != self.num_layers and (first or value > current_value * SWITCH_GAIN):
            old_rng = getattr(self.inner, "rng", None)
            self.inner = self._drafter(layer)
            if old_rng is not None:  # the draft's random stream goes on: never replayed
                self.inner.rng = old_rng
            self.num_layers = layer
            self.switches.append((self.steps, layer))
            self.estimate = self.realised = agreement[layer - 1]
            self.interval = REMEASURE_STEPS
        elif first:
            self.estimate = self.realised = current
        else:  # kept: a lasting gap between estimate and outcome is not a reason to re-measure
            self.estimate = min(current, self.realised)
            self.interval = REMEASURE_STEPS if early else min(2 * self.interval, MAX_INTERVAL)

    def _deepest(self) -> torch.nn.Module:
        if self.deepest is None:
            self.deepest = shallow_view(self.model, self.total - 1)
        return self.deepest


@register("layer-skip", options={"num_layers": count(1, "layers-1", nullable=True),
                                 **DRAFT_OPTIONS})  # passed through
def build_layer_skip(build: BuildContext, num_layers: int | None = None,
                     num_draft_tokens: int = 4, tree_width: int = 1, tree: str = "chain",
                     topk: int = 4, max_nodes: int = 12, **options: Any) -> LayerSkipDrafter:
    """Self-speculation with the target's first ``num_layers`` layers (default None: chosen from
    measured agreement); the other options are ``draft-model``'s (``DRAFT_OPTIONS``), passed
    through (checked against the registration like every drafter's)."""
    model = build.target.model
    total = model.config.num_hidden_layers
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)):
        raise SpecDecodeError(f"layer-skip num_layers must be an int in [1, {total - 1}] or "
                              f"None (automatic), got {num_layers!r}")
    if num_layers is None:
        shallow_view(model, max(1, total // 2))  # a target too shallow to skip fails here
    draft_options = dict(num_draft_tokens=num_draft_tokens, tree_width=tree_width, tree=tree,
                         topk=topk, max_nodes=max_nodes, **options)
    return LayerSkipDrafter(model, num_layers, draft_options)
