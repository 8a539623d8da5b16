"""A STAND-IN for an OpenAI-compatible server, for tests only. It runs no model.

vLLM, llama.cpp's ``llama-server`` and LM Studio all speak the OpenAI chat API; none
can run here (no GPU, no binaries), so this small HTTP server speaks the part of that
protocol the real ``openai`` Python client uses: ``GET /v1/models``, and ``POST
/v1/chat/completions`` streamed (server-sent events, ``data: [DONE]``, a usage chunk
when ``stream_options.include_usage``) and not, honouring ``max_tokens`` (finish
``length``), ``stop`` (finish ``stop`` with vLLM's ``stop_reason``) and taking
``response_format`` (recorded; the reply function decides what "the model" says).
An unknown model answers 404 with vLLM's error body; a wrong key answers 401 when
``api_key`` is set. Replies come from ``reply_fn(model, messages, body)`` (default:
echo the last user message), split into one chunk per word. Every request body is
recorded in ``requests``, and each chat request with the API key it came with in
``calls`` (so a test can tell clients apart by key); a stream the client closed early
is recorded in ``aborted`` (chunks written before the write failed).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from standin_server import LocalStandInServer


class OpenAIStandIn(LocalStandInServer):
    """Start with ``with OpenAIStandIn(models=[...]) as srv: srv.url`` (ends in /v1)."""

    _url_path = "/v1"

    def __init__(self, models: list[str] | None = None,
                 reply_fn: Callable[[str, list[dict], dict], str] | None = None, *,
                 api_key: str | None = None, chat_delay_s: float = 0.0,
                 token_delay_s: float = 0.0) -> None:
        self.models = list(models or ["smollm2-135m"])
        self.reply_fn = reply_fn or (lambda model, msgs, body: f"echo: {msgs[-1]['content']}")
        self.api_key = api_key
        self.chat_delay_s = chat_delay_s
        self.token_delay_s = token_delay_s
        self.requests: list[tuple[str, str, Any]] = []
        self.calls: list[tuple[str | None, dict]] = []     # (API key, chat request body)
        self.aborted: list[int] = []
        self.finished = threading.Event()      # set when a stream ends (fully or aborted)

    def bodies(self, path: str = "/v1/chat/completions") -> list[Any]:
        return [b for _m, p, b in self.requests if p == path]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)


def _handler_for(state: OpenAIStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"      # a streamed body ends when the connection closes

        def log_message(self, *a) -> None:
            pass

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str, kind: str) -> None:
            # vLLM's error body; the openai client reads body["error"]["message"]
            self._send(code, {"error": {"message": message, "type": kind, "param": None,
                                        "code": code}})

        def _authorised(self) -> bool:
            if state.api_key is None:
                return True
            if self.headers.get("Authorization") == f"Bearer {state.api_key}":
                return True
            self._error(401, "Incorrect API key provided.", "AuthenticationError")
            return False

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path, None))
            if not self._authorised():
                return
            if self.path == "/v1/models":
                return self._send(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "standin"}
                    for m in state.models]})
            self._error(404, f"no route {self.path}", "NotFoundError")

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}")
            state.requests.append(("POST", self.path, body))
            if not self._authorised():
                return
            if self.path != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}", "NotFoundError")
            model = body.get("model", "")
            if model not in state.models:
                return self._error(404, f"The model `{model}` does not exist.",
                                   "NotFoundError")
            auth = self.headers.get("Authorization") or ""
            state.calls.append((auth.removeprefix("Bearer ") or None, body))
            if state.chat_delay_s:
                time.sleep(state.chat_delay_s)
            self._complete(model, body)

        def _complete(self, model: str, body: dict) -> None:
            text = state.reply_fn(model, body.get("messages") or [], body)
            finish, stop_reason = "stop", None
            for s in body.get("stop") or []:
                if s in text:
                    text, stop_reason = text[:text.index(s)], s
            words = [w + " " for w in text.split(" ")]
            words[-1] = words[-1][:-1]
            limit = body.get("max_tokens") or body.get("max_completion_tokens")
            if limit is not None and len(words) > int(limit):
                words, finish, stop_reason = words[:int(limit)], "length", None
            base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()),
                    "model": model}
            usage = {"prompt_tokens": 5, "completion_tokens": len(words),
                     "total_tokens": 5 + len(words)}
            if not body.get("stream"):
                return self._send(200, {**base, "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": "".join(words)},
                    "finish_reason": finish, "stop_reason": stop_reason}], "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {**base, "object": "chat.completion.chunk"}
            events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                   "content": w},
                                             "finish_reason": None}]} for w in words]
            events.append({**chunk, "choices": [{"index": 0, "delta": {},
                                                 "finish_reason": finish,
                                                 "stop_reason": stop_reason}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({**chunk, "choices": [], "usage": usage})
            sent = 0
            try:
                for ev in events:
                    self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                    self.wfile.flush()
                    sent += 1
                    if state.token_delay_s:
                        time.sleep(state.token_delay_s)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                state.aborted.append(sent)     # the client closed the stream
            finally:
                state.finished.set()

    return Handler
