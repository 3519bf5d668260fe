"""The `specdecode` command line: thin adapters over the library API.

``main`` is the command group. Every command is registered at the bottom of this file by its name
and where it lives (``"module:attribute"``), and imported only when it runs or ``--help`` lists
it. Command modules take what every command shares (model options and loading, option parsing)
from ``specdecode.cli.shared``; since this file imports none of them, there is no import circle
however a command module is first imported.

This package holds the core's commands (``generate.py``, ``drafters.py``, ``cost_curve.py``,
``export_demo.py``); a feature's commands live with the feature (``train/``, ``bench/``,
``datastore/``, ``server/``).
"""

from __future__ import annotations

import importlib

import click

from specdecode.types import SpecDecodeError


class LazyGroup(click.Group):
    """A click group whose commands may be registered as ``"module:attribute"``, imported when
    first looked up (``add_command`` takes command objects, as in any click group)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, str] = {}

    def register(self, name: str, where: str) -> None:
        self.lazy[name] = where

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            module, attribute = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specdecode")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE",
              help="Import MODULE first (repeatable): a module that registers drafters or "
                   "policies (also: $SPECDECODE_PLUGINS, comma-separated).")
def main(plugins: tuple[str, ...]) -> None:
    """specdecode: lossless speculative decoding for Hugging Face causal LMs.

    Without --target every command uses the demo model pair shipped in the package.
    """
    from specdecode.plugins import load_plugins

    try:
        load_plugins(plugins)
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None


# The commands: name -> "module:attribute" (a new command: one more line here)
main.register("generate", "specdecode.cli.generate:generate")
main.register("drafters", "specdecode.cli.drafters:drafters")
main.register("cost-curve", "specdecode.cli.cost_curve:cost_curve")
main.register("export-demo", "specdecode.cli.export_demo:export_demo_cmd")
main.register("train-demo", "specdecode.train.cli:train_demo")
main.register("train-drafter", "specdecode.train.drafter_cli:train_drafter")
main.register("build-drafter-data", "specdecode.train.selfdata_cli:build_drafter_data")
main.register("bench", "specdecode.bench.cli:bench")
main.register("datastore", "specdecode.datastore.cli:datastore")
main.register("serve", "specdecode.server.cli:serve")
main.register("bench-serve", "specdecode.server.cli:bench_serve")
