"""Everything that touches a model and its cache, by role (``docs/DESIGN.md`` has the map):

- adapters: ``target.py`` (``BatchTarget``, the engine's target, and ``warm_up``), ``draft.py``
  (``HFModel``, draft models), both on ``adopt.py`` (the checks a model passes, sliding windows);
- one forward: ``plan.py`` (``ForwardPlan``, what a forward runs), ``attention.py`` (the
  attention every adopted model runs), ``masks.py``, ``exact.py`` (the batch-invariant
  attention and matmuls), ``slot_cache.py`` (the engine's KV cache), ``lean.py`` and
  ``layers.py`` (the lean forward of Llama-family models), ``packed.py`` and ``cpu.py`` (the
  CPU's packed matmuls, per CPU class);
- weights: ``sources.py`` (loading, presets), ``heads.py`` (EAGLE / Medusa heads),
  ``layer_draft.py`` (draft models cut from the target).

The names below are the package's public face; other modules import them from here.
"""

from specdecode.models.adopt import context_length, fresh_cache
from specdecode.models.draft import HFModel
from specdecode.models.eagle3 import Eagle3Head
from specdecode.models.exact import default_exact
from specdecode.models.layers import compile_forward
from specdecode.models.sources import load_causal_lm
from specdecode.models.target import BatchTarget, TargetModel, warm_up

__all__ = ["BatchTarget", "Eagle3Head", "HFModel", "TargetModel", "compile_forward", "context_length",
           "default_exact", "fresh_cache", "load_causal_lm", "warm_up"]
