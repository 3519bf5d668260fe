"""A live server on a free loopback port for the server tests (the official openai client talks to
it): the demo pair, its own copy of the models (only its engine thread runs them)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from specdecode.demo import load_demo
from specdecode.server import ServerConfig, create_app


def start_server(config: ServerConfig, log_level: str = "error") -> tuple[uvicorn.Server,
                                                                        threading.Thread]:
    """(server, its thread) once it accepts connections; ``server.url`` and ``server.state`` set.
    Stop it with ``server.should_exit = True``."""
    served = load_demo()
    app = create_app(served.target, served.tokenizer, draft_model=served.draft, config=config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    srv.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.state = app.state.server
    return srv, thread
