"""`specdecode datastore build | build-demo`: the command line over ``build.py``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from specdecode.datastore.build import build_demo, build_from_files
from specdecode.types import SpecDecodeError


@click.group("datastore")
def datastore() -> None:
    """Build REST datastores (token array + suffix array, memory-mapped) for `--drafter rest`."""


@datastore.command("build")
@click.option("--input", "inputs", multiple=True, required=True, metavar="FILE",
              help="Corpus file or directory (repeatable): .jsonl/.json conversations or text.")
@click.option("--tokenizer", "tokenizer_dir", required=True,
              help="Tokenizer directory (the target model's).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory.")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many corpus tokens.")
@click.option("--vocab-size", type=int, default=None,
              help="The target's vocabulary size when its embedding is padded beyond the tokenizer.")
def build_cmd(inputs, tokenizer_dir, out_dir, max_tokens, vocab_size) -> None:
    """Tokenise FILES into a datastore at OUT (tokens.npy, suffix_array.npy, meta.json)."""
    try:
        meta = build_from_files(inputs, tokenizer_dir, out_dir, max_tokens=max_tokens,
                                vocab_size=vocab_size)
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps({"out": str(out_dir), **meta}))


@datastore.command("build-demo")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory.")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many corpus tokens.")
def build_demo_cmd(out_dir, max_tokens) -> None:
    """A datastore for the demo models from the demo corpus's ShareGPT conversations."""
    try:
        meta = build_demo(out_dir, max_tokens=max_tokens)
    except SpecDecodeError as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps({"out": str(out_dir), **meta}))
