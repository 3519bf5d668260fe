"""The training loop every trainer shares (``train/demo.py``, ``heads.py``, ``distill.py``).

A trainer builds its modules and optimizer and gives ``TrainLoop`` one function, ``step_fn(step) ->
(loss, metrics)``, that computes a step's loss from data seeded by the step number. The loop owns
the rest: the learning-rate schedule (transformers' linear warm-up then cosine decay to
``min_lr_ratio`` of the peak, by step count only), gradient clipping, the progress bar, a
checkpoint every ``checkpoint_every`` steps and when the time budget runs out (modules, optimizer,
scheduler, torch's random state, history and the trainer's ``extra`` values), and resuming from it:
a stopped run, rerun with the same settings, continues exactly where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

StepFn = Callable[[int], tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]]


@dataclass(frozen=True)
class LoopSettings:
    """How long and how a trainer runs (each trainer's config carries these fields)."""

    steps: int
    warmup: int
    time_budget_s: float = 0.0  # 0 = none; a checkpoint is written when it runs out
    checkpoint_every: int = 50
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak learning rate
    clip: float = 1.0  # gradient norm clip

    @classmethod
    def of(cls, cfg: Any, **overrides: Any) -> LoopSettings:
        """The loop fields of a trainer's config dataclass."""
        names = ("steps", "warmup", "time_budget_s", "checkpoint_every", "min_lr_ratio")
        fields = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        return cls(**{**fields, **overrides})


class TrainLoop:
    """Schedule, checkpoint, resume, time budget and progress bar around ``step_fn``.

    ``modules``: what is trained, by checkpoint key; ``shaping``: the settings a checkpoint must
    have been written with to be resumed (else ``ValueError``: use another output directory);
    ``extra``: values the trainer keeps in the checkpoint (e.g. the evaluation before training)."""

    def __init__(self, settings: LoopSettings, modules: Mapping[str, nn.Module],
                 opt: torch.optim.Optimizer, ckpt: Path, *, shaping: Mapping[str, Any] | None = None,
                 log: Callable[[str], None] = tqdm.write) -> None:
        self.settings, self.modules, self.opt, self.ckpt = settings, dict(modules), opt, ckpt
        self.shaping = dict(shaping) if shaping is not None else None
        self.log = log
        self.sched = get_cosine_with_min_lr_schedule_with_warmup(
            opt, num_warmup_steps=settings.warmup, num_training_steps=settings.steps,
            min_lr_rate=settings.min_lr_ratio)
        self.step, self.elapsed = 0, 0.0
        self.history: list[dict[str, float]] = []
        self.extra: dict[str, Any] = {}
        if ckpt.exists():
            self._resume()

    def _resume(self) -> None:
        state = torch.load(self.ckpt, weights_only=False)
        if self.shaping is not None and state.get("shaping") != self.shaping:
            raise ValueError(f"{self.ckpt} was written with other settings; use another --out")
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        self.step, self.elapsed, self.history = state["step"], state["elapsed"], state["history"]
        self.extra = state.get("extra", {})
        self.log(f"resumed from step {self.step}")

    def save(self) -> None:
        torch.save({**{name: m.state_dict() for name, m in self.modules.items()},
                    "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "rng": torch.get_rng_state(), "step": self.step, "elapsed": self.elapsed,
                    "history": self.history, "shaping": self.shaping, "extra": self.extra},
                   self.ckpt)

    @property
    def finished(self) -> bool:
        return self.step >= self.settings.steps

    def run(self, step_fn: StepFn, desc: str) -> bool:
        """Steps until ``settings.steps`` or the time budget; returns whether training finished."""
        s = self.settings
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        bar = tqdm(total=s.steps, initial=self.step, desc=desc)
        start = time.perf_counter() - self.elapsed
        while self.step < s.steps:
            loss, metrics = step_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, s.clip)
            self.opt.step()
            self.sched.step()
            self.step += 1
            self.elapsed = time.perf_counter() - start
            values = {k: float(v) for k, v in metrics.items()}
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in values.items()})
            if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                self.history.append({"step": self.step, "loss": round(loss.item(), 4),
                                     **{k: round(v, 4) for k, v in values.items()},
                                     "elapsed_s": round(self.elapsed, 1)})
                self.save()
            if s.time_budget_s and self.elapsed >= s.time_budget_s and self.step < s.steps:
                self.save()
                self.log(f"time budget reached at step {self.step}; rerun the same command to "
                         "resume")
                break
        bar.close()
        return self.finished
