"""`specdecode drafters`: the registered drafters and policies, with their options."""

from __future__ import annotations

import click


@click.command()
def drafters() -> None:
    """List the registered drafters and policies (plugins included), each with what it needs, the
    first line of its docs and its options (type, default, bounds, who may set it)."""
    from specdecode.drafters import REGISTRY
    from specdecode.policies import POLICIES

    for name, spec in sorted(REGISTRY.items()):
        click.echo(f"{name}  (needs: {spec.needs})\n    {spec.doc}")
        list_options(spec.options)
    click.echo("\npolicies (--policy / policy=...):")
    for name, policy in sorted(POLICIES.items()):
        doc = " ".join((policy.factory.__doc__ or "").strip().split("\n\n")[0].split())
        click.echo(f"{name}\n    {doc}")
        list_options(policy.options)


def list_options(table: dict) -> None:
    if not table:
        click.echo("    options: none")
    for name, opt in table.items():
        default = "required" if opt.required else f"default {opt.default!r}"
        click.echo(f"    {name}: {opt.describe()}; {default}")
