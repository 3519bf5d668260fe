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


# A --prompts-file JSONL line's own constraint: field -> constraint kind (structured.parse_spec)
ROW_FIELDS = {"json_schema": "json", "regex": "regex", "grammar": "grammar", "choice": "choice"}
ROW_HELP = ("A JSONL line may carry its own constraint, which replaces the command line's for that "
            "prompt: \"json_schema\" (a schema object), \"regex\", \"grammar\" (Lark / GBNF text) "
            "or \"choice\" (a list of strings).")


def row_constraints(path: Path, fallback: Any, tokenizer) -> list[Any] | None:
    """The compiled constraint of every prompt in ``path`` (its non-empty lines, as
    ``read_prompts`` reads them): the line's own (``ROW_FIELDS``, JSONL only), else ``fallback``
    (the command line's); None when no prompt has one. Raises ``SpecDecodeError`` naming the
    line."""
    from specdecode.structured import compile_constraint

    rows: list[Any] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line) if path.suffix == ".jsonl" else {}
        given = [k for k in ROW_FIELDS if isinstance(row, dict) and row.get(k) is not None]
        if len(given) > 1:
            raise SpecDecodeError(f"{path}:{n}: give at most one of {', '.join(ROW_FIELDS)}")
        if not given:
            rows.append(fallback)
            continue
        try:
            rows.append(compile_constraint({ROW_FIELDS[given[0]]: row[given[0]]}, tokenizer))
        except SpecDecodeError as err:
            raise SpecDecodeError(f"{path}:{n}: {err}") from None
    return rows if any(r is not None for r in rows) else None
