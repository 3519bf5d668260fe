"""The compiled forward (``--compile``, ``models/layers.py``): with the per-layer work through
torch.compile, a token's logits still do not depend on what shares its forward, and drafters stay
token-identical to (compiled) vanilla decoding; the float32 exact forward keeps its eager layers."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import fixed_policy as sd
from helpers import make_prompts, tiny_model
from helpers.invariance import mismatches

from specdecode.models import BatchTarget
from specdecode.models.lean import LeanForward
from specdecode.types import Draft

# inductor builds its CPU kernels with the machine's C++ compiler (present wherever CI runs)
pytestmark = [pytest.mark.e2e,  # torch.compile
              pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                 reason="torch.compile on the CPU needs a C++ compiler")]


def _compiled(arch: str, dtype: torch.dtype, seed: int = 3):
    model = tiny_model(arch, seed=seed, dtype=dtype, vocab=256)
    sd.compile_forward(model)
    return model


def test_compiled_forward_is_batch_invariant_in_bfloat16():
    model = _compiled("qwen2", torch.bfloat16)  # q/k/v biases: the packed op's bias path too
    assert LeanForward.build(model).compiled is not None
    assert mismatches(model, exact=True, trials=12, seed=21) == 0


def test_compiled_drafters_are_token_identical_to_compiled_vanilla(caplog):
    """Also: after the warm-up no forward recompiles (dynamic shapes: every token count, chains,
    trees, batch rows and the self-draft's one-token steps run the graphs compiled once)."""
    from specdecode.models import HFModel, warm_up

    target = _compiled("llama", torch.bfloat16, seed=0)
    other = tiny_model("llama", seed=1, layers=1, dtype=torch.bfloat16, vocab=256)
    warm_up(target)
    rng = random.Random(2)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        HFModel(target).extend([1, 2, 3])  # a draft's forwards: several tokens, then one
        HFModel(target).extend([4])
        _compare_drafters(target, other, rng)
        rows = sd.generate_batch(target, make_prompts(5, vocab=256, seed=6), drafter="ngram",
                                 max_new_tokens=12, batch_size=3, eos_token_id=[])
    finally:
        torch.compiler.set_stance("default")
    assert "drafter failed" not in caplog.text  # a recompile there would fall back silently
    for prompt, row in zip(make_prompts(5, vocab=256, seed=6), rows):
        alone = sd.generate(target, prompt, drafter="none", max_new_tokens=12, eos_token_id=[])
        assert row.token_ids == alone.token_ids


def _compare_drafters(target, other, rng: random.Random) -> None:
    accepted = 0
    for prompt in make_prompts(4, vocab=256, seed=5):
        new = rng.randint(8, 20)
        reference = sd.generate(target, prompt, drafter="none", max_new_tokens=new,
                                eos_token_id=[]).token_ids
        for drafter, options in (("ngram", {"num_draft_tokens": 4}),
                                 ("draft-model", {"draft_model": other, "tree": "dynamic",
                                                  "max_nodes": 6}),
                                 ("draft-model", {"draft_model": target, "num_draft_tokens": 3}),
                                 ("token-recycling", {})):
            out = sd.generate(target, prompt, drafter=drafter, max_new_tokens=new,
                              eos_token_id=[], **options)
            assert out.token_ids == reference, (drafter, options, prompt)
            accepted += out.stats.accepted
    assert accepted > 0  # drafts were accepted, so verification was exercised


def test_compiled_matches_eager_closely_and_float32_exact_stays_eager():
    """Compiled and eager logits agree to float32 rounding (the same computation, other kernels);
    the float32 exact forward (row-by-row matmuls) runs its eager layers and stays exact."""
    model = tiny_model("llama", seed=4, dtype=torch.float32, vocab=256)
    prompt = list(range(3, 40))
    out = {}
    for compiled in (False, True):
        sd.compile_forward(model, compiled)
        target = BatchTarget(model, exact=False)
        row = target.add_row(64)
        target.prefill(row, prompt)
        out[compiled] = target.step([5], [Draft.chain(torch.tensor([7, 9, 11]))])[0]
    assert torch.allclose(out[False], out[True], atol=1e-4, rtol=1e-4)
    assert mismatches(model, exact=True, trials=6, seed=8) == 0  # compile asked for, eager used


def test_cli_compile_flag(tmp_path):
    from specdecode.cli import main

    result = CliRunner().invoke(main, ["generate", "--compile", "--prompt", "Hi",
                                       "--max-new-tokens", "4", "--drafter", "ngram",
                                       "--policy", "fixed"])
    assert result.exit_code == 0, result.output
    assert "[ngram] 4 tokens in" in result.output
