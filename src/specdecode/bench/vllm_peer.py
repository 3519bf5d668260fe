"""vLLM as a benchmark peer: ``vllm``, ``vllm-ngram`` and ``vllm-specdecode-<drafter>`` methods.

Each such method gets one vLLM engine (offline ``LLM`` API, our target's dtype, eager) in its own subprocess
(``specdecode.integrations.vllm_worker``), started at the method's first question and kept for the
whole run, so vLLM answers the same prompts (our chat template's token ids, every turn's history
built from the method's own earlier answers) interleaved with our methods, and its answers go into
the same Spec-Bench JSONL, checked against our vanilla like every other method. The time is that of
``LLM.generate`` for the one request (prefill included), measured in the worker.

- ``vllm``: vLLM without speculation.
- ``vllm-ngram``: vLLM's own prompt lookup (options ``num_draft_tokens``, ``prompt_lookup_min``,
  ``prompt_lookup_max``).
- ``vllm-specdecode-ngram`` / ``-suffix`` / ``-sam``: our drafters as vLLM proposers
  (``specdecode.integrations.vllm``); other options are passed to the drafter.

The worker runs with ``--vllm-python`` (default: this interpreter), which must import ``vllm`` and
``specdecode``. vLLM reports no per-request steps; its counters per answer (drafts, draft tokens,
accepted tokens) give these methods' MAT as ours is defined (tokens / steps, a step without a
draft included; steps = tokens - accepted) and their acceptance rate (accepted / draft tokens).
vLLM's own "mean acceptance length", 1 + accepted / drafts, leaves out steps without a draft.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from specdecode.integrations.vllm import PROPOSERS, proposer_path
from specdecode.types import SpecDecodeError

VLLM_METHODS = ("vllm", "vllm-ngram", *(f"vllm-specdecode-{d}" for d in PROPOSERS))


def is_vllm(name: str) -> bool:
    return name in VLLM_METHODS


def speculative_config(name: str, options: dict, num_draft_tokens: int) -> tuple[dict | None, dict]:
    """(vLLM's speculative_config, environment for the worker) of one method."""
    if name == "vllm":
        if options:
            raise SpecDecodeError(f"method 'vllm' takes no options (got {sorted(options)})")
        return None, {}
    options = dict(options)
    k = int(options.pop("num_draft_tokens", num_draft_tokens))
    if name == "vllm-ngram":
        unknown = set(options) - {"prompt_lookup_min", "prompt_lookup_max"}
        if unknown:
            raise SpecDecodeError(f"vllm-ngram: unknown options {sorted(unknown)}; it takes "
                                  "num_draft_tokens, prompt_lookup_min, prompt_lookup_max")
        return {"method": "ngram", "num_speculative_tokens": k,
                "prompt_lookup_max": int(options.get("prompt_lookup_max", 3)),
                "prompt_lookup_min": int(options.get("prompt_lookup_min", 1))}, {}
    drafter = name.removeprefix("vllm-specdecode-")
    if drafter not in PROPOSERS:
        raise SpecDecodeError(f"unknown vLLM method {name!r}; known: {', '.join(VLLM_METHODS)}")
    from specdecode.drafters import BuildContext, make_drafter
    from specdecode.integrations.vllm import _Target

    make_drafter(drafter, BuildContext(target=_Target(1000)), num_draft_tokens=k, **options)
    env = {"SPECDECODE_VLLM_OPTIONS": json.dumps(options)} if options else {}
    return {"method": "custom_class", "num_speculative_tokens": k,
            "model": proposer_path(drafter)}, env


@dataclass
class Engine:
    """Where the vLLM workers find the model: directories and the interpreter."""

    model: str
    tokenizer: str
    max_model_len: int | None
    python: str = sys.executable
    dtype: str = "float32"  # the same as our target's (vLLM's CPU build runs float32 and bfloat16)


class Worker:
    """One vLLM engine in a subprocess, answering one request at a time."""

    def __init__(self, spec: str, engine: Engine, config: dict | None, env: dict) -> None:
        self.spec = spec
        payload = {"model": engine.model, "tokenizer": engine.tokenizer, "seed": 0,
                   "max_model_len": engine.max_model_len, "speculative_config": config,
                   "dtype": engine.dtype}
        self.proc = subprocess.Popen(
            [engine.python, "-m", "specdecode.integrations.vllm_worker", json.dumps(payload)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **env})
        ready = self._read()
        if not ready.get("ready"):
            self.close()
            raise SpecDecodeError(f"method {spec!r}: vLLM did not start: "
                                  f"{ready.get('error') or 'no answer'}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-2000:] if self.proc.stderr else ""
            return {"error": f"the worker exited ({self.proc.wait()}): {err.strip()}"}
        return json.loads(line)

    def generate(self, prompt: list[int], **params) -> tuple[list[int], float, dict]:
        self.proc.stdin.write(json.dumps({"prompt": prompt, **params}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise SpecDecodeError(f"method {self.spec!r}: vLLM failed: {reply['error']}")
        return reply["token_ids"], reply["wall_s"], reply.get("spec") or {}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def worker(spec: str, name: str, options: dict, engine: Engine, num_draft_tokens: int,
           workers: dict[str, Worker]) -> Worker:
    """The vLLM worker of ``spec`` in ``workers`` (the run's: ``Settings.vllm_workers``), started
    the first time; closed with ``close_all(workers)`` or at exit."""
    if not workers:
        atexit.register(close_all, workers)
    if spec not in workers:
        config, env = speculative_config(name, options, num_draft_tokens)
        from tqdm import tqdm

        tqdm.write(f"starting vLLM for {spec} ({engine.python})")
        workers[spec] = Worker(spec, engine, config, env)
    return workers[spec]


def close_all(workers: dict[str, Worker]) -> None:
    while workers:
        workers.popitem()[1].close()


def check_vllm_importable(python: str) -> None:
    """A clear error before any work when the interpreter cannot run vLLM."""
    probe = subprocess.run([python, "-c", "import vllm, specdecode"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise SpecDecodeError(f"vLLM methods need an interpreter that imports vllm and "
                              f"specdecode ({python}: {tail}); install the extra "
                              "(pip install 'specdecode[vllm]') or pass --vllm-python")
