"""The listening socket and uvicorn around the app.

The socket is created with ``IPPROTO_TCP`` explicitly: asyncio switches Nagle's algorithm off
(``TCP_NODELAY``) only on accepted sockets whose protocol says TCP, and a socket made with the default
protocol 0 (``socket.create_server``, uvicorn's own binding) inherits 0. With Nagle on, each small
write after the first on a keep-alive connection (a streamed token, a response body after its
headers) waits for the client's delayed ACK: about 40 ms per token on Linux.
"""

from __future__ import annotations

import socket
from typing import Any


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on ``host:port`` (``port`` 0: a free one; read it from ``getsockname()``).

    ``host`` may be a name, an IPv4 or an IPv6 address (brackets allowed). Raises ``OSError`` when
    the address cannot be resolved or bound.
    """
    host = host.strip("[]")
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_server(app: Any, log_level: str = "info"):
    """A ``uvicorn.Server`` for ``app``; run it with ``server.run(sockets=[listen(host, port)])``. The app's
    lifespan runs, so its engines' threads stop when the server does."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2))
