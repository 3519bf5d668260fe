"""specdecode's drafters inside vLLM (``specdecode.integrations.vllm``): greedy outputs identical
to vLLM without speculation on the demo target (fp32), several requests in flight, and the
per-request drafter state freed. Marked ``vllm``: CI runs them in a second environment with
``.[vllm]`` installed (``python -m pytest -m vllm``); the default suite deselects them."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]
vllm = pytest.importorskip("vllm", reason="needs the vllm extra (pip install -e '.[vllm]')")

from specdecode.demo import demo_dir  # noqa: E402
from specdecode.integrations.vllm import PROPOSERS as BY_DRAFTER  # noqa: E402
from specdecode.integrations.vllm import SpecdecodeProposer  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
           "Summarize: the quick brown fox jumps over the lazy dog.", "In 1905, Albert Einstein",
           "Question: what is two plus two? Answer:", "import numpy as np\n", "Dear Sir or Madam,"]
PROPOSERS = [proposer.__name__ for proposer in BY_DRAFTER.values()]


@pytest.fixture(scope="module", autouse=True)
def in_process():
    # the engine core in this process, so the test can look at the proposer's state
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    if old is None:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def _llm(proposer: str | None):
    d = demo_dir()
    spec = None if proposer is None else {
        "method": "custom_class", "model": f"specdecode.integrations.vllm.{proposer}",
        "num_speculative_tokens": 5}
    return vllm.LLM(model=str(d / "target"), tokenizer=str(d / "tokenizer"), dtype="float32",
                    enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=2048,
                    max_num_seqs=8, seed=0, speculative_config=spec)


def _generate(llm, prompts, max_tokens=48):
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def vanilla():
    llm = _llm(None)
    out = {"first": _generate(llm, PROMPTS), "second": _generate(llm, PROMPTS[::-1])}
    del llm
    return out


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_proposer_outputs_equal_vllm_without_speculation(vanilla, proposer):
    llm = _llm(proposer)
    assert _generate(llm, PROMPTS) == vanilla["first"]
    live = [p for p in SpecdecodeProposer.instances if type(p).__name__ == proposer]
    assert live, "vLLM did not build our proposer"
    assert live[-1].proposed_tokens > 0
    first = set(live[-1].requests)
    assert all(not (isinstance(k, tuple) and k[0] == "row") for k in first), \
        "request ids were not read from vLLM's runner"
    assert _generate(llm, PROMPTS[::-1]) == vanilla["second"]
    # requests of the first call have left the batch: their drafters are gone
    left = set(live[-1].requests)
    assert not (left & first) and len(left) <= 8
    del llm


def test_benchmark_vllm_methods_write_valid_jsonl(tmp_path):
    """``specdecode bench`` with vLLM peers on two questions: Spec-Bench JSONL like every method's,
    outputs equal to our vanilla (greedy), MAT from vLLM's counters, ranked in the report."""
    import json

    from click.testing import CliRunner

    from specdecode.bench.runner import method_file
    from specdecode.cli import main

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in (
        {"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Another one."]},
        {"question_id": 2, "category": "rag", "turns": ["Summarize: the fox jumps over the dog."]})))
    methods = ["vanilla", "vllm", "vllm-ngram", "vllm-specdecode-suffix:num_draft_tokens=3"]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", "--questions", str(questions), "--max-new-tokens",
                                       "24", "--methods", ",".join(methods), "--out", str(out)])
    assert result.exit_code == 0, result.output
    vanilla = [json.loads(x) for x in method_file(out, "vanilla").read_text().splitlines()]
    for spec in methods[1:]:
        rows = [json.loads(x) for x in method_file(out, spec).read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [1, 2]
        for row, base in zip(rows, vanilla):
            assert set(row) >= {"question_id", "category", "model_id", "choices", "tstamp"}
            choice = row["choices"][0]
            assert len(choice["turns"]) == len(choice["new_tokens"]) == len(choice["wall_time"])
            assert all(w > 0 for w in choice["wall_time"])
            assert choice["token_ids"] == base["choices"][0]["token_ids"]
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert set(summary["ranking"]) == set(methods[1:]) and not summary["flagged"]
    assert summary["mat"]["vllm"] == 1.0 and summary["mat"]["vllm-ngram"] >= 1.0
