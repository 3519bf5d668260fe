"""`specdecode bench`: Spec-Bench speedup and MAT for every method against vanilla, in one run."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from pathlib import Path

import click
from tqdm import tqdm

from specdecode.cli.shared import (
    check_policy_name,
    int_list,
    load_models,
    model_id,
    model_options,
    quiet_transformers,
)
from specdecode.types import SpecDecodeError
from specdecode.verify import SAMPLING_MODES

DEFAULT_METHODS = ("vanilla,ngram,suffix,sam,token-recycling,lookahead,mix,draft-model,layer-skip,"
                   "eagle,medusa,oracle,hf-generate,hf-pld,hf-assisted")
# --workload json: every method constrained by each question's schema, plus unconstrained vanilla
JSON_METHODS = ("vanilla,vanilla:constrained=false,ngram,suffix,draft-model,grammar,"
                "mix:sources=grammar+suffix,oracle")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model_id: str, draft_id: str | None, settings: dict, model=None) -> dict:
    import tokenizers
    import torch
    import transformers

    import specdecode
    from specdecode.models.cpu import cpu_path

    param = next(model.parameters()) if model is not None else None
    return {"model_id": model_id, "draft_id": draft_id, "cpu": cpu_name(), "cpu_path": cpu_path(),
            "threads": torch.get_num_threads(),
            "dtype": str(param.dtype).removeprefix("torch.") if param is not None else "float32",
            "device": str(param.device) if param is not None else "cpu",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "specdecode": specdecode.__version__,
            "command": "specdecode " + shlex.join(sys.argv[1:]), **settings}


@click.command("bench")
@model_options()
@click.option("--methods", default=DEFAULT_METHODS, show_default=True,
              help="Comma-separated methods: vanilla; our drafters, each optionally with options "
                   "as name:key=value:key=value (e.g. ngram:max_n=4:num_draft_tokens=6); oracle "
                   "(proposes vanilla's output: the physical bound); hf-generate, hf-pld and "
                   "hf-assisted (transformers' own generate: plain, with prompt lookup, with "
                   "assisted generation); vllm, vllm-ngram and "
                   "vllm-specdecode-ngram|suffix|sam (vLLM's engine in a subprocess: alone, with "
                   "its own prompt lookup, with our drafters as its proposers).")
@click.option("--datastore", type=click.Path(path_type=Path), default=None,
              help="REST datastore directory (`specdecode datastore build`); given, the default "
                   "methods include rest, and every rest method without datastore=... uses it.")
@click.option("--workload", type=click.Choice(["spec-bench", "json"]), default="spec-bench",
              show_default=True, help="json: 40 JSON-extraction requests, each constrained by its "
                                      "own schema (structured output; default methods: "
                                      + JSON_METHODS + ").")
@click.option("--questions", "questions_file", type=click.Path(path_type=Path), default=None,
              help="Spec-Bench question.jsonl (default: the copy shipped in the package).")
@click.option("--categories", default=None, help="Comma-separated categories (default: all 13).")
@click.option("--limit-per-category", type=int, default=None, help="At most K questions each.")
@click.option("--max-new-tokens", type=int, default=None, help="Per turn (default 128; quick: 64).")
@click.option("--num-draft-tokens", type=int, default=4, show_default=True,
              help="Draft budget of every method that takes one (oracle and hf-pld included).")
@click.option("--policy", default=None, callback=check_policy_name,
              help="Draft-budget policy (a registered one) of every method without its own "
                   "policy=... (default: the library's default).")
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--sampling", type=click.Choice(list(SAMPLING_MODES)), default="coupled",
              show_default=True, help="Our sampling rule when --temperature > 0.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Time each generation this many times and keep the median.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench_out"),
              show_default=True, help="Output directory (rerun with the same one to resume).")
@click.option("--quick", is_flag=True,
              help="About 2 minutes on a 2-core CPU: 2 questions per category, 64 new tokens.")
@click.option("--allow-lossy", is_flag=True, help="Rank methods whose outputs differ from vanilla.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
@click.option("--batch-size", "batch_sizes", default=None, metavar="B[,B...]",
              help="Batch mode: stream the questions' first turns through the continuous-"
                   "batching scheduler with B requests in flight (e.g. 1,2,4,8), every method "
                   "plus transformers' padded batch generate (hf-batch); writes batch.md and "
                   "batch.json (aggregate tokens/s, latency, per-row equality with batch-1 "
                   "vanilla). With --workload json every row runs under its question's schema "
                   "(checked against constrained batch-1 vanilla; no hf-batch).")
@click.option("--vllm-python", default=None, metavar="PYTHON",
              help="Interpreter that runs the vLLM methods' engines (it must import vllm and "
                   "specdecode; default: this one).")
@click.option("--report-only", is_flag=True,
              help="Run nothing: rebuild the report from the answers already in --out (e.g. of "
                   "a run still going or interrupted).")
def bench(target, draft_model, dtype, device, exact, compile_forward, methods, datastore, workload,
          questions_file, categories,
          limit_per_category, max_new_tokens, num_draft_tokens, policy, temperature, sampling, seed,
          repeats, out_dir, quick, allow_lossy, threads, batch_sizes, vllm_python, report_only) -> None:
    """Run Spec-Bench questions with every method, interleaved per question, and write answer
    JSONL (Spec-Bench schema), report.json, report.md and plots to --out. The last line printed is a
    one-line JSON summary."""
    import torch

    from specdecode.bench.methods import Settings, check_specs, needs_answer, needs_draft, parse_spec
    from specdecode.bench.prompts import describe
    from specdecode.bench.runner import load_skipped, run_benchmark
    from specdecode.bench.vllm_peer import check_vllm_importable, is_vllm
    from specdecode.drafters.registry import Needs, drafters_needing
    from specdecode.models import context_length
    from specdecode.models.exact import default_exact
    from specdecode.models.heads import shipped_head_dir
    from specdecode.questions import load_questions

    if report_only:
        run_file = out_dir / "run.json"
        if not run_file.exists():
            raise click.ClickException(f"{out_dir} holds no benchmark run (no run.json)")
        write_report(out_dir, json.loads(run_file.read_text()), load_skipped(out_dir), allow_lossy)
        return
    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    if quick:
        limit_per_category = limit_per_category or 2
        max_new_tokens = max_new_tokens or 64
    max_new_tokens = max_new_tokens or 128
    if workload == "json":
        from specdecode.bench.json_workload import workload_path
        questions_file = questions_file or workload_path()
        methods = JSON_METHODS if methods == DEFAULT_METHODS else methods
    if batch_sizes is not None:
        sizes = int_list(batch_sizes, "--batch-size", 1, "batch sizes")
    defaults = methods == DEFAULT_METHODS
    if datastore is not None and defaults:
        methods = methods.replace(",mix,", ",rest,mix,")
    specs = [m.strip() for m in methods.split(",") if m.strip()]
    specs = sorted(specs, key=lambda m: (parse_spec(m)[0] != "vanilla", needs_answer(m)))
    if repeats < 1 or max_new_tokens < 1 or num_draft_tokens < 1:
        raise click.UsageError("--repeats, --max-new-tokens and --num-draft-tokens must be >= 1")
    try:
        draft_needed = any(needs_draft(m) for m in specs)
        # a target without --draft-model may have a draft shipped for it (checked once loaded)
        check_specs(specs, has_draft=True)
        cats = [c.strip() for c in categories.split(",")] if categories else None
        questions = load_questions(questions_file, cats, limit_per_category)
        uses_vllm = any(is_vllm(parse_spec(m)[0]) for m in specs)
        if uses_vllm and batch_sizes is not None:
            raise SpecDecodeError("vLLM methods run in the per-question benchmark only (for vLLM "
                                  "with every request in flight: python -m "
                                  "specdecode.integrations.vllm_bench)")
        if uses_vllm:
            check_vllm_importable(vllm_python or sys.executable)
        model, draft, tokenizer = load_models(target, draft_model, draft_needed, dtype=dtype,
                                              device=device, compiled=compile_forward)
        if target is not None and defaults:  # and heads trained for them (eagle:head=DIR)
            specs = [m for m in specs if parse_spec(m)[0] not in drafters_needing(Needs.HEADS)
                     or shipped_head_dir(parse_spec(m)[0], model) is not None]
        if draft is None and draft_needed:  # neither given nor shipped for this target
            if not defaults:
                check_specs(specs, has_draft=False)
            specs = [m for m in specs if not needs_draft(m)]
        target_id = model_id(target, "specdecode-demo-target")
        draft_id = (model_id(draft_model, "") if draft_model else
                    "specdecode-demo-draft" if target is None and draft_needed else
                    None if draft is None else "draft cut from the target, layers " +
                    ",".join(str(i) for i in getattr(draft.config, "draft_layers", [])))
        place = next(model.parameters())
        dtype, device = str(place.dtype).removeprefix("torch."), str(place.device)
        compile_s = None
        if compile_forward:  # compiled now, outside every timed region
            from specdecode.models import warm_up

            compile_s = round(warm_up(model, draft, exact=exact), 1)
            tqdm.write(f"compiled the forward in {compile_s} s (first calls, not timed)")
        if batch_sizes is not None:
            run_batch_mode(model, draft, tokenizer, questions, specs, sizes, out_dir, target_id,
                           draft_id, max_new_tokens=max_new_tokens,
                           num_draft_tokens=num_draft_tokens, temperature=temperature,
                           seed=seed, sampling=sampling, policy=policy, repeats=repeats,
                           datastore=datastore, exact=exact)
            return
        settings = {"model_id": target_id, "draft_id": draft_id, "methods": specs,
                    "dtype": dtype, "device": device,
                    "exact": default_exact(place.dtype) if exact is None else exact,
                    "max_new_tokens": max_new_tokens, "num_draft_tokens": num_draft_tokens,
                    "temperature": temperature, "workload": workload,
                    "sampling": sampling, "seed": seed, "repeats": repeats,
                    "datastore": str(datastore) if datastore else None, "policy": policy,
                    "compiled": bool(compile_forward),
                    "questions": [q.question_id for q in questions]}
        out_dir.mkdir(parents=True, exist_ok=True)
        run_file = out_dir / "run.json"
        if run_file.exists() and json.loads(run_file.read_text()) != settings:
            raise SpecDecodeError(f"{out_dir} holds a run with other settings; use another --out "
                                  "(or delete it) to start afresh")
        run_file.write_text(json.dumps(settings))
        env = environment(target_id, draft_id, {k: settings[k] for k in (
            "temperature", "sampling", "seed", "max_new_tokens", "num_draft_tokens", "repeats",
            "policy")}, model)
        env["cost_curve_ms"] = cost_curve_ms(model, settings["exact"])
        env["prompt_format"] = describe(tokenizer)  # bench/prompts.py
        env["exact"] = settings["exact"]
        env["compiled"], env["compile_s"] = bool(compile_forward), compile_s
        (out_dir / "environment.json").write_text(json.dumps(env, indent=2))
        s = Settings(target=model, draft=draft, max_new_tokens=max_new_tokens,
                     num_draft_tokens=num_draft_tokens, temperature=temperature, seed=seed,
                     sampling=sampling, pad_token_id=tokenizer.pad_token_id or 0,
                     datastore=str(datastore) if datastore else None, policy=policy,
                     exact=settings["exact"], tokenizer=tokenizer,
                     vllm=vllm_engine(target, model, vllm_python) if uses_vllm else None)
        skipped = run_benchmark(questions, specs, s, tokenizer, out_dir,
                                context_length(model.config), repeats, target_id)
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    write_report(out_dir, settings, skipped, allow_lossy)


def vllm_engine(target: str | None, model, python: str | None):
    """Where the vLLM methods' engines load the same target and tokenizer."""
    from specdecode.bench.vllm_peer import Engine
    from specdecode.models import context_length

    if target is None:
        from specdecode.demo import demo_dir

        target_dir, tokenizer_dir = str(demo_dir() / "target"), str(demo_dir() / "tokenizer")
    else:
        from specdecode.models.sources import resolve_source

        target_dir = tokenizer_dir = str(resolve_source(target).resolve())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return Engine(target_dir, tokenizer_dir, context_length(model.config), python or sys.executable,
                  dtype)


def run_batch_mode(model, draft, tokenizer, questions, specs, sizes, out_dir: Path, model_id: str,
                   draft_id: str | None, *, max_new_tokens: int, num_draft_tokens: int,
                   temperature: float, seed: int, sampling: str, policy: str | None,
                   repeats: int, datastore: Path | None, exact: bool | None = None) -> None:
    """``--batch-size``: the first turns through the scheduler; writes batch.md / batch.json."""
    from specdecode.api import _eos_ids
    from specdecode.bench.batch import run_batch_benchmark, write_batch_report
    from specdecode.bench.methods import Settings
    from specdecode.bench.prompts import describe, first_turn
    from specdecode.models import context_length

    limit = context_length(model.config)
    prompts = [first_turn(tokenizer, q.turns[0]) for q in questions]
    keep = [i for i, p in enumerate(prompts) if limit is None or len(p) + max_new_tokens <= limit]
    prompts = [prompts[i] for i in keep]
    # the JSON workload: every row under its own question's schema
    constraints = [{"json": questions[i].schema} if questions[i].schema is not None else None
                   for i in keep]
    s = Settings(target=model, draft=draft, max_new_tokens=max_new_tokens,
                 num_draft_tokens=num_draft_tokens, temperature=temperature, seed=seed,
                 sampling=sampling, pad_token_id=tokenizer.pad_token_id or 0,
                 datastore=str(datastore) if datastore else None, policy=policy, exact=exact,
                 tokenizer=tokenizer)
    env = environment(model_id, draft_id, {
        "temperature": temperature, "sampling": sampling, "seed": seed,
        "max_new_tokens": max_new_tokens, "num_draft_tokens": num_draft_tokens,
        "repeats": repeats, "policy": policy, "batch_sizes": sizes}, model)
    env["prompt_format"] = describe(tokenizer)
    rows = run_batch_benchmark(prompts, specs, sizes, s, _eos_ids(model, None), repeats,
                               constraints=constraints if any(constraints) else None)
    click.echo(write_batch_report(out_dir, rows, env))
    click.echo(json.dumps({"out": str(out_dir), "batch": [
        {k: r.get(k) for k in ("method", "batch_size", "tokens_per_s", "speedup_vs_vanilla",
                               "rows_equal", "near_ties", "mismatches")} for r in rows]}))


def cost_curve_ms(model, exact: bool | None = None) -> dict:
    """The verification cost curve the adaptive policy uses on this machine (measured now or
    loaded from its cache), in ms per forward, for the report."""
    from specdecode.policies.cost import measured_curve

    curve = measured_curve(model, exact=exact)
    return {shape: {str(n): round(t * 1e3, 3) for n, t in points.items()}
            for shape, points in curve.items()}


def write_report(out_dir: Path, settings: dict, skipped: list, allow_lossy: bool) -> None:
    """report.json, report.md and plots from the answers in ``out_dir``; prints the table and a
    one-line JSON summary last."""
    from specdecode.bench.methods import is_lossless, needs_answer
    from specdecode.bench.plots import (
        plot_accept_lengths,
        plot_budgets,
        plot_cost_curve,
        plot_speedups,
    )
    from specdecode.bench.report import OVERALL, build_report, markdown

    specs = settings["methods"]
    oracle = next((m for m in specs if needs_answer(m)), None)
    report = build_report(out_dir, specs, {m: is_lossless(m) for m in specs}, oracle, allow_lossy)
    env = json.loads((out_dir / "environment.json").read_text())  # as measured, not as reported
    env["skipped"] = len(skipped)
    report["environment"] = env
    report["skipped"] = [sk.__dict__ for sk in skipped]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    md = markdown(report, env)
    (out_dir / "report.md").write_text(md)
    plot_speedups(report, out_dir / "speedup_by_category.png")
    plot_accept_lengths(out_dir, report, out_dir / "accept_lengths.png")
    plot_budgets(out_dir, report, out_dir / "budget_per_step.png")
    if env.get("cost_curve_ms"):
        plot_cost_curve(env["cost_curve_ms"], out_dir / "cost_curve.png")
    click.echo(md)
    overall = {m: report["table"][m][OVERALL] for m in specs}
    click.echo(json.dumps({"out": str(out_dir), "questions": report["questions"],
                           "speedup": {m: c["speedup"] for m, c in overall.items()},
                           "mat": {m: c["mat"] for m, c in overall.items()},
                           "identical": {m: c["identical"] for m, c in overall.items()},
                           "flagged": report["flagged"], "ranking": report["ranking"]}))
