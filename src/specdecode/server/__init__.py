"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (``specdecode serve``)."""

from specdecode.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
