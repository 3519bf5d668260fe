"""specdecode: lossless speculative decoding for Hugging Face causal LMs."""

from specdecode.api import generate, prepare, stream
from specdecode.drafters import BuildContext, DraftContext, Drafter, available, register
from specdecode.policies import Budget, Policy, StepRecord, register_policy
from specdecode.scheduler import RequestEvent, Scheduler, generate_batch
from specdecode.types import (
    Draft,
    GenerationResult,
    RunStats,
    SamplingParams,
    SpecDecodeError,
    StepEvent,
    StepStats,
    TargetFeedback,
    Verdict,
)

__all__ = ["Budget", "BuildContext", "Draft", "DraftContext", "Drafter", "GenerationResult",
           "Policy", "RequestEvent", "RunStats", "Scheduler", "StepRecord", "register_policy",
           "SamplingParams", "SpecDecodeError", "StepEvent", "StepStats", "TargetFeedback",
           "Verdict", "available", "compile_forward",
           "generate", "generate_batch", "load_demo", "load_plugins", "prepare", "register",
           "stream"]
__version__ = "0.1.0"

from specdecode.plugins import load_plugins  # noqa: E402

load_plugins()  # SPECDECODE_PLUGINS: modules that register drafters / policies


def load_demo(*args, **kwargs):
    """The shipped demo pair (``.target``, ``.draft``, ``.tokenizer``); see ``specdecode.demo``."""
    from specdecode.demo import load_demo as _load

    return _load(*args, **kwargs)


def compile_forward(model, enabled: bool = True):
    """Run ``model``'s per-layer work through ``torch.compile`` from its next forward on; see
    ``specdecode.models.layers``. Returns the model."""
    from specdecode.models import compile_forward as _compile

    return _compile(model, enabled)
