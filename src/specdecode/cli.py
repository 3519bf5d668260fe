"""The `specdecode` command line: thin adapters over the library API."""

from __future__ import annotations

import click

from specdecode.train.cli import train_demo


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specdecode")
def main() -> None:
    """specdecode: lossless speculative decoding for Hugging Face causal LMs."""


main.add_command(train_demo)
