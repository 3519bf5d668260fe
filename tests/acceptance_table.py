"""Expected accepted draft tokens per step, by exact enumeration, for every rule on the toy cases of
tests/test_verify_*.py: ``python tests/acceptance_table.py`` prints a markdown table (about 20 s).

Chains: token-level rejection sampling vs block vs traversal (= block on a chain). Trees (children
i.i.d. or without replacement): recursive rejection (SpecInfer / RRSw) vs traversal vs SpecTr
(i.i.d. siblings only; without replacement it falls back to RRSw). One level of n drafts: each
rule's Pr(first token accepted) vs the optimal alpha* of Hu et al.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from helpers.exact_enumeration import (  # noqa: E402
    chain_parents,
    enumerate_step,
    expected_accepted,
    token_level,
    toy_row,
    tree_step,
)
from helpers.rules import block_rule, spectr_rule  # noqa: E402

from specdecode.verify.optimal import optimal_acceptance  # noqa: E402
from specdecode.verify.traversal import traversal_accept  # noqa: E402

TREES = {"2 drafts, depth 1": [-1, -1], "3 drafts, depth 1": [-1, -1, -1],
         "2 chains, depth 2": [-1, -1, 0, 1], "bushy, depth 2": [-1, -1, 0, 0],
         "chain then 3 children": [-1, 0, 0, 0]}


def f(x: Fraction) -> str:
    return f"{float(x):.4f}"


def main() -> None:
    print("| chain | vocab | token-level | block | traversal |")
    print("|---|---|---|---|---|")
    for k in (2, 3):
        for vocab in (3, 4, 5):
            row = [expected_accepted(tree_step(rule, chain_parents(k), vocab))
                   for rule in (token_level, block_rule(), traversal_accept)]
            print(f"| k={k} | {vocab} | " + " | ".join(f(x) for x in row) + " |")
    print("\n| tree | vocab | draws | recursive rejection | traversal | spectr |")
    print("|---|---|---|---|---|---|")
    for name, parents in TREES.items():
        for vocab in (3, 4):
            for replacement in (True, False):
                row = [expected_accepted(tree_step(rule, parents, vocab, replacement=replacement))
                       for rule in (token_level, traversal_accept, spectr_rule())]
                draws = "iid" if replacement else "w/o repl."
                print(f"| {name} | {vocab} | {draws} | " + " | ".join(f(x) for x in row) + " |")
    print("\n| n drafts | vocab | draws | Pr(first accepted): RRS | traversal | spectr | alpha* |")
    print("|---|---|---|---|---|---|---|")
    for n in (2, 3):
        for vocab in (3, 4, 5):
            for replacement in (True, False):
                got = []
                for rule in (token_level, traversal_accept, spectr_rule()):
                    dist = enumerate_step(tree_step(rule, [-1] * n, vocab,
                                                    replacement=replacement)(()))
                    got.append(sum((p for (_, a), p in dist.items() if a), Fraction(0)))
                best = optimal_acceptance(toy_row((), 0, vocab), toy_row((), 1, vocab), n,
                                          replacement=replacement)
                draws = "iid" if replacement else "w/o repl."
                print(f"| {n} | {vocab} | {draws} | " + " | ".join(f(x) for x in got + [best]) + " |")


if __name__ == "__main__":
    main()
