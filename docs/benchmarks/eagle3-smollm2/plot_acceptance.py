"""Held-out acceptance of an EAGLE-3 head against the training tokens it has seen, from a
training run's ``eval.log`` (``specdecode train-drafter --kind eagle3 --out RUN``):

    python docs/benchmarks/eagle3-smollm2/plot_acceptance.py RUN/eval.log OUT.png

Plots top-1 agreement with the target at draft depths 1..5 and the greedy chain's mean accepted
length (right axis) per evaluation."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(log: str, out: str) -> None:
    entries = [json.loads(line) for line in open(log) if line.strip()]
    entries.sort(key=lambda e: e["tokens_seen"])
    tokens = [e["tokens_seen"] / 1e6 for e in entries]
    fig, ax = plt.subplots(figsize=(7, 4))
    depths = len(entries[-1]["heldout"]["top1"])
    for k in range(depths):
        ax.plot(tokens, [e["heldout"]["top1"][k] for e in entries], marker="o",
                label=f"top-1, depth {k + 1}")
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("held-out top-1 agreement with the target")
    ax.set_ylim(0, 1)
    right = ax.twinx()
    right.plot(tokens, [e["heldout"]["accept_length"][-1] for e in entries], "k--", marker="s",
               label="greedy chain accepted length (depth 5)")
    right.set_ylabel("accepted tokens per chain step")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
