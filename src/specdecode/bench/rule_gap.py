"""How far the multi-draft rules are from the optimum on real steps (offline grader).

For target/draft distributions taken from real decoding steps (the demo pair by default: the
target's continuation of Spec-Bench first turns, sampled at ``--temperature``), the probability
that one of ``n`` i.i.d. drafts of the next token is accepted, computed exactly:

- recursive rejection (SpecInfer): 1 - prod_i (1 - beta_i), beta_i = sum min(residual_i, draft)
  with residual_1 = target and residual_{i+1} = norm(max(0, residual_i - draft));
- SpecTr's k-sequential rule with its smallest valid rho (``verify/spectr.py``):
  1 - (1 - beta(rho))^n, beta(rho) = sum min(draft, target / rho);
- the optimum alpha* (Hu et al., ICLR 2025, ``verify/optimal.py``): the minimum over token sets S
  of 1 - target(S) + 1 - (1 - draft(S))^n, over the threshold sets of the target/draft ratio
  (vectorised here for a full vocabulary).

``python -m specdecode.bench.rule_gap [--steps-per-question 4] [--drafts 1,2,3]`` prints a
markdown table (means over the sampled steps).
"""

from __future__ import annotations

import statistics

import click
import torch

from specdecode.verify.spectr import overlap, smallest_rho


def recursive_acceptance(target: torch.Tensor, draft: torch.Tensor, n: int) -> float:
    residual, missed = target.double(), 1.0
    draft = draft.double()
    for _ in range(n):
        beta = float(torch.minimum(residual, draft).sum())
        missed *= 1.0 - beta
        rest = (residual - draft).clamp(min=0)
        if float(rest.sum()) <= 0:
            break
        residual = rest / rest.sum()
    return 1.0 - missed


def spectr_acceptance(target: torch.Tensor, draft: torch.Tensor, n: int) -> float:
    target, draft = target.double(), draft.double()
    rho = smallest_rho(target, draft, n)
    return 1.0 - (1.0 - float(overlap(target, draft, rho))) ** n


def optimal_acceptance(target: torch.Tensor, draft: torch.Tensor, n: int) -> float:
    target, draft = target.double(), draft.double()
    ratio = target / draft.clamp(min=1e-300)
    order = torch.argsort(ratio, descending=True)
    in_target = torch.cat([torch.zeros(1, dtype=torch.float64), target[order].cumsum(0)])
    in_draft = torch.cat([torch.zeros(1, dtype=torch.float64), draft[order].cumsum(0)])
    values = 1.0 - in_target + 1.0 - (1.0 - in_draft.clamp(max=1.0)) ** n
    return float(values.min())


@torch.inference_mode()
def real_steps(temperature: float, per_question: int, tokens: int) -> list[tuple]:
    """(target_probs, draft_probs) at ``per_question`` positions of the demo target's sampled
    continuation of each quick-set first turn."""
    import specdecode as sd
    from specdecode.chat import chat_prompt
    from specdecode.questions import load_questions

    demo = sd.load_demo()
    steps = []
    for q in load_questions(None, None, 1):
        prompt = chat_prompt(demo.tokenizer, [{"role": "user", "content": q.turns[0]}])
        out = sd.generate(demo.target, prompt, drafter="none", max_new_tokens=tokens, seed=0,
                          temperature=temperature, sampling="coupled").token_ids
        ids = torch.tensor([prompt + out])
        target_logits = demo.target(ids).logits[0].float()
        draft_logits = demo.draft(ids).logits[0].float()
        for k in range(per_question):
            pos = len(prompt) - 1 + (k * len(out)) // max(1, per_question)
            steps.append((torch.softmax(target_logits[pos] / temperature, -1),
                          torch.softmax(draft_logits[pos] / temperature, -1)))
    return steps


@click.command()
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--steps-per-question", type=int, default=4, show_default=True)
@click.option("--tokens", type=int, default=32, show_default=True,
              help="Length of each sampled continuation the steps are taken from.")
@click.option("--drafts", default="1,2,3", show_default=True, help="Numbers of i.i.d. drafts.")
def main(temperature: float, steps_per_question: int, tokens: int, drafts: str) -> None:
    """Mean first-token acceptance of recursive rejection and SpecTr vs the optimum."""
    if temperature <= 0 or steps_per_question < 1 or tokens < 1:
        raise click.UsageError("--temperature, --steps-per-question and --tokens must be > 0")
    counts = [int(n) for n in drafts.split(",") if n.strip()]
    steps = real_steps(temperature, steps_per_question, tokens)
    click.echo(f"{len(steps)} real steps of the demo pair (13 quick-set first turns, "
               f"temperature {temperature})\n")
    click.echo("| drafts | recursive rejection | SpecTr | optimum alpha* | gap RRS | gap SpecTr |")
    click.echo("|---|---|---|---|---|---|")
    for n in counts:
        rrs = statistics.mean(recursive_acceptance(t, d, n) for t, d in steps)
        spectr = statistics.mean(spectr_acceptance(t, d, n) for t, d in steps)
        best = statistics.mean(optimal_acceptance(t, d, n) for t, d in steps)
        click.echo(f"| {n} | {rrs:.4f} | {spectr:.4f} | {best:.4f} | {best - rrs:.4f} | "
                   f"{best - spectr:.4f} |")


if __name__ == "__main__":
    main()
