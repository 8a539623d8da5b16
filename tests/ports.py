"""Free localhost ports and ZeroMQ addresses for tests (free when asked: bind, read, close)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_addr() -> str:
    """A ZeroMQ TCP address on localhost nobody listens on (now)."""
    return f"tcp://127.0.0.1:{free_port()}"
