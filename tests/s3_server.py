"""A local S3 server for tests and benchmarks: moto's S3 implementation, served over HTTP.

    with LocalS3() as s3:
        s3.create_bucket("mem")
        s3.storage_options   # what memory.storage_options needs to reach it

It is moto (``moto[server]``), a Python implementation of the S3 REST API, not AWS.

Lance commits each table version with a conditional put (``If-None-Match: *``): S3
guarantees that of concurrent conditional writes of one key exactly one succeeds and
the others get 412. moto 5.2 checks the condition and then writes, without a lock, on a
threaded server, so two writers could both get 200 for the same manifest and one
commit silently replaced the other (a lost memory row, see tests/test_memory_s3.py).
This stand-in therefore runs every write request (PUT/POST/DELETE) one at a time, which
makes moto's check-and-write atomic as S3's is; reads stay concurrent.
``conditional_writes`` records (path, status) of each conditional write it served;
``LocalS3(honour_conditional_writes=False)`` plays a store that ignores the headers.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

ACCESS_KEY = "a4ps-test"
SECRET_KEY = "a4ps-test-secret"
REGION = "us-east-1"
_WRITES = ("PUT", "POST", "DELETE")


class _AtomicWrites:
    """WSGI wrapper: one write at a time (S3's atomic conditional put), reads in parallel."""

    def __init__(self, app: Any, owner: "LocalS3") -> None:
        self.app = app
        self.owner = owner
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in _WRITES:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        if not self.owner.honour_conditional_writes:   # a store that ignores them
            environ.pop("HTTP_IF_NONE_MATCH", None)
            environ.pop("HTTP_IF_MATCH", None)
        conditional = bool(environ.get("HTTP_IF_NONE_MATCH") or environ.get("HTTP_IF_MATCH"))
        status: list[str] = []

        def record(s: str, headers: Any, *exc: Any) -> Any:
            status.append(s)
            return start_response(s, headers, *exc)

        with self.lock:
            body = list(self.app(environ, record))     # the whole write, under the lock
            if conditional and status:
                self.owner.conditional_writes.append(
                    (str(environ.get("PATH_INFO", "")), int(status[0].split()[0])))
        return body


class LocalS3:
    def __init__(self, *, honour_conditional_writes: bool = True) -> None:
        # False: drop If-None-Match / If-Match, as some S3-compatible stores do
        self.honour_conditional_writes = honour_conditional_writes
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.endpoint: str | None = None
        self.conditional_writes: list[tuple[str, int]] = []

    def start(self) -> "LocalS3":
        from moto.server import DomainDispatcherApplication, create_backend_app
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        app = _AtomicWrites(DomainDispatcherApplication(create_backend_app), self)
        self._server = make_server("127.0.0.1", 0, app, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="local-s3", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def client(self) -> Any:
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    @property
    def storage_options(self) -> dict[str, str]:
        return {"aws_endpoint": str(self.endpoint), "aws_region": REGION,
                "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY,
                "allow_http": "true"}

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
