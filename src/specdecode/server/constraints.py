"""Structured output in a request body: OpenAI's ``response_format`` (``{"type": "json_object"}``,
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``, ``{"type": "text"}``)
and vLLM's ``structured_outputs`` (``{"json": schema} | {"regex": ...} | {"grammar": ...} |
{"json_object": true}``), compiled once per schema (``structured.compile_constraint``' LRU); a bad
one is a 400 naming the problem."""

from __future__ import annotations

from typing import Any

from specdecode.server.protocol import APIError
from specdecode.types import SpecDecodeError

STRUCTURED_KEYS = ("json", "regex", "grammar", "json_object")


def request_spec(response_format: Any, structured_outputs: Any) -> dict[str, Any] | None:
    """The constraint the body asks for (``structured.parse_spec``'s shape), or None."""
    spec = None
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise APIError(400, "response_format must be an object", param="response_format")
        kind = response_format.get("type")
        if kind == "json_object":
            spec = {"json_object": True}
        elif kind == "json_schema":
            inner = response_format.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.json_schema.schema must be a JSON schema "
                               "object", param="response_format")
            spec = {"json": schema}
        elif kind != "text":
            raise APIError(400, "response_format.type must be text, json_object or json_schema",
                           param="response_format")
    if structured_outputs is not None:
        if spec is not None:
            raise APIError(400, "give response_format or structured_outputs, not both",
                           param="structured_outputs")
        given = [k for k in STRUCTURED_KEYS if isinstance(structured_outputs, dict)
                 and structured_outputs.get(k) not in (None, False)]
        if len(given) != 1 or len(structured_outputs) != 1:
            raise APIError(400, "structured_outputs takes exactly one of "
                           f"{', '.join(STRUCTURED_KEYS)}", param="structured_outputs")
        spec = dict(structured_outputs)
    return spec


def request_constraint(req, tokenizer) -> dict[str, Any]:
    """``{"constraint": compiled}`` for the engine's options, or ``{}``; 400 on a bad one."""
    extra = req.model_extra or {}
    spec = request_spec(extra.get("response_format"), extra.get("structured_outputs"))
    if spec is None:
        return {}
    from specdecode.structured import compile_constraint
    where = "structured_outputs" if "structured_outputs" in extra else "response_format"
    try:
        return {"constraint": compile_constraint(spec, tokenizer)}
    except SpecDecodeError as err:
        raise APIError(400, f"{where}: {err}", param=where) from None
