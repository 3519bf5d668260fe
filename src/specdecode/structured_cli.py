"""Command-line flags for structured output (``--json-schema FILE | --regex RE | --grammar FILE``),
shared by ``specdecode generate`` and ``specdecode bench``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from specdecode.types import SpecDecodeError


def constraint_options() -> Callable:
    def wrap(fn: Callable) -> Callable:
        fn = click.option("--grammar", "grammar_file", default=None, metavar="FILE",
                          type=click.Path(exists=True, dir_okay=False, path_type=Path),
                          help="Constrain the output to a Lark grammar (or GBNF, '::=') in FILE "
                               "(needs llguidance: pip install 'specdecode[structured]').")(fn)
        fn = click.option("--regex", default=None, metavar="RE",
                          help="Constrain the output to match RE.")(fn)
        fn = click.option("--json-schema", "json_schema", default=None, metavar="FILE",
                          type=click.Path(exists=True, dir_okay=False, path_type=Path),
                          help="Constrain the output to JSON valid under the schema in FILE.")(fn)
        return fn
    return wrap


def constraint_spec(json_schema: Path | None, regex: str | None,
                    grammar_file: Path | None) -> dict[str, Any] | None:
    """The ``constraint`` the flags ask for (None: none); raises ``SpecDecodeError``."""
    given = [x for x in (json_schema, regex, grammar_file) if x is not None]
    if len(given) > 1:
        raise SpecDecodeError("give at most one of --json-schema, --regex and --grammar")
    if json_schema is not None:
        try:
            return {"json": json.loads(json_schema.read_text())}
        except json.JSONDecodeError as err:
            raise SpecDecodeError(f"invalid JSON schema in {json_schema}: not JSON ({err})") from None
    if regex is not None:
        return {"regex": regex}
    if grammar_file is not None:
        return {"grammar": grammar_file.read_text()}
    return None


def constraint_kwargs(json_schema, regex, grammar_file, tokenizer) -> dict[str, Any]:
    """``generate`` keyword arguments for the flags, the grammar compiled (and checked) now."""
    spec = constraint_spec(json_schema, regex, grammar_file)
    if spec is None:
        return {}
    from specdecode.structured import compile_constraint
    return {"constraint": compile_constraint(spec, tokenizer)}
