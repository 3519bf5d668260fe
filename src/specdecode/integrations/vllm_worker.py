"""One vLLM engine answering generation requests over stdin / stdout, for ``specdecode bench``'s vLLM
methods (``specdecode.bench.vllm_peer`` starts it; not meant to be run by hand).

    python -m specdecode.integrations.vllm_worker '{"model": DIR, "tokenizer": DIR, ...}'

The argument is a JSON object: ``model``, ``tokenizer``, ``max_model_len``, ``seed`` and
``speculative_config`` (vLLM's, or null). The worker prints one JSON line ``{"ready": ...}`` once
the engine is built, then answers each request line ``{"prompt": [ids], "max_tokens": n,
"temperature": t, "top_k": k, "top_p": p, "seed": s}`` with ``{"token_ids": [...], "wall_s": x}``
(the time of ``LLM.generate`` alone: prefill and decoding of that one request) and ``"spec"``,
vLLM's speculative-decoding counters for that request (``num_drafts``, ``num_draft_tokens``,
``num_accepted_tokens``), or ``{"error": msg}``. vLLM's own logs go to stderr: file descriptor 1
is pointed at stderr before vLLM is imported and the answers go to a private copy of the original
stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything vLLM prints lands on stderr, never in the answers
    sys.stdout = sys.stderr
    config = json.loads(argv[0])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
    try:
        import vllm

        llm = vllm.LLM(model=config["model"], tokenizer=config["tokenizer"],
                       dtype=config.get("dtype", "float32"),
                       enforce_eager=True, kv_cache_memory_bytes=config.get("kv_bytes", 1 << 30),
                       max_model_len=config.get("max_model_len"), max_num_seqs=8,
                       seed=config.get("seed", 0), disable_log_stats=False,
                       speculative_config=config.get("speculative_config"))
    except Exception as err:  # noqa: BLE001 - reported to the benchmark, which names the method
        answers.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
        return 1
    answers.write(json.dumps({"ready": True, "vllm": vllm.__version__}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            temperature = float(request.get("temperature", 0.0))
            params = vllm.SamplingParams(
                max_tokens=int(request["max_tokens"]), temperature=temperature,
                top_k=int(request.get("top_k") or 0) or -1 if temperature > 0 else -1,
                top_p=float(request.get("top_p", 1.0)) if temperature > 0 else 1.0,
                seed=request.get("seed") if temperature > 0 else None)
            prompt = vllm.TokensPrompt(prompt_token_ids=[int(t) for t in request["prompt"]])
            before = _spec_counters(llm)
            start = time.perf_counter()
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            wall = time.perf_counter() - start
            after = _spec_counters(llm)
            reply = {"token_ids": list(out.outputs[0].token_ids), "wall_s": wall,
                     "spec": {k: after[k] - before.get(k, 0) for k in after}}
        except Exception as err:  # noqa: BLE001
            reply = {"error": f"{type(err).__name__}: {err}"}
        answers.write(json.dumps(reply) + "\n")
    return 0


def _spec_counters(llm) -> dict[str, int]:
    """vLLM's speculative-decoding counters (num_drafts, num_draft_tokens, num_accepted_tokens)."""
    prefix = "vllm:spec_decode_"
    out = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    for metric in llm.get_metrics():
        key = metric.name.removeprefix(prefix)
        if metric.name.startswith(prefix) and key in out:
            out[key] += int(metric.value)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
