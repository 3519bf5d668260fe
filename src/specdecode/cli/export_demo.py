"""`specdecode export-demo`: the trained demo pair into the package."""

from __future__ import annotations

import json
from pathlib import Path

import click

from specdecode.types import SpecDecodeError


@click.command("export-demo")
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("work/demo"),
              show_default=True)
def export_demo_cmd(work_dir: Path) -> None:
    """Copy the trained demo pair (fp16 safetensors) into the package's demo_models/."""
    from specdecode.demo import export_demo

    try:
        click.echo(json.dumps(export_demo(work_dir)))
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
