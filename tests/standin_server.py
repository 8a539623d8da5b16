"""The local HTTP server both protocol STAND-INs (Ollama, OpenAI) run on, for tests only.

A stand-in subclasses :class:`LocalStandInServer`, gives ``_handler()`` (its
``BaseHTTPRequestHandler``) and ``_url_path`` (what follows host:port in its URL), and
gets start/stop, ``url`` and ``with`` support: one loopback server per instance, on a
free port, served from a daemon thread.
"""
from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Self


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)   # a client that timed out is fine


class LocalStandInServer:
    _url_path = ""
    _server: ThreadingHTTPServer | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise TypeError(f"{type(self).__name__} must define _handler()")

    def start(self) -> Self:
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
               daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}{self._url_path}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
