"""The API key: with ``--api-key`` (or ``SPECDECODE_API_KEY``) every route but the public ones needs
``Authorization: Bearer KEY``; anything else gets 401 in OpenAI's error JSON before the app runs."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse

from specdecode.server.metrics import ServerMetrics
from specdecode.server.protocol import APIError


class ApiKeyGuard:
    """An ASGI wrapper: checks the key of every HTTP request whose path is not in ``public``."""

    def __init__(self, app: Any, key: str, public: frozenset[str], metrics: ServerMetrics) -> None:
        self.app, self.key, self.public, self.metrics = app, key.encode(), public, metrics

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.public or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        self.metrics.error(401)
        err = APIError(401, "missing or incorrect API key: send the header "
                       "'Authorization: Bearer KEY'", kind="invalid_request_error")
        await JSONResponse(err.body(), status_code=401,
                           headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
