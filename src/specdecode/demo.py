"""The demo model pair shipped inside the package (trained by ``specdecode train-demo``).

Weights are stored as fp16 safetensors to keep the wheel small and load as fp32 (faster on CPU).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from specdecode.types import SpecDecodeError


def demo_dir() -> Path:
    return Path(str(resources.files("specdecode"))) / "demo_models"


@dataclass
class DemoModels:
    target: Any
    draft: Any
    tokenizer: Any
    path: Path

    @property
    def target_path(self) -> Path:
        return self.path / "target"

    @property
    def draft_path(self) -> Path:
        return self.path / "draft"


def load_demo(dtype: torch.dtype = torch.float32) -> DemoModels:
    """Load the shipped pair offline: ``.target`` and ``.draft`` (Llama causal LMs) and the shared
    ``.tokenizer`` (with a chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = demo_dir()
    if not (root / "target" / "config.json").exists():
        raise SpecDecodeError(f"the demo models are missing from this install ({root}); "
                              "reinstall specdecode or pass --target PATH")
    load = dict(dtype=dtype, use_safetensors=True, attn_implementation="sdpa")
    target = AutoModelForCausalLM.from_pretrained(root / "target", **load).eval()
    draft = AutoModelForCausalLM.from_pretrained(root / "draft", **load).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    return DemoModels(target, draft, tokenizer, root)


def export_demo(work_dir: Path, out_dir: Path | None = None) -> dict:
    """Copy trained models from ``work_dir/<target|draft>/model`` into the package as fp16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = out_dir or demo_dir()
    summaries = {}
    for name in ("target", "draft"):
        src = work_dir / name / "model"
        if not (src / "config.json").exists():
            raise SpecDecodeError(f"no trained {name} at {src}; run `specdecode train-demo` first")
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
        model.to(torch.float16).save_pretrained(out_dir / name, safe_serialization=True)
        summaries[name] = json.loads((work_dir / name / "summary.json").read_text())
    AutoTokenizer.from_pretrained(work_dir / "target" / "model").save_pretrained(out_dir / "tokenizer")
    (out_dir / "training_summary.json").write_text(json.dumps(summaries, indent=2))
    return summaries
