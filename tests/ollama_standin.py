"""A STAND-IN for the Ollama server, for tests only. It is not Ollama and runs no model.

No Ollama binary can be installed where the tests run, so this small HTTP server
speaks the documented Ollama REST API closely enough for the real ``ollama`` Python
client: ``POST /api/chat`` (streamed NDJSON and not; empty messages load, and with
``keep_alive: 0`` unload), ``POST /api/embed``, ``GET /api/tags``, ``GET /api/ps``,
``HEAD/POST /api/blobs/:digest`` (sha256-checked), ``POST /api/create`` (``from`` +
``adapters``). Unknown models answer 404 ``model "x" not found, try pulling it first``
as Ollama does. Replies are deterministic (``reply_fn(model, messages)``; default
echoes the last user message). Every request is recorded in ``requests``.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from standin_server import LocalStandInServer


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _details() -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "135M", "quantization_level": "Q4_1"}


class OllamaStandIn(LocalStandInServer):
    """Start with ``with OllamaStandIn(models={...}) as srv: srv.url``."""

    def __init__(self, models: dict[str, int] | None = None,
                 reply_fn: Callable[[str, list[dict]], str] | None = None,
                 chat_delay_s: float = 0.0, embed_dim: int = 8) -> None:
        self.models: dict[str, dict[str, Any]] = {}
        for name, size in (models or {"smollm2:135m": 100_000_000}).items():
            self._add_model(name, size)
        self.reply_fn = reply_fn or (lambda model, msgs: f"echo: {msgs[-1]['content']}")
        self.chat_delay_s = chat_delay_s
        self.embed_dim = embed_dim
        self.loaded: dict[str, float] = {}       # model -> loaded at
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()

    def _add_model(self, name: str, size: int, adapters: dict | None = None,
                   parent: str = "") -> None:
        full = name if ":" in name else name + ":latest"
        self.models[full] = {"name": full, "model": full, "modified_at": _now(), "size": size,
                             "digest": hashlib.sha256(full.encode()).hexdigest(),
                             "details": {**_details(), "parent_model": parent},
                             "adapters": adapters or {}}

    def find(self, name: str) -> str | None:
        full = name if ":" in name else name + ":latest"
        return full if full in self.models else None

    # -- lifecycle -----------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    def embedding(self, text: str) -> list[float]:
        h = hashlib.sha256(text.encode()).digest()
        return [(b - 127.5) / 127.5 for b in h[: self.embed_dim]]


def _handler_for(state: OllamaStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"     # streamed bodies end when the connection closes

        def log_message(self, *a) -> None:   # keep test output quiet
            pass

        def _send(self, code: int, body: Any = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data and self.command != "HEAD":
                self.wfile.write(data)

        def _json(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def _not_found(self, model: str) -> None:
            self._send(404, {"error": f'model "{model}" not found, try pulling it first'})

        # -- routes ------------------------------------------------------------

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path, None))
            if self.path == "/api/tags":
                models = [{k: v for k, v in m.items() if k != "adapters"}
                          for m in state.models.values()]
                return self._send(200, {"models": models})
            if self.path == "/api/ps":
                out = []
                for name in state.loaded:
                    m = state.models[name]
                    out.append({"name": name, "model": name, "size": m["size"],
                                "digest": m["digest"], "details": m["details"],
                                "expires_at": _now(), "size_vram": m["size"]})
                return self._send(200, {"models": out})
            self._send(404, {"error": "not found"})

        def do_HEAD(self) -> None:
            state.requests.append(("HEAD", self.path, None))
            if self.path.startswith("/api/blobs/"):
                digest = self.path.rsplit("/", 1)[1]
                return self._send(200 if digest in state.blobs else 404)
            self._send(404)

        def do_POST(self) -> None:
            if self.path.startswith("/api/blobs/"):
                digest = self.path.rsplit("/", 1)[1]
                n = int(self.headers.get("Content-Length") or 0)
                data = self._read_body(n)
                state.requests.append(("POST", self.path, len(data)))
                if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                    return self._send(400, {"error": "digest mismatch"})
                state.blobs[digest] = data
                return self._send(201)
            body = self._json()
            state.requests.append(("POST", self.path, body))
            route = {"/api/chat": self._chat, "/api/embed": self._embed,
                     "/api/create": self._create}.get(self.path)
            if route is None:
                return self._send(404, {"error": "not found"})
            route(body)

        def _read_body(self, n: int) -> bytes:
            if n:
                return self.rfile.read(n)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return b""

        def _chat(self, body: dict) -> None:
            name = state.find(body.get("model", ""))
            if name is None:
                return self._not_found(body.get("model", ""))
            msgs = body.get("messages") or []
            keep_alive = body.get("keep_alive")
            base = {"model": body["model"], "created_at": _now()}
            if not msgs:     # load or (keep_alive 0) unload
                with state._lock:
                    if keep_alive in (0, "0", "0s"):
                        state.loaded.pop(name, None)
                        reason = "unload"
                    else:
                        state.loaded[name] = time.time()
                        reason = "load"
                return self._send(200, {**base, "message": {"role": "assistant", "content": ""},
                                        "done_reason": reason, "done": True,
                                        "load_duration": 1_000_000})
            with state._lock:
                state.loaded[name] = time.time()
            if state.chat_delay_s:
                time.sleep(state.chat_delay_s)
            opts = body.get("options") or {}
            text = state.reply_fn(name, msgs)
            for s in opts.get("stop") or []:
                if s in text:
                    text = text[:text.index(s)]
            words = [w + " " for w in text.split(" ")]
            words[-1] = words[-1][:-1]
            if "num_predict" in opts:
                words = words[: int(opts["num_predict"])]
            final = {**base, "message": {"role": "assistant", "content": ""}, "done": True,
                     "done_reason": "stop", "total_duration": 2_000_000,
                     "load_duration": 1_000_000, "prompt_eval_count": 5,
                     "eval_count": len(words), "eval_duration": 1_000_000}
            if body.get("stream", True):
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                for w in words:
                    part = {**base, "message": {"role": "assistant", "content": w}, "done": False}
                    self.wfile.write(json.dumps(part).encode() + b"\n")
                    self.wfile.flush()
                self.wfile.write(json.dumps(final).encode() + b"\n")
                return
            final["message"]["content"] = "".join(words)
            self._send(200, final)

        def _embed(self, body: dict) -> None:
            name = state.find(body.get("model", ""))
            if name is None:
                return self._not_found(body.get("model", ""))
            inp = body.get("input", "")
            texts = [inp] if isinstance(inp, str) else list(inp)
            self._send(200, {"model": body["model"],
                             "embeddings": [state.embedding(t) for t in texts]})

        def _create(self, body: dict) -> None:
            base = body.get("from")
            if not base or state.find(base) is None:
                return self._not_found(base or "")
            adapters = body.get("adapters") or {}
            missing = [d for d in adapters.values() if d not in state.blobs]
            if missing:
                return self._send(400, {"error": f"blob {missing[0]} not found"})
            size = state.models[state.find(base)]["size"] + sum(
                len(state.blobs[d]) for d in adapters.values())
            state._add_model(body["model"], size, adapters=adapters, parent=base)
            if body.get("stream", True):
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                for status in ("using existing layer", "writing manifest", "success"):
                    self.wfile.write(json.dumps({"status": status}).encode() + b"\n")
                return
            self._send(200, {"status": "success"})

    return Handler
