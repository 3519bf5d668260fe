"""Benchmark: report arithmetic on hand-made answers, the equality check, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers.bench_files import answer, write

from specdecode.bench.report import OVERALL, build_report, metrics
from specdecode.bench.runner import method_file
from specdecode.cli import main


def test_report_arithmetic(tmp_path):
    base = [answer(1, "a", [[1] * 10, [2] * 10], [1.0, 1.0], [1] * 20, [0]),
            answer(2, "b", [[3] * 30], [1.0], [1] * 30, [0])]
    # method: q1 20 tokens in 0.5 s (40 tok/s), q2 30 tokens in 0.5 s (60 tok/s)
    fast = [answer(1, "a", [[1] * 10, [2] * 10], [0.25, 0.25], [3, 3, 4, 4, 2, 4], [12, 0]),
            answer(2, "b", [[3] * 30], [0.5], [4] * 6 + [3, 3], [24])]
    write(tmp_path, "vanilla", base)
    write(tmp_path, "fast", fast)
    report = build_report(tmp_path, ["vanilla", "fast"], {}, oracle="fast")
    cell = report["table"]["fast"][OVERALL]
    # Spec-Bench: mean of per-question speeds, over vanilla's mean (10 and 30 tok/s)
    assert cell["speedup"] == pytest.approx((40 + 60) / 2 / ((10 + 30) / 2), abs=1e-4)
    lengths = [3, 3, 4, 4, 2, 4] + [4] * 6 + [3, 3]
    assert cell["mat"] == pytest.approx(sum(lengths) / len(lengths), abs=1e-4)  # the bonus token counts
    assert cell["acceptance_rate"] == pytest.approx((sum(lengths) - len(lengths)) / 36, abs=1e-4)
    assert report["table"]["vanilla"][OVERALL]["mat"] == 1.0
    assert report["table"]["fast"]["a"]["speedup"] == pytest.approx(4.0)
    assert cell["identical"] == 1.0 and cell["pct_of_oracle"] == 100.0


def test_equality_check_catches_one_token_and_a_missing_question(tmp_path):
    base = [answer(q, "a", [[q, 5, 6, 7]], [1.0]) for q in (1, 2, 3, 4)]
    changed = [answer(q, "a", [[q, 5, 6, 7 if q != 2 else 8]], [1.0]) for q in (1, 2, 3, 4)]
    missing = [answer(q, "a", [[q, 5, 6, 7]], [1.0]) for q in (1, 2, 3)]
    write(tmp_path, "vanilla", base)
    write(tmp_path, "changed", changed)
    write(tmp_path, "missing", missing)
    report = build_report(tmp_path, ["vanilla", "changed", "missing"], {}, oracle=None)
    assert report["table"]["changed"][OVERALL]["identical"] == 0.75
    assert report["table"]["missing"][OVERALL]["identical"] == 0.75
    assert report["table"]["missing"][OVERALL]["missing"] == 1
    assert set(report["flagged"]) == {"changed", "missing"}
    assert report["ranking"] == []  # differing methods are not ranked...
    lossy = build_report(tmp_path, ["vanilla", "changed"], {}, oracle=None, allow_lossy=True)
    assert lossy["ranking"] == ["changed"]  # ...unless asked


def test_metrics_without_steps_reports_none():
    base = {1: answer(1, "a", [[1, 2]], [1.0])}
    cell = metrics(base, {1: answer(1, "a", [[1, 2]], [0.5])}, [1])
    assert cell["mat"] is None and cell["speedup"] == pytest.approx(2.0)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny random target/draft with a real BPE tokenizer and chat template, saved to disk."""
    from helpers import tiny_model

    from specdecode.train.prepare import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    texts = ["Hello there, how are you today? I am fine, thank you."] * 50
    tok = train_tokenizer(texts, 300, root / "tok")
    for name, seed, layers in (("target", 0, 3), ("draft", 1, 1)):
        model = tiny_model("llama", vocab=len(tok), seed=seed, layers=layers, dtype=__import__(
            "torch").float32, context=256)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.mark.e2e
def test_bench_end_to_end_writes_every_file(tmp_path, tiny_pair):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"question_id": 1, "category": "writing", "turns": ["Hi there", "And then?"]})
        + "\n" + json.dumps({"question_id": 2, "category": "qa", "turns": ["How are you?"]})
        + "\n" + json.dumps({"question_id": 3, "category": "qa", "turns": ["x " * 300]}) + "\n")
    out = tmp_path / "out"
    args = ["bench", "--target", str(tiny_pair / "target"), "--draft-model",
            str(tiny_pair / "draft"), "--questions", str(questions), "--max-new-tokens", "12",
            "--out", str(out), "--policy", "fixed", "--methods",
            "vanilla,ngram,draft-model:tree_width=2,layer-skip,oracle,hf-generate,hf-pld,hf-assisted"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    for name in ("report.json", "report.md", "speedup_by_category.png", "accept_lengths.png"):
        assert (out / name).exists(), name
    for spec in ("vanilla", "ngram", "draft-model:tree_width=2", "oracle", "hf-generate", "hf-pld"):
        rows = [json.loads(line) for line in method_file(out, spec).read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [1, 2]
        assert len(rows[0]["choices"][0]["turns"]) == 2
    assert summary["questions"] == 2
    for spec in ("ngram", "draft-model:tree_width=2", "layer-skip", "oracle"):
        assert summary["identical"][spec] == 1.0  # ours are lossless
    report = json.loads((out / "report.json").read_text())
    assert [s["question_id"] for s in report["skipped"]] == [3]  # too long: reported, not cut
    # resuming with the same settings redoes nothing; other settings are refused
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "resuming: 3 questions" in again.output
    other = CliRunner().invoke(main, args[:-2] + ["--methods", "vanilla"])
    assert other.exit_code != 0 and "other settings" in other.output
    rebuilt = CliRunner().invoke(main, ["bench", "--report-only", "--out", str(out)])
    assert rebuilt.exit_code == 0 and json.loads(rebuilt.output.strip().splitlines()[-1]) == summary


def test_a_method_can_name_its_own_draft_model(tmp_path, tiny_pair):
    """draft-model:draft_model=DIR compares drafts in one interleaved run (no --draft-model)."""
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi"]}) + "\n")
    spec = f"draft-model:draft_model={tiny_pair / 'draft'}"
    args = ["bench", "--target", str(tiny_pair / "target"), "--questions", str(questions),
            "--max-new-tokens", "10", "--policy", "fixed", "--methods", f"vanilla,{spec}"]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["identical"][spec] == 1.0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert json.dumps(report).count("draft_model=") > 0
    missing = CliRunner().invoke(main, args[:-1] + [f"vanilla,draft-model:draft_model={tmp_path}",
                                                    "--out", str(tmp_path / "bad")])
    assert missing.exit_code != 0 and "has no config.json" in missing.output
    unnamed = CliRunner().invoke(main, args[:-1] + ["vanilla,draft-model", "--out",
                                                    str(tmp_path / "none")])
    assert unnamed.exit_code != 0 and "needs a draft model" in unnamed.output


def test_bench_rejects_unknown_methods(tmp_path, tiny_pair):
    result = CliRunner().invoke(main, ["bench", "--target", str(tiny_pair / "target"),
                                       "--methods", "vanilla,warp-drive", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown method 'warp-drive'" in result.output


def test_batch_bench_reports_every_size_and_equal_rows(tmp_path, tiny_pair):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]})
                                 + "\n" for i, t in enumerate(
                                     ["Hi there", "How are you?", "Hello, how", "Fine thanks"])))
    out = tmp_path / "batch"
    result = CliRunner().invoke(main, [
        "bench", "--target", str(tiny_pair / "target"), "--draft-model", str(tiny_pair / "draft"),
        "--questions", str(questions), "--max-new-tokens", "10", "--out", str(out),
        "--methods", "vanilla,ngram,draft-model,oracle", "--batch-size", "1,3", "--policy", "fixed"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])["batch"]
    got = {(r["method"], r["batch_size"]) for r in summary}
    assert got == {(m, b) for m in ("vanilla", "ngram", "draft-model", "oracle", "hf-batch")
                   for b in (1, 3)}
    for row in summary:
        assert row["rows_equal"] + row["near_ties"] + row["mismatches"] == 4
        if row["method"] != "hf-batch":  # ours: every row as decoded alone
            assert row["rows_equal"] + row["near_ties"] == 4
    assert (out / "batch.md").exists() and (out / "batch.json").exists()
    bad = CliRunner().invoke(main, ["bench", "--target", str(tiny_pair / "target"),
                                    "--batch-size", "0", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "batch sizes must be >= 1" in bad.output


def test_generate_prompts_file_batches_and_matches_vanilla(tmp_path, tiny_pair):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi there\n\nHow are you?\nHello, how\n")
    base = ["generate", "--target", str(tiny_pair / "target"), "--max-new-tokens", "8",
            "--policy", "fixed"]
    result = CliRunner().invoke(main, base + ["--prompts-file", str(prompts), "--batch-size", "2",
                                              "--compare", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["requests"] == 3 and len(report["results"]) == 3
    assert report["rows_identical_to_vanilla"] == 3
    assert report["new_tokens"] == sum(r["new_tokens"] for r in report["results"])
    both = CliRunner().invoke(main, base + ["--prompt", "x", "--prompts-file", str(prompts)])
    assert both.exit_code != 0 and "exactly one of --prompt and --prompts-file" in both.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    none = CliRunner().invoke(main, base + ["--prompts-file", str(empty)])
    assert none.exit_code != 0 and "holds no prompts" in none.output


def test_counter_metrics_give_vllm_methods_mat_and_acceptance(tmp_path):
    base = [answer(1, "a", [[1] * 10, [2] * 10], [1.0, 1.0], [1] * 20, [0])]
    peer = answer(1, "a", [[1] * 10, [2] * 10], [0.5, 0.5])
    peer["choices"][0]["spec_counters"] = [
        {"num_drafts": 3, "num_draft_tokens": 16, "num_accepted_tokens": 6},
        {"num_drafts": 2, "num_draft_tokens": 8, "num_accepted_tokens": 3}]
    plain = answer(1, "a", [[1] * 10, [2] * 10], [0.5, 0.5])
    plain["choices"][0]["spec_counters"] = [{"num_drafts": 0, "num_draft_tokens": 0,
                                             "num_accepted_tokens": 0}] * 2
    write(tmp_path, "vanilla", base)
    write(tmp_path, "vllm-ngram", [peer])
    write(tmp_path, "vllm", [plain])
    report = build_report(tmp_path, ["vanilla", "vllm-ngram", "vllm"], {}, oracle=None)
    cell = report["table"]["vllm-ngram"][OVERALL]
    # 20 tokens in (10 - 6) + (10 - 3) steps; a step without a draft counts, as for our methods
    assert cell["mat"] == pytest.approx(20 / 11, abs=1e-4)
    assert cell["acceptance_rate"] == pytest.approx(9 / 24, abs=1e-4)
    assert report["table"]["vllm"][OVERALL]["mat"] == 1.0
    peer["choices"][0]["spec_counters"].pop()  # one turn without counters: no MAT at all
    write(tmp_path, "vllm-ngram", [peer])
    again = build_report(tmp_path, ["vanilla", "vllm-ngram"], {}, oracle=None)
    assert again["table"]["vllm-ngram"][OVERALL]["mat"] is None


@pytest.mark.parametrize("methods, message", [
    ("vanilla,vllm-ngram:warp=1", "unknown options ['warp']"),
    ("vanilla,vllm:num_draft_tokens=3", "takes no options"),
    ("vanilla,vllm-specdecode-lookahead", "unknown method"),
])
def test_bench_vllm_methods_check_their_options(tmp_path, tiny_pair, methods, message):
    result = CliRunner().invoke(main, ["bench", "--target", str(tiny_pair / "target"),
                                       "--methods", methods, "--out", str(tmp_path)])
    assert result.exit_code != 0 and message in result.output, result.output


def test_bench_vllm_methods_need_an_interpreter_with_vllm(tmp_path, tiny_pair):
    result = CliRunner().invoke(main, ["bench", "--target", str(tiny_pair / "target"),
                                       "--methods", "vanilla,vllm", "--out", str(tmp_path),
                                       "--vllm-python", "/bin/false"])
    assert result.exit_code != 0 and "--vllm-python" in result.output, result.output
    assert not (tmp_path / "answers").exists()
