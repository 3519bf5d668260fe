"""PNG plots of a benchmark report: speedup per category per method, accept-length histogram, the
draft budget along one generation, the verification cost curve c(n)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from specdecode.bench.report import OVERALL, load_answers  # noqa: E402
from specdecode.bench.runner import method_file  # noqa: E402


def plot_speedups(report: dict, path: Path) -> None:
    methods = [m for m in report["methods"] if m != "vanilla"]
    groups = [OVERALL] + report["categories"]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.9), 4.5))
    for i, spec in enumerate(methods):
        values = [report["table"][spec][g]["speedup"] or 0.0 for g in groups]
        label = spec + (" (differs)" if spec in report["flagged"] else "")
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups, rotation=45,
                  ha="right")
    ax.set_ylabel("speedup over vanilla")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accept_lengths(out_dir: Path, report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in report["methods"]:
        lengths = [a for row in load_answers(method_file(out_dir, spec)).values()
                   for a in row["choices"][0]["accept_lengths"]]
        if spec == "vanilla" or not lengths:
            continue
        bins = range(1, max(lengths) + 2)
        ax.hist(lengths, bins=bins, alpha=0.5, label=spec, density=True, align="left")
    ax.set_xlabel("tokens emitted per step (accepted draft tokens + 1)")
    ax.set_ylabel("fraction of steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_budgets(out_dir: Path, report: dict, path: Path) -> None:
    """The draft depth each step's policy allowed along the first question's first turn (0: a
    plain step), for every method whose budget is a decision (not ``policy=fixed``)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    styles = ["-", "--", ":", "-."]
    plotted = 0
    for spec in report["methods"]:
        rows = load_answers(method_file(out_dir, spec))
        first = rows[min(rows)]["choices"][0] if rows else {}
        planned = first.get("planned_per_step") or []
        if spec in ("vanilla", report.get("oracle")) or "policy=fixed" in spec or not planned:
            continue
        ax.step(range(len(planned[0])), planned[0], where="post", label=spec, alpha=0.85,
                linestyle=styles[plotted // 10 % len(styles)])
        plotted += 1
    if plotted:
        ax.set_xlabel("verification step (first question, first turn)")
        ax.set_ylabel("draft depth allowed (0 = plain step)")
        ax.set_ylim(-0.5, 16.5)  # a first, unrestricted step allows the whole remaining output
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost_curve(curve_ms: dict, path: Path) -> None:
    """c(n) / c(0): what verifying n draft nodes costs relative to one plain step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for shape, points in curve_ms.items():
        xs = sorted(int(n) for n in points)
        base = points["0"]
        ax.plot(xs, [points[str(n)] / base for n in xs], marker="o", label=shape)
    ax.set_xlabel("draft nodes n")
    ax.set_ylabel("c(n) / c(0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
