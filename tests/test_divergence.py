"""The benchmark's divergence report (first differing token, top-2 margin there) and --exact."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from helpers.bench_files import answer, write

from specdecode.bench.divergence import NEAR_TIE, divergence, first_divergence, summarize
from specdecode.bench.report import OVERALL, build_report, markdown
from specdecode.cli import main


def test_first_divergence_positions():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # stopped early
    assert first_divergence([1, 2], [1, 2, 9]) == 2


def test_divergence_margin_is_the_top2_gap_at_vanillas_prefix():
    from helpers import tiny_model

    model = tiny_model("llama", seed=3)
    prompt, reference = [5, 6, 7, 8], [9, 10, 11, 12]
    found = divergence(model, prompt, reference, [9, 10, 40, 41])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + reference[:2]])).logits[0, -1]
    top = logits.float().sort(descending=True).values
    assert found["position"] == 2
    assert abs(found["margin"] - float(top[0] - top[1])) < 1e-3
    assert divergence(model, prompt, reference, list(reference)) is None


def test_report_lists_where_methods_leave_vanilla(tmp_path):
    base = [answer(q, "a", [[q, 5, 6, 7]], [1.0]) for q in (1, 2, 3)]
    lossy = [answer(q, "a", [[q, 5, 6, 7 if q == 1 else 8]], [1.0]) for q in (1, 2, 3)]
    for q, margin in ((2, 0.1), (3, 2.0)):
        lossy[q - 1]["choices"][0]["divergence"] = {"turn": 0, "position": 3, "margin": margin}
    write(tmp_path, "vanilla", base)
    write(tmp_path, "lossy", lossy)
    report = build_report(tmp_path, ["vanilla", "lossy"], {}, oracle=None)
    cell = report["table"]["lossy"][OVERALL]
    assert cell["divergence"] == {"count": 2, "position_median": 3, "margin_median": 1.05,
                                  "near_ties": 1}
    assert report["table"]["vanilla"][OVERALL]["divergence"] is None
    env = {"model_id": "m", "cpu": "c", "threads": 1, "dtype": "bfloat16", "temperature": 0.0,
           "seed": 0, "command": "x"}
    text = markdown(report, env)
    assert "Where outputs leave vanilla's" in text and "| lossy | 2 | 3 | 1.050 | 1 of 2 |" in text
    assert summarize([]) is None and NEAR_TIE > 0


def test_cli_exact_flag_in_bfloat16():
    """--exact in bfloat16: ngram is token-identical to vanilla; --no-exact runs the batched
    forward (the report says which)."""
    runner = CliRunner()
    args = ["generate", "--dtype", "bfloat16", "--prompt", "The cat sat on the mat. The cat",
            "--max-new-tokens", "24", "--compare", "--json", "--drafter", "ngram", "--policy", "fixed"]
    exact = runner.invoke(main, args + ["--exact"])
    assert exact.exit_code == 0, exact.output
    assert json.loads(exact.output.strip().splitlines()[-1])["identical_to_vanilla"] is True
    loose = runner.invoke(main, args + ["--no-exact"])
    assert loose.exit_code == 0, loose.output
    curve = runner.invoke(main, ["cost-curve", "--dtype", "bfloat16", "--no-exact", "--nodes",
                                 "0,2", "--repeats", "1", "--context", "8"])
    assert curve.exit_code == 0, curve.output
    assert json.loads(curve.output.strip().splitlines()[-1])["exact"] is False
