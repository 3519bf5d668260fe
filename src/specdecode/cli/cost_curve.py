"""`specdecode cost-curve`: the target's measured verification cost c(n)."""

from __future__ import annotations

import json

import click

from specdecode.cli.shared import int_list, load_models, model_options, quiet_transformers
from specdecode.types import SpecDecodeError


@click.command("cost-curve")
@model_options(draft=False)
@click.option("--context", type=int, default=256, show_default=True,
              help="Tokens already in the cache.")
@click.option("--nodes", default="0,1,2,3,4,6,8,12,16,24,32,48,64", show_default=True,
              help="Comma-separated draft node counts.")
@click.option("--repeats", type=int, default=15, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
def cost_curve(target, dtype, device, exact, compile_forward, context, nodes, repeats, threads) -> None:
    """Measure the target's verification cost c(n) (ms per forward over 1 + n tokens), chain and
    tree, and print one JSON line per n. Run it with nothing else busy on the machine."""
    import torch

    from specdecode.models.exact import default_exact
    from specdecode.policies.cost import verify_cost_curve

    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    counts = int_list(nodes, "--nodes", 0, "node counts")
    try:
        model, _, _ = load_models(target, None, False, dtype=dtype, device=device,
                                  compiled=compile_forward)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and context + max(counts) + 1 > limit:
            raise SpecDecodeError(f"--context {context} + {max(counts)} nodes exceeds the model's "
                                  f"{limit}-token context")
        rows = verify_cost_curve(model, sorted(set(counts) | {0}), context, repeats, exact=exact)
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    param = next(model.parameters())
    env = {"threads": torch.get_num_threads(), "context": context, "torch": torch.__version__,
           "exact": default_exact(param.dtype) if exact is None else exact,
           "dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device)}
    for row in rows:
        click.echo(json.dumps({**row, **env}))
